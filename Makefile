PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/pip --disable-pip-version-check -q

.PHONY: setup export verify test bench clean

# The virtual environment is (re)built whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import edgeq, torch, onnxruntime" 
	touch $(STAMP)

setup: $(STAMP)

export: $(STAMP)
	$(BIN)/edgeq export --out artifacts

verify: $(STAMP)
	$(BIN)/edgeq verify artifacts --json reports/verify.json --markdown reports/verify.md --plot reports/verify.png

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py --json reports/bench.json
	$(BIN)/python benchmarks/byom.py --out artifacts-byom --json reports/byom.json
	$(BIN)/python benchmarks/hardcase.py --out artifacts-hardcase

clean:
	rm -rf $(VENV) reports .pytest_cache artifacts-byom artifacts-hardcase
