#!/usr/bin/env bash
# The prepared GPU check, second version (docs/gpu.md). One command, <= 8 minutes on one H100/H200:
#
#   bash benchmarks/gpu/run.sh OUTDIR                      # on the GPU machine (device tool: carry .gpu-bundle)
#   bash benchmarks/gpu/run.sh --only svg2 --only nar OUTDIR   # only those steps (a rerun inside a grant)
#   bash benchmarks/gpu/run.sh --dry-run OUTDIR            # here, on CPU: every step on tiny shapes
#
# Installs .gpu-bundle/ offline (--no-index --no-deps --target, PYTHONPATH; the system torch is
# never touched), then runs the benchmark steps of benchmarks/gpu/steps.py, most informative first,
# each under its own `timeout` cap (a step past its cap is killed and reported as such; each step
# writes its JSON after every stage), then `pytest -m cuda` (tests/test_cuda.py), and writes
# OUTDIR/gpu_report.md, OUTDIR/gpu_figures.json and OUTDIR/run.log. nvidia-smi's clocks,
# temperature and processes are printed before and after (and recorded per step). The dry run
# installs into a fresh venv whose base packages are this venv's copies of what the GPU machine's
# python3 has (a .pth to a linked stand-in site, bundle.py `site`) and runs every step in one process,
# one thread each, its work folder in memory ($DRY_RUN_TMPDIR, default /dev/shm, else $TMPDIR).
set -u -o pipefail

DRY=0
ONLY=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1; shift ;;
        --only) [ $# -ge 2 ] || { echo "--only needs a STEP" >&2; exit 2; }; ONLY+=("${2//,/ }"); shift 2 ;;
        --only=*) ONLY+=("${1#--only=}"); shift ;;
        -*) echo "unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
if [ $# -ne 1 ]; then echo "usage: $0 [--dry-run] [--only STEP]... OUTDIR" >&2; exit 2; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ALL_STEPS="svg2 wan14b density wan hired pixart nar clip"
STEP_LIST="${ONLY[*]:-$ALL_STEPS}"
for step in $STEP_LIST; do
    case " $ALL_STEPS tests " in *" $step "*) ;; *) echo "--only: unknown step '$step' (one of: $ALL_STEPS tests)" >&2; exit 2 ;; esac
done
mkdir -p "$1" && OUT="$(cd "$1" && pwd)"
cd "$ROOT"
BUNDLE="${GPU_BUNDLE:-$ROOT/.gpu-bundle}"
TMP_ROOT="${TMPDIR:-/tmp}"
if [ $DRY = 1 ] && [ -d "${DRY_RUN_TMPDIR:-/dev/shm}" ] && [ -w "${DRY_RUN_TMPDIR:-/dev/shm}" ]; then
    # the dry run works in memory where it can: writing and deleting the install's ~4,400 files on the
    # shared machine's disk (ext4, discard) took 5-15 s of its wall time
    TMP_ROOT="${DRY_RUN_TMPDIR:-/dev/shm}"
fi
WORK="$(mktemp -d "$TMP_ROOT/mmaccel-gpu.XXXXXX")"
SITE="$WORK/site"
START=$(date +%s)
exec > >(tee "$OUT/run.log") 2>&1
trap 'rm -rf "$WORK"' EXIT

# Caps (seconds) per stage. The real run's sum to 440 s; with the install (~10 s) and the report the
# whole run stays under 8 minutes. Compiles are regional (one block each), <= 60 s inside a step's cap.
declare -A CAP=([env]=20 [svg2]=40 [wan14b]=40 [density]=75 [wan]=70 [hired]=50 [pixart]=45 [nar]=40 [clip]=20 [tests]=40)
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1  # cwd's mmaccel/ folder must not shadow the install
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

