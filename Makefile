# Two commands a newcomer needs: `make demo` and `make test`. Both create .venv and install stepquant.
# torch: on a machine without an NVIDIA GPU we pin the CPU build (torch==2.13.0, which pip takes from
# the local wheel cache here); a plain `pip install torch` would pull several GB of CUDA packages.
# Override with `make TORCH_SPEC='torch==X' ...` (e.g. with PIP_EXTRA_INDEX_URL set to PyTorch's CPU index).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stepquant-installed
TORCH_SPEC ?= $(shell if nvidia-smi -L >/dev/null 2>&1; then echo 'torch>=2.4'; else echo 'torch==2.13.0'; fi)
DEMO_OUT ?= out/demo-digits-w8a8

.PHONY: setup demo test test-fast test-tools clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check '$(TORCH_SPEC)'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[export,test,openvino]'
	touch $(STAMP)

demo: $(STAMP)
	mkdir -p $(dir $(DEMO_OUT))
	$(BIN)/export-quantized --out $(DEMO_OUT) --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not tools'

test-tools: $(STAMP)
	$(BIN)/python -m pytest -q -m tools tests/test_tools.py

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow and not tools'

clean:
	rm -rf $(VENV) out .pytest_cache
