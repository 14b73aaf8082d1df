# mmaccel developer entry points. `make run` and `make test` work on a fresh machine:
# each creates .venv (once) and installs mmaccel in editable mode with the CPU torch build.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
TORCH  ?= torch==2.13.0
# Extra pip arguments for torch, e.g. TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH_INDEX ?=
PY := $(VENV)/bin/python
TEST_ENV := HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False

.PHONY: install browser run test test-slow lint clean gpu-bundle

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,video,demo]" "$(TORCH)"
	touch $@

install: $(VENV)/.installed

# Debian chromium for the browser test (Playwright drives it; `playwright install` is never used).
browser:
	bash scripts/install_browser.sh

# The main job: the Gradio demo on the built-in zoo models (real checkpoints: ARGS="--vlm-model PATH").
run: install
	$(VENV)/bin/mmaccel info --no-compile
	$(VENV)/bin/mmaccel demo $(ARGS)

# Default suite + the browser test; heavy checks are `make test-slow`.
test: install browser
	$(TEST_ENV) $(PY) -m pytest -q -m "not slow"

test-slow: install
	$(TEST_ENV) $(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check .

# Offline wheels for the GPU machine (diffusers and what it lacks + mmaccel itself): docs/gpu.md.
gpu-bundle: install
	$(PY) benchmarks/gpu/bundle.py build --out .gpu-bundle

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
