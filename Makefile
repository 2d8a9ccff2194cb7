# Two entry points (see README): `make demo` and `make test`. Both create the
# virtual environment on first use; later runs reuse it (the stamp file tracks
# the inputs of the install).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench gpu-check clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "utune_fx needs Python >= 3.11, found " + sys.version.split()[0]'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

DEMO_MODEL := timm:vit_tiny_patch16_224?img_size=16&patch_size=4&depth=4&num_classes=10&global_pool=avg

demo: $(STAMP)
	$(BIN)/python cli.py inspect
	rm -rf runs/demo runs/demo-folded
	$(BIN)/python cli.py train "$(DEMO_MODEL)" --rules rules/dual_utuner.yaml --data digits -o runs/demo \
		--epochs 15 --lr 1e-2 --no-augment --label-smoothing 0
	$(BIN)/python cli.py fold runs/demo -o runs/demo-folded
	$(BIN)/python cli.py export runs/demo-folded -o runs/demo-folded/model.onnx

# Lint and format drift fail the run before the tests start (settings: [tool.ruff] in pyproject.toml).
# pytest-xdist: one worker per core (tests/conftest.py gives each one torch thread); the zoo samples
# are one test per model so that they spread over the workers.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n auto --dist worksteal

bench: $(STAMP)
	$(BIN)/python benchmarks/trace_depth.py

# The GPU proof (README "GPU check"): one GPU, under 8 minutes, random weights, no downloads; never part of
# `make test`. It stops at once, in one line, without a CUDA device. Extra options: GPU_CHECK_ARGS="--out F".
GPU_CHECK_ARGS ?=

gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --device cuda $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV)
