# Two commands on a fresh machine with Python 3.11 and pip:
#   make demo   CPU demo of the whole pipeline: data, BF16 / FP8 / FP8+TWEO training, Tables 2 and 10,
#               a sample, the paper's figures (out/demo_ITERS/, ITERS = bench/demo.py's default, 150)
#   make demo DEMO_ITERS=400   a longer demo of its own (out/demo_400/), beside the first
#   make test   the test suite
# Everything is installed into .venv; rerunning skips what is already done.
#   make clean-demo   removes the demo runs and figures (out/demo_*)
#   make clean        removes everything make made: .venv, the tokenizer cache (.cache), the demo
#                     corpus (data/demo) and the demo runs; never your own runs or data/openwebtext
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_ITERS ?=

.PHONY: install install-dev install-fp8 demo test clean clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install -qq --no-deps -e .  # this repository, importable from bench/ and tools/ (pyproject.toml)
	touch $@

$(VENV)/.installed-dev: requirements-dev.txt $(VENV)/.installed
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

.cache/gpt2.tiktoken: | $(VENV)/.installed
	$(BIN)/python prepare_openwebtext.py --fetch_tokenizer

install: $(VENV)/.installed .cache/gpt2.tiktoken

install-dev: $(VENV)/.installed-dev .cache/gpt2.tiktoken

# Transformer Engine, built against the torch already in .venv (needs CUDA 12.1+ and nvcc)
install-fp8: install
	$(BIN)/pip install ninja pybind11
	$(BIN)/pip install --no-build-isolation -r requirements-fp8.txt

data/demo/meta.json: | install
	$(BIN)/python prepare_openwebtext.py --demo

demo: install data/demo/meta.json
	$(BIN)/python bench/demo.py $(if $(DEMO_ITERS),--max_iters=$(DEMO_ITERS))

test: install-dev
	$(BIN)/python -m pytest -q tests

clean-demo:
	rm -rf out/demo_*

clean: clean-demo
	rm -rf $(VENV) .cache data/demo
