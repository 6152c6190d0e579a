# Two commands on a fresh machine: `make demo` and `make test`.
# torch is pinned to the CPU build here and installed in the same pip command as the project,
# so pip never pulls a multi-GB CUDA build; pyproject keeps a loose range for GPU users.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test test-gpu bench info clean

$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH) -e '.[dev,triton,xformers,hf,fla]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py

test: $(STAMP)
	$(PY) -m pytest -q -n 2

# the CUDA subset (tests marked gpu): every backend vs reference on CUDA, invariants on CUDA, a bf16
# autocast training run; one process, so Triton compiles each kernel once
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu -rs

bench: $(STAMP)
	$(PY) tools/bench.py decode
	$(PY) tools/bench.py layer

info: $(STAMP)
	$(PY) tools/info.py

clean:
	rm -rf $(VENV) runs build *.egg-info
