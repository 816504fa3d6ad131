# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# `make test-py312` runs the suite on the users' stack too (Python 3.12 + megatron-core 0.19.x, own venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for torch alone, e.g. --index-url of PyTorch's CPU wheel index (see README).
TORCH_PIP_ARGS ?=
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# The suite runs on pytest-xdist workers, one per core of a 2-core CI machine (each test process is
# single-threaded: OMP_NUM_THREADS=1). --dist loadscope gives each test module to one worker, so a
# module-scoped fixture (the SLURM cluster, a trained tiny model) is built once, as in a serial run.
# (xdist_group marks and --dist loadgroup do not group with pytest 9.2 + pytest-xdist 3.8.)
# TEST_WORKERS=0 runs the suite in this process, serially.
TEST_WORKERS ?= 2
PYTEST_ARGS := -q -m "not gpu" --timeout=900 -n $(TEST_WORKERS) --dist loadscope --durations=15

# The users' clusters: Python 3.12 + megatron-core 0.19.x. A python3.12 that runs, else pyenv's.
PYTHON312 ?= $(shell for p in python3.12 $${HOME:-/root}/.pyenv/versions/3.12*/bin/python3.12; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo $$p; break; }; done)
VENV312 ?= .venv312
MCORE312 ?= megatron-core>=0.19,<0.20
PY312 := $(VENV312)/bin/python
# The stamp is named by what the dependencies come from, so a changed pyproject.toml / setup.py / pin
# updates them, and a venv kept outside a fresh clone (CI: .ci/run) is reused without mtime games.
DEPS312_KEY := $(shell (cat pyproject.toml setup.py; echo '$(MCORE312)') | sha256sum | cut -c1-12)
STAMP312 := $(VENV312)/.installed-$(DEPS312_KEY)-torch$(TORCH_VERSION)

.PHONY: demo test test-py312 lint install install-py312 clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch is installed first and pinned, so nothing upgrades it; it is the CPU build only where pip finds a CPU
# wheel (this machine's local wheel, or PyTorch's CPU index through TORCH_PIP_ARGS): PyPI's is the CUDA build.
$(STAMP): $(PY) pyproject.toml setup.py
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# On 3.12, PyPI's torch==2.13.0 is the CUDA build (the CPU wheels live on PyTorch's own index): pip pulls
# ~5 GB with 13 nvidia-* packages, which torch needs to import even on a CPU (libcudnn.so.9 is loaded
# at import). pip did not cache these downloads here: CI keeps the venv itself between runs.
# A kept venv whose dependencies changed (a new dev extra, another pin) is brought up to date in place:
# pip adds or replaces what changed and keeps the ~6 GB of torch and nvidia-* wheels it already has (a
# fresh venv is ~55 min of downloads here). One that is missing or not a Python 3.12 is made anew.
$(STAMP312):
	@test -n "$(PYTHON312)" || { echo "make test-py312: no Python 3.12 found; set PYTHON312=/path/to/python3.12"; exit 2; }
	$(PY312) -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null || { rm -rf $(VENV312) \
		&& $(PYTHON312) -m venv $(VENV312) && $(PY312) -m pip install -q --upgrade pip; }
	$(PY312) -m pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS)
	$(PY312) -m pip install -q "$(MCORE312)" -e ".[dev]"
	rm -f $(VENV312)/.installed-*
	touch $(STAMP312)

# The editable install points at this checkout (a kept venv may have served another clone).
install-py312: $(STAMP312)
	$(PY312) -m pip install -q --no-deps -e .

demo: $(STAMP)
	$(VENV)/bin/nbdiff demo

# lint-imports: the layer contract of docs/ARCHITECTURE.md (pyproject.toml [tool.importlinter]).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest $(PYTEST_ARGS)

# megatron-core's deprecation notices are shown and listed here (NBDIFF_SHOW_DEPRECATIONS=1): 0.19.x
# is where the next break shows first.
test-py312: install-py312
	$(PY312) -c "import sys, torch, megatron.core as m; print('python', sys.version.split()[0], \
		'torch', torch.__version__, 'megatron-core', m.__version__)"
	$(VENV312)/bin/lint-imports --no-cache
	NBDIFF_SHOW_DEPRECATIONS=1 $(PY312) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build *.egg-info $(VENV) $(VENV312)
