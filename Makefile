# Two commands on a fresh machine: `make setup` (install + doctor + selftest) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_STAMP := $(VENV)/.itk-torch
USER_STAMP := $(VENV)/.itk-user
DEV_STAMP := $(VENV)/.itk-installed

.PHONY: setup test lint clean

# torch first, chosen from the NVIDIA driver's CUDA version (itk/torch_build.py says which and why; override with
# `make setup TORCH_INDEX=URL` or `TORCH_SPEC=...`). Its download is the big one, so pip's progress bar stays on.
$(TORCH_STAMP):
	test -x $(PY) || python3 -m venv $(VENV)
	python3 itk/torch_build.py > $(VENV)/.torch-choice
	@echo "itk setup: $$(sed -n 3p $(VENV)/.torch-choice)"
	$(PIP) install --progress-bar on $$(sed -n 1p $(VENV)/.torch-choice) || \
		{ fallback="$$(sed -n 2p $(VENV)/.torch-choice)"; test -n "$$fallback" && $(PIP) install --progress-bar on $$fallback; }
	touch $@

# End users get the package alone; the test tools (pytest, ruff) only with `make test`. It takes a minute or
# two, so it says so first and pip shows what it collects and its progress bars (no -q: silence looked hung).
$(USER_STAMP): $(TORCH_STAMP) pyproject.toml
	@echo "itk setup: installing itk and its dependencies (transformers, librosa, gradio, PyAV, ...): a minute or two"
	$(PIP) install --progress-bar on -e .
	touch $@

# The tests cover the optional extras too (speech from text, the Ray cluster): they install with the test tools.
$(DEV_STAMP): $(TORCH_STAMP) pyproject.toml
	$(PIP) install -q -e ".[dev,tts,cluster]"
	touch $@

# The doctor's verdict is shown but never fails setup (a GPU-less box honestly fails its gpu check); the
# selftest is the pass/fail step and its last line says what works here and what to do next.
setup: $(USER_STAMP)
	@$(VENV)/bin/itk doctor || true
	@$(VENV)/bin/itk selftest

test: $(DEV_STAMP)
	$(VENV)/bin/pytest -q

lint: $(DEV_STAMP)
	$(PY) -m ruff check itk checks runtime tests bench

clean:
	rm -rf $(VENV) build *.egg-info