say() { printf '\n=== [%4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
: > "$WORK/status.tsv"
stage() {  # stage NAME CAP CMD...: run under `timeout`, record exit status and seconds
    local name=$1 cap=$2 t0 rc
    shift 2
    say "$name (cap ${cap} s)"
    t0=$(date +%s)
    timeout -k 10 "$cap" "$@"
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$cap" >> "$WORK/status.tsv"
    if [ $rc = 124 ] || [ $rc = 137 ]; then say "$name KILLED at its ${cap} s cap"; elif [ $rc != 0 ]; then say "$name FAILED (exit $rc)"; fi
    return 0
}
gpu_state() {  # clocks, temperature, power, throttling and other processes: explains a spread
    say "GPU state ($1)"
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu,memory.used,pstate,clocks_throttle_reasons.active \
        --format=csv 2>/dev/null || echo "(no nvidia-smi)"
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv 2>/dev/null || true
}

# ---------------------------------------------------------------- the interpreter
if [ ! -f "$BUNDLE/bundle.json" ]; then echo "no bundle at $BUNDLE: run 'make gpu-bundle' first" >&2; exit 1; fi
if [ $DRY = 1 ]; then
    # tiny shapes gain nothing from threads, and on a shared CPU idle OpenMP workers spin: one thread
    # per process cut the steps' CPU time from 37 s to 8 s (docs/gpu.md)
    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
    mkdir -p "$WORK/tmp" && export TMPDIR="$WORK/tmp"  # pip unpacks there: beside the site, one move
    HOST_PY="${DRY_RUN_PYTHON:-$ROOT/.venv/bin/python}"
    say "dry run: fresh venv over a stand-in for the GPU machine's packages ($HOST_PY)"
    "$HOST_PY" -m venv --without-pip "$WORK/venv" || exit 1
    PY="$WORK/venv/bin/python"
    "$HOST_PY" benchmarks/gpu/bundle.py site "$WORK/gpu-site" --bundle "$BUNDLE" || exit 1
    echo "$WORK/gpu-site" > "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_gpu_standin.pth"
    PIP=("$HOST_PY" -m pip)  # the venv has no pip of its own; --target writes where we say
else
    PY="${PYTHON:-python3}"
    PIP=("$PY" -m pip)
    gpu_state "before"
fi

# ---------------------------------------------------------------- the bundle, offline
say "install $BUNDLE into $SITE (offline, --no-deps)"
WHEELS=("$BUNDLE"/*.whl)
WANT="$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["source_sha256"])' "$BUNDLE/bundle.json")"
HAVE="$("$PY" benchmarks/gpu/bundle.py hash --root "$ROOT")"
if [ "$WANT" != "$HAVE" ]; then
    echo "WARNING: the bundle's mmaccel wheel was built from other sources than this tree"
    if [ $DRY = 0 ] && "${PIP[@]}" wheel -q --no-deps --no-build-isolation --no-index -w "$WORK/wheel" "$ROOT"; then
        echo "rebuilt mmaccel from this tree: $(ls "$WORK"/wheel)"
        WHEELS=($(ls "$BUNDLE"/*.whl | grep -v '/mmaccel-') "$WORK"/wheel/mmaccel-*.whl)
    else
        echo "using the bundled mmaccel wheel (rebuild with 'make gpu-bundle')"
    fi
fi
"${PIP[@]}" install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$SITE" "${WHEELS[@]}" || { echo "offline install failed" >&2; exit 1; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# ---------------------------------------------------------------- steps, then the cuda tests
BENCH=$(for s in $STEP_LIST; do [ "$s" != tests ] && printf '%s ' "$s"; done)
if [ $DRY = 1 ]; then  # one process for all steps (imports once): the same code on tiny shapes, fp32
    # compiled variants are not run here (inductor on CPU takes minutes); tests/test_gpu_steps.py compiles regionally
    stage "steps: env $BENCH" 150 "$PY" benchmarks/gpu/steps.py env $BENCH --work "$WORK" --tiny --no-compile --budget-s 140
else
    stage env "${CAP[env]}" "$PY" benchmarks/gpu/steps.py env --work "$WORK"
    for step in $BENCH; do
        stage "$step" "${CAP[$step]}" "$PY" benchmarks/gpu/steps.py "$step" --work "$WORK" --budget-s $(( ${CAP[$step]} - 8 ))
    done
fi
if [ -z "${ONLY[*]}" ] || [[ " $STEP_LIST " == *" tests "* ]]; then
    stage "pytest -m cuda" "${CAP[tests]}" bash -c "set -o pipefail; '$PY' -m pytest -m cuda -q -rfEs --tb=short -p no:cacheprovider \
        -o addopts='' tests/test_cuda.py 2>&1 | tee '$WORK/pytest.txt'"
fi
[ $DRY = 0 ] && gpu_state "after"
say "report"
"$PY" benchmarks/gpu/steps.py report --work "$WORK" --out "$OUT" --readiness "$ROOT/benchmarks/results/gpu_readiness.json" \
    > /dev/null || exit 1
cat "$WORK/status.tsv"

if [ $DRY = 1 ]; then  # what the dry run promises: every step ran on tiny shapes, every cuda test collected and skipped
    "$PY" - "$WORK" $BENCH <<'EOF' || exit 1
import json, re, sys
from pathlib import Path
work, steps = Path(sys.argv[1]), sys.argv[2:]
bad = [l for l in (work / "status.tsv").read_text().splitlines() if l.split("\t")[1] != "0"]
pytest_txt = work / "pytest.txt"
m = None
if pytest_txt.exists():
    tail = pytest_txt.read_text()
    m = re.search(r"(\d+) skipped", tail)
    if not m or re.search(r"\d+ (passed|failed|error)", tail):
        bad.append(f"pytest -m cuda: expected only skipped tests, got: {tail.strip().splitlines()[-1]}")
for step in ("env", *steps):
    d = json.loads((work / f"{step}.json").read_text())
    if d["status"] != "ok":
        bad.append(f"{step}: status {d['status']}")
    elif step != "env" and step != "clip" and not d.get("profiles"):
        bad.append(f"{step}: no profile recorded")
tests = f"{m.group(1)} cuda tests collected and skipped" if m else "cuda tests not run (--only)"
print("DRY RUN " + ("FAILED:\n  " + "\n  ".join(bad) if bad else f"OK: {len(steps)} steps; {tests}"))
sys.exit(1 if bad else 0)
EOF
fi
say "done in $(( $(date +%s) - START )) s: $OUT/gpu_report.md, $OUT/gpu_figures.json"
