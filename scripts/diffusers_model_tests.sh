#!/usr/bin/env bash
# diffusers' own model tests with every technique applied (issue #32), on CPU.
#
#   scripts/diffusers_model_tests.sh [OUT_DIR [PYTEST_ARGS...]]   (OUT_DIR default /tmp/diffusers_suite_out)
#
# Runs diffusers' transformer tests of the families mmaccel patches (Wan, CogVideoX, HunyuanVideo,
# Flux, DiT, PixArt) once per setting of mmaccel.benchmarks.diffusers_suite (none, svg2-full,
# svg2-reducing, token_density-full, token_density-reducing, token_density-every_step), compile tests included
# (--mmaccel-compile-on-cpu), against the INSTALLED diffusers, and writes OUT_DIR/<setting>.xml,
# OUT_DIR/<setting>.log and OUT_DIR/summary.md (counts per setting and every test that passes
# unpatched but not patched, with its first error line).
#
# Environment:
#   DIFFUSERS_TESTS  a directory holding diffusers' tests/ (default /tmp/diffusers_src); exported
#                    from DIFFUSERS_REPO when it has none
#   DIFFUSERS_REPO   a diffusers git directory to export tests/ from (git archive HEAD tests)
#   PYTHON           the interpreter with mmaccel and diffusers installed (default .venv/bin/python)
#   SETTINGS         the settings to run (default: all five)
#   TEST_TIMEOUT     seconds per test (default 300); RUN_TIMEOUT seconds per setting (default 3600)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-/tmp/diffusers_suite_out}" && cd "${1:-/tmp/diffusers_suite_out}" && pwd)"
shift || true  # the rest: extra pytest arguments (e.g. -k "not Compile")
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
case "$PYTHON" in /*) ;; *) PYTHON="$ROOT/$PYTHON" ;; esac
SRC="${DIFFUSERS_TESTS:-/tmp/diffusers_src}"
SETTINGS="${SETTINGS:-none svg2-full svg2-reducing token_density-full token_density-reducing token_density-every_step}"

if [ ! -d "$SRC/tests/models/transformers" ]; then
  if [ -z "${DIFFUSERS_REPO:-}" ]; then
    echo "error: $SRC/tests/models/transformers not found; set DIFFUSERS_TESTS or DIFFUSERS_REPO" >&2
    exit 2
  fi
  mkdir -p "$SRC"
  git -C "$DIFFUSERS_REPO" archive HEAD tests | tar -x -C "$SRC"
fi
if [ -d "$SRC/src/diffusers" ]; then  # diffusers' tests/conftest.py puts ../src first on sys.path
  echo "error: $SRC/src/diffusers exists: the tests would import it instead of the installed diffusers" >&2
  exit 2
fi

T=tests/models/transformers
FILES=("$T/test_models_transformer_wan.py" "$T/test_models_transformer_cogvideox.py"
       "$T/test_models_transformer_hunyuan_video.py" "$T/test_models_transformer_flux.py"
       "$T/test_models_dit_transformer2d.py" "$T/test_models_pixart_transformer2d.py")

"$PYTHON" -c "import diffusers, torch; print('diffusers', diffusers.__version__, 'torch', torch.__version__)" \
  | tee "$OUT/versions.txt"
if git -C "${DIFFUSERS_REPO:-/nonexistent}" rev-parse HEAD >/dev/null 2>&1; then
  echo "tests from diffusers $(git -C "$DIFFUSERS_REPO" rev-parse HEAD)" | tee -a "$OUT/versions.txt"
fi

cd "$SRC"
for setting in $SETTINGS; do
  echo "== $setting"
  # a failing test is a result, not an error of this script
  MMACCEL_DIFFUSERS_SUITE="$setting" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    timeout "${RUN_TIMEOUT:-3600}" "$PYTHON" -m pytest -p mmaccel.benchmarks.diffusers_suite -p no:cacheprovider \
    -q --timeout="${TEST_TIMEOUT:-300}" --mmaccel-compile-on-cpu --junitxml="$OUT/$setting.xml" \
    "$@" "${FILES[@]}" >"$OUT/$setting.log" 2>&1 || true
  tail -n 1 "$OUT/$setting.log"
done

"$PYTHON" -m mmaccel.benchmarks.diffusers_suite "$OUT" | tee "$OUT/summary.md"
