# Two commands do all the set-up on a fresh machine:
#   make demo   installs into .venv, then runs `fastsam-batch run jobs/demo.yaml` (local Ray, CPU)
#   make test   installs into .venv, then runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every dependency is pinned by constraints.txt (torch and torchvision must be a matching pair:
# torchvision's compiled ops are built against one torch).

# Opt-in: TORCH_INDEX=cpu (or a wheel index URL) installs torch and torchvision, at the pinned
# versions, from PyTorch's CPU wheel index first, so that the CUDA libraries and triton (about 4.2 GB
# of the default install's 6.8 GB) are not installed on a machine without a GPU:
#   make demo TORCH_INDEX=cpu
# Not exercised on the machines this project is built on (their package index serves only the CUDA
# build); the default, without TORCH_INDEX, is unchanged. --no-deps: torch's own dependencies come
# from the ordinary index in the second step (the CPU index need not hold their pinned versions).
TORCH_INDEX ?=
TORCH_INDEX_URL := $(if $(filter cpu,$(TORCH_INDEX)),https://download.pytorch.org/whl/cpu,$(TORCH_INDEX))

.PHONY: install demo test bench clean

$(BIN)/fastsam-batch: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
ifneq ($(TORCH_INDEX_URL),)
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt --index-url $(TORCH_INDEX_URL) torch torchvision
endif
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
