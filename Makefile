# mmaccel developer entry points. `make run` and `make test` work on a fresh machine:
# each creates .venv (once) and installs mmaccel in editable mode with the CPU torch build.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
TORCH  ?= torch==2.13.0
# Extra pip arguments for torch, e.g. TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH_INDEX ?=
PY := $(VENV)/bin/python
TEST_ENV := HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False

.PHONY: install run test test-slow lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_INDEX) "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,video]" "$(TORCH)"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/mmaccel info
	$(VENV)/bin/mmaccel smoke

test: install
	$(TEST_ENV) $(PY) -m pytest -q

test-slow: install
	$(TEST_ENV) $(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
