# dsv3-jax: `make demo` and `make test` work on a fresh machine (they run `setup` first).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Python >= 3.12 (JAX >= 0.11). Prefer pyenv's interpreter named in .python-version.
PYTHON ?= $(shell v=$$(cat .python-version 2>/dev/null); \
	for p in "$$(pyenv root 2>/dev/null)/versions/$$v/bin/python" "$$HOME/.pyenv/versions/$$v/bin/python" \
	         "$$(command -v python3.12)" "$$(command -v python3.13)" "$$(command -v python3)"; do \
	  [ -x "$$p" ] && "$$p" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { echo "$$p"; break; }; \
	done)
CPU_ENV := JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8
# The tests add LLVM optimization level 0: about 12% less wall time on 2 cores (compiles dominate;
# the small test programs run no slower), same results.
TEST_ENV := JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
# test processes (pytest-xdist, whole files per process: module fixtures are built once)
TEST_WORKERS ?= 2

DEMO_CKPT := demo/stdlib-coder

.PHONY: setup demo demo-tiny test info clean

setup: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml constraints.txt
	@[ -n "$(PYTHON)" ] || { echo "error: Python >= 3.12 not found (install it, e.g. 'pyenv install 3.12', or pass PYTHON=/path/to/python3.12)"; exit 1; }
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,train]'
	@touch $@

# The demo model trained by train.py (docs/train.md), completing Python on the CPU.
demo: setup
	$(CPU_ENV) $(PY) infer.py --ckpt $(DEMO_CKPT) --raw --prompt "def fibonacci(n):" \
	  --prompt "class Stack:" --temperature 0.6 --top-k 40 --max-new-tokens 64 --mtp

# A tiny HF-format fixture: load, compare with HF transformers' logits, decode.
demo-tiny: setup
	$(CPU_ENV) $(PY) -m dsv3_jax demo

test: setup
	$(TEST_ENV) $(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile

info: setup
	$(PY) -m dsv3_jax info configs/deepseek_v3_671b.json

clean:
	rm -rf $(VENV) .pytest_cache
