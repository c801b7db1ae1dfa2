# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, install the package, run the whole workflow on the embedded demo data
#   make test   create .venv, install the package, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORES  ?= all

.PHONY: demo test test-fast test-slurm bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[test,slurm]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --show-failed-logs --configfile config.yaml
	$(BIN)/bestie show-metrics results/demo/metrics.json

# the suite in parallel, one process per core (pytest-xdist; each test module on one worker, in the order
# of tests/conftest.py: longest first), one torch thread per worker (Snakemake jobs inside the tests set
# their own, from the rule's threads)
TEST_WORKERS ?= auto

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not demo" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-slurm: $(STAMP)
	bash tests/slurm/run_slurm_test.sh

bench: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.run --out benchmarks/results/bench.json

clean:
	rm -rf results logs .snakemake
