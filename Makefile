# Two commands do all the set-up on a fresh machine:
#   make demo   installs into .venv, then runs `fastsam-batch run jobs/demo.yaml` (local Ray, CPU)
#   make test   installs into .venv, then runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every dependency is pinned by constraints.txt (torch and torchvision must be a matching pair:
# torchvision's compiled ops are built against one torch).

.PHONY: install demo test bench clean

$(BIN)/fastsam-batch: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

install: $(BIN)/fastsam-batch

demo: install
	$(BIN)/fastsam-batch run jobs/demo.yaml --overwrite

test: install
	$(BIN)/python -m pytest -q --durations=15 tests

bench: install
	$(BIN)/python benchmarks/bench.py

clean:
	rm -rf out .pytest_cache
