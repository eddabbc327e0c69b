# make test / make train work on a fresh clone: the first run creates .venv and installs the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test train test-slurm test-zoo bench-gpu wheelhouse lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -x -n 2 -q

# Launch tests against a real SLURM cluster: the one sinfo answers for, else ../shared/tools/slurm-local up 2
# (root), else they skip saying why.
test-slurm: $(STAMP)
	$(PY) -m pytest -m slurm -q tests/slurm

train: $(STAMP)
	$(PY) -m clip_train +experiment=demo
	@echo "Run report (loss, temperature, lr, samples/s and zero-shot accuracy plots; summary.md):"
	$(PY) -m clip_train.report --newest outputs

# Every GPU benchmark and CUDA-only check in under 8 minutes on one H100/H200; prints a markdown table for
# docs/benchmarks.md (python -m clip_train.bench.gpu --dry-run checks the plumbing on a CPU).
bench-gpu: $(STAMP)
	$(PY) -m clip_train.bench.gpu --out outputs/bench_gpu

# For a GPU node that has torch (and timm, torchvision, tensorboard, ...) but no network: the wheels of the
# pure-Python dependencies it usually lacks, for its Python (WHEEL_PYTHON), in .whl/. See docs/benchmarks.md.
WHEEL_PYTHON ?= 3.12
WHEELHOUSE_PINS := hydra-core==1.3.8 omegaconf==2.3.1 webdataset==1.0.2 braceexpand==0.1.7 ftfy==6.3.1 \
	wcwidth==0.9.4 open_clip_torch==3.3.0
wheelhouse: $(STAMP)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(WHEEL_PYTHON) \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $(WHEELHOUSE_PINS)
	$(PY) -m pip wheel --quiet --no-deps -w .whl antlr4-python3-runtime==4.9.3  # an sdist on PyPI
	@ls .whl

lint: $(STAMP)
	$(PY) -m ruff check clip_train tests

clean:
	rm -rf $(VENV) .pytest_cache outputs multirun

# Numeric parity with OpenCLIP over its whole model zoo (slow; not in CI): rewrites the table in docs/models.md;
# then the zoo tests outside CI's budget (app training of every timm family).
test-zoo: $(STAMP)
	$(PY) -m tests.zoo_parity
	$(PY) -m pytest -m zoo -q -n 2 tests
