# Two commands do everything: `make demo` (the main job) and `make test` (the tests).
PY ?= .venv/bin/python
export TORCH_VERSION ?= 2.13.0

.PHONY: install demo test bench
install: .venv/.installed

# torch is installed first and pinned: a bare `torch` requirement pulls a multi-GB CUDA build.
.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[cl,test]'
	touch $@

demo: install
	$(PY) -m cl_driver.cli demo

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/kernels.py
