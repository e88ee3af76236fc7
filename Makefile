# restorer: the commands a user and CI run. `make help` lists them.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch that this kind of machine keeps on local disk; GPU users
# install the torch build for their CUDA first, and `pip install -e .` keeps it.
TORCH_CPU ?= torch==2.13.0
SHARDS ?= data/shards
RUN ?= runs/demo

.PHONY: help setup shards test lint bench bench-model-choice gpu-check demo release-weights release-estimator bench-realworld slurm-up slurm-down slurm-status clean

help:
	@echo "make setup   create $(VENV), install torch (CPU wheel here) and restorer[dev]"
	@echo "make shards  build WebDataset shards into $(SHARDS) (embedded default images; ARGS='--bsds PATH ...')"
	@echo "make test    run the test suite (what CI runs; PYTEST_ARGS=... to choose tests)"
	@echo "make lint    ruff check + ruff format --check (whole tree) and mypy on restorer shard_tools launch (pyproject.toml)"
	@echo "make bench   run four of the bench/ scripts in turn: shards.py, loader.py, train_step.py, restore.py (docs/benchmarks.md lists all of them)"
	@echo "make demo    shards -> 2-process CPU training -> eval -> comparison picture (about 3.5 min with native bf16, 5.5 min in fp32, 2 cores)"
	@echo "make bench-model-choice  train each candidate network/loss for the same time budget, eval on BSDS500 test (26 min on 2 CPU cores, 2026-11-26)"
	@echo "make release-weights NAME=fast|quality  train a packaged model by launch/configs/release_NAME.yaml (release 2: fine-tunes of launch/init/NAME-v1, 7.3 / 15.5 min on 2 CPU cores in fp32), make its card (36 min for quality), install it in restorer/weights"
	@echo "make slurm-up | slurm-down | slurm-status  a 2-node SLURM cluster on this host for launch/slurm/train.sbatch (root; apt-get install slurmctld slurmd slurm-client munge)"
	@echo "make release-estimator  train the quality estimator (launch/configs/release_estimator.yaml) and install it in restorer/weights"
	@echo "make bench-realworld NAME=fast|quality  default restore vs the oracle on re-saved BSDS500 test photos (bench/realworld.py)"
	@echo "make gpu-check  one CUDA GPU: model/loader/training/eval/24 MP restore figures side by side (meant for <= 8 min, not yet timed on a GPU; BSDS=PATH)"

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

shards: setup
	$(BIN)/python -m shard_tools build --out $(SHARDS) $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The same checks run on each commit once contributors install .pre-commit-config.yaml.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy restorer shard_tools launch

bench: setup
	$(BIN)/python bench/shards.py
	$(BIN)/python bench/loader.py
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/restore.py

demo: setup
	$(BIN)/python launch/demo.py --run-dir $(RUN)

bench-model-choice: setup
	$(BIN)/python -m shard_tools build --bsds ../shared/datasets/BSR --out data/bsr --max-samples 16
	$(BIN)/python bench/model_choice.py --shards data/bsr --minutes 2.5 --eval-images 200 --only default tiny unet-tiny --out runs/model_choice_200

# BSDS500 (BSR folder or BSR_bsds500.tgz); no network, no W&B; a tiny CPU smoke run without CUDA.
# No `setup` here: a GPU machine keeps the Python that has its CUDA torch (CHECK_PY=... to choose).
BSDS ?= ../shared/datasets/BSR
CHECK_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))
gpu-check:
	$(CHECK_PY) bench/gpu_check.py --bsds $(BSDS) --work-dir runs/gpu_check --json runs/gpu_check/gpu_check.json

# The packaged models (restorer/weights/NAME.*): shards -> training (resumes if killed) -> model card
# on the BSDS500 test split -> package. On GPUs: LAUNCH='$(BIN)/accelerate launch' (one process per GPU).
NAME ?= fast
LAUNCH ?= ACCELERATE_USE_CPU=true $(BIN)/accelerate launch --config_file launch/accelerate/cpu2.yaml
release-weights: setup
	$(BIN)/python -m shard_tools build --bsds $(BSDS) --out data/bsr --max-samples 16
	$(LAUNCH) launch/train.py --config launch/configs/release_$(NAME).yaml
	$(BIN)/python launch/model_card.py --weights runs/release_$(NAME)/model.safetensors --images $(BSDS) \
	    --json runs/release_$(NAME)/card.json
	$(BIN)/python launch/package_weights.py --run runs/release_$(NAME) --name $(NAME) \
	    --recipe launch/configs/release_$(NAME).yaml --bsr $(BSDS)

# A local SLURM cluster (munged, slurmctld, two slurmd on 127.0.0.1) to try launch/slurm/train.sbatch;
# `up` prints the SLURM_CONF to export. State and logs in $(SLURM_LOCAL_DIR).
SLURM_LOCAL_DIR ?= /tmp/restorer-slurm
slurm-up slurm-down slurm-status: export SLURM_LOCAL_DIR := $(SLURM_LOCAL_DIR)
slurm-up:
	bash launch/slurm/local_cluster.sh up
slurm-down:
	bash launch/slurm/local_cluster.sh down
slurm-status:
	bash launch/slurm/local_cluster.sh status

# The quality estimator of --quality auto (restorer/weights/estimator.safetensors): one CPU process.
release-estimator: setup
	$(BIN)/python -m shard_tools build --bsds $(BSDS) --out data/bsr --max-samples 16
	$(BIN)/python launch/train_estimator.py --config launch/configs/release_estimator.yaml
	$(BIN)/python bench/quality_rule.py --estimator runs/release_estimator/estimator.safetensors --images $(BSDS)
	cp runs/release_estimator/estimator.safetensors restorer/weights/estimator.safetensors

bench-realworld: setup
	$(BIN)/python bench/realworld.py --weights $(NAME) --images $(BSDS) --json runs/realworld_$(NAME).json

clean:
	rm -rf $(VENV) data runs .pytest_cache
