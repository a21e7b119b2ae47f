# Two commands on a fresh machine: `make setup` (install + doctor + selftest) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.itk-installed

.PHONY: setup test lint bench-cli clean

# The CPU build of torch is ~200 MB, the CUDA build several GB: take the CUDA one only where a driver is.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	if nvidia-smi -L >/dev/null 2>&1; then \
		$(PIP) install "torch>=2.4"; \
	else \
		$(PIP) install "torch==$(TORCH_VERSION)+cpu" 2>/dev/null || \
		$(PIP) install "torch==$(TORCH_VERSION)+cpu" --index-url $(TORCH_CPU_INDEX); \
	fi
	$(PIP) install -e ".[dev]"
	touch $@

setup: $(STAMP)
	-$(VENV)/bin/itk doctor
	$(VENV)/bin/itk selftest

test: $(STAMP)
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(PY) -m ruff check itk checks runtime tests bench

clean:
	rm -rf $(VENV) build *.egg-info
