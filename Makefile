PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: env demo test test-fast clean

$(BIN)/mmbalance: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

env: $(BIN)/mmbalance

demo: env
	$(BIN)/mmbalance bench --out runs/quick-bench
	$(BIN)/mmbalance train --dataset synthetic --method unimodal --out runs/quick-bench-x2-alone --overwrite --quiet method.modality=x2
	$(BIN)/mmbalance diagnose runs/quick-bench/synthetic/joint/seed0 --reference runs/quick-bench/synthetic/unimodal/seed0 --reference runs/quick-bench-x2-alone
	$(BIN)/mmbalance report runs/quick-bench/synthetic/joint/seed0
	@echo "reports: runs/quick-bench/report.html (every method) and runs/quick-bench/synthetic/joint/seed0/report.html (one run, with diagnostics)"

test: env
	$(BIN)/python -m pytest -q

test-fast: env
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs
