PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := $(BIN)/pip --disable-pip-version-check -q

.PHONY: setup export verify test test-fast bench bench-arm clean arm64

# The virtual environment is (re)built whenever pyproject.toml changes. pip compiles every module it installs
# one file after the other; compileall does it on every core (`-j 0`), and, like pip, passes over the few files
# that do not compile (torch's examples of Python 3.12 syntax; docs/scale.md).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --no-compile -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	site="$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" && test -d "$$site" \
		&& { $(BIN)/python -m compileall -qq -j 0 "$$site" || true; }
	$(BIN)/python -c "import edgeq, torch, onnxruntime" 
	touch $(STAMP)

setup: $(STAMP)

export: $(STAMP)
	$(BIN)/edgeq export --out artifacts

verify: $(STAMP)
	$(BIN)/edgeq verify artifacts --json reports/verify.json --markdown reports/verify.md --plot reports/verify.png

# An emulated arm64 Debian (qemu-user + mmdebstrap) with onnxruntime's aarch64 build, for the device
# checker on ARM kernels (tests/test_arm.py). Idempotent; needs root; docs/device.md.
ARM64_ROOTFS := .arm64/rootfs
arm64: $(STAMP)
	ORT_VERSION=$$(sed -n 's/.*"onnxruntime==\([^"]*\)".*/\1/p' pyproject.toml) \
	NUMPY_VERSION=$$($(BIN)/python -c "import numpy; print(numpy.__version__)") \
	PIP="$(BIN)/python -m pip" bash tools/arm64-env.sh $(ARM64_ROOTFS)

# the whole suite on every core (pytest-xdist: each test file runs whole on one worker); DEVELOPMENT.md
test: $(STAMP) arm64
	$(BIN)/python -m pytest -n auto --dist loadfile --no-loadscope-reorder

# the inner loop: everything but the end-to-end MNIST export, emulated ARM and Ray clusters
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n auto --dist loadfile --no-loadscope-reorder -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py --json reports/bench.json
	$(BIN)/python benchmarks/byom.py --out artifacts-byom --json reports/byom.json
	$(BIN)/python benchmarks/hardcase.py --out artifacts-hardcase
	$(BIN)/python benchmarks/pte.py --json reports/pte.json

# resnet18 exported for x86 and arm64 and checked on emulated ARM kernels (about 45 min: qemu is slow)
bench-arm: $(STAMP) arm64
	$(BIN)/python benchmarks/arm.py --out artifacts-arm --json reports/arm.json

clean:
	rm -rf $(VENV) reports .pytest_cache artifacts-byom artifacts-hardcase artifacts-arm
