# Two commands do everything: `make demo` (the main job) and `make test` (the tests).
# Every install takes its versions from requirements.lock (`make lock` remakes it from pyproject.toml).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LOCK := requirements.lock
# The lock as pip constraints: it fixes each version, and installs only what the extras asked for.
INSTALL := $(PY) -m pip install -q -c $(LOCK)
# pip is not in the lock, and a new venv's own pip may be older than 21.3, the first to install it editable.
PIP_VERSION := 26.3
ACTIVATE := @echo "condu-fuse and condu-cl are in $(VENV)/bin; to put them on PATH: source $(VENV)/bin/activate"

# `make lock`: uv at a pinned version, in its own environment inside .venv.
UV_VERSION := 0.13.9
TOOLS := $(VENV)/tools
# The lowest Python requires-python allows: the lock holds pins for it and every later one.
LOCK_PYTHON := 3.10
LOCK_COMPILE := uv pip compile pyproject.toml --universal --all-extras --python-version $(LOCK_PYTHON) \
	--no-python-downloads --annotation-style line --no-header --quiet -o $(LOCK)

.PHONY: install demo test bench lock
install: $(VENV)/.demo

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q pip==$(PIP_VERSION)
	touch $@

# The demo: the core and [cl]. torch comes pinned by the lock (the CPU build where pip finds one).
# The install compiles the cpu kernel's C library (setup.py): an edit of its source compiles it again.
$(VENV)/.demo: $(LOCK) pyproject.toml setup.py fusion/kernels/cpu_native.c $(VENV)/.created
	$(INSTALL) -e '.[cl]'
	touch $@
	$(ACTIVATE)

# The tests add [test] and [triton] (CI runs the Triton kernels on the CPU with TRITON_INTERPRET=1).
$(VENV)/.test: $(VENV)/.demo
	$(INSTALL) -e '.[cl,test,triton]'
	touch $@
	$(ACTIVATE)

demo: $(VENV)/.demo
	$(PY) -m cl_driver.cli demo
	$(ACTIVATE)

test: $(VENV)/.test
	$(PY) -m pytest -q

bench: $(VENV)/.test
	$(PY) -m benchmarks.kernels

$(TOOLS)/.uv-$(UV_VERSION):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q uv==$(UV_VERSION) 'tomli>=2; python_version < "3.11"'
	touch $@

# Keeps the pins that still fit pyproject.toml; `rm requirements.lock` first to take the newest.
lock: $(TOOLS)/.uv-$(UV_VERSION)
	$(TOOLS)/bin/$(LOCK_COMPILE)
	$(TOOLS)/bin/python -m tests.lockfile stamp $(LOCK) --command '$(LOCK_COMPILE)' --uv "$$($(TOOLS)/bin/uv --version)"
