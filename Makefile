# dq_lightning: `make help` lists the targets. Every target installs the environment first if needed.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
# PyPI's Linux wheel of torch 2.13.0 is a CUDA build; for another CUDA or a CPU-only build pick PyTorch's index,
# e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu". environment.yml installs the same.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

TASK ?= demo
SCALE ?= tiny
DATA_DIR ?=
GPUS ?=
# make fit only: NODES=n runs torchrun for n nodes (the same command on every node; MASTER_ADDR = a host name of
# the first node, MASTER_PORT its rendezvous port), CONFIG the config file, ARGS more fit flags.
NODES ?=
CONFIG ?=
ARGS ?=
MASTER_ADDR ?=
MASTER_PORT ?= 29500
# make fit NODES=n: seconds the rendezvous waits for every node before it gives up with one error line.
RDZV_TIMEOUT ?= 600
TASKS := demo xsum cnn_dailymail eli5 wmt16_en_ro
RUNS := runs/$(TASK)

# Passed to `python -m dq_lightning` when set.
DATA_ARG := $(if $(DATA_DIR),--data.data_dir=$(DATA_DIR))
GPU_ARGS := $(if $(GPUS),--trainer.accelerator=gpu --trainer.devices=$(GPUS) --trainer.strategy=ddp)
# torchrun, after NODES, GPUS, MASTER_ADDR and the GPUs themselves are checked (dq_lightning.cluster).
TORCHRUN := $(PY) -m dq_lightning.cluster torchrun --nodes='$(NODES)' --gpus='$(GPUS)' \
	$(if $(MASTER_ADDR),--master='$(MASTER_ADDR):$(MASTER_PORT)') --timeout='$(RDZV_TIMEOUT)' --

.PHONY: help install test test-slow test-all teacher sweep sweep-id fit report check-task clean

help: ## List the targets
	@echo "usage: make <target> [TASK=$(TASK)] [SCALE=$(SCALE)] [DATA_DIR=dir] [GPUS=n] [WORKERS=auto|n]"
	@echo "       make fit CONFIG=experiments/<task>/<stage>.yaml [GPUS=n] [NODES=n MASTER_ADDR=host] [ARGS='--flag=value']"
	@echo "tasks: $(TASKS); scales: tiny (CPU), paper (bart-base / mbart-large-cc25 on GPUs)"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## Create .venv: torch first (TORCH=torch==2.13.0 by default), then the package + dev extras

# torch is installed alone first and then pinned, so that no later requirement replaces the build chosen
# with TORCH (the CPU wheel here, a CUDA one on a cluster).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install $(TORCH)
	$(PY) -m pip freeze | grep -i '^torch==' > $(VENV)/torch-constraint.txt
	$(PY) -m pip install --quiet -c $(VENV)/torch-constraint.txt -e ".[dev]"
	touch $@

test: $(STAMP) ## Fast offline test suite
	$(PY) -m pytest -q

test-slow: $(STAMP) ## Only the tests marked slow (CI runs `make test` then this)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP) ## All tests, including those marked slow
	$(PY) -m pytest -q -m ""

check-task:
	@case " $(TASKS) " in *" $(TASK) "*) ;; *) echo "error: unknown TASK=$(TASK); choose from $(TASKS)" >&2; exit 2;; esac
	@case "$(SCALE)" in tiny|paper) ;; *) echo "error: unknown SCALE=$(SCALE); choose tiny or paper" >&2; exit 2;; esac
	@if [ -n "$(DATA_DIR)" ] && [ ! -d "$(DATA_DIR)" ]; then echo "error: DATA_DIR=$(DATA_DIR) is not a directory" >&2; exit 2; fi

teacher: check-task $(STAMP) ## Train the teacher of TASK at SCALE (skipped when runs/TASK/teacher-SCALE/hf exists)
	@$(MAKE) --no-print-directory $(RUNS)/teacher-$(SCALE)/hf/config.json

# A task with experiments/TASK/pretrain-SCALE.yaml gets a denoising pre-training stage first (the CPU-scale
# recipe for from-scratch teachers); with DATA_DIR in the ../shared/data layout, the other benchmarks' training
# text beside it joins the pre-training text.
PRETRAIN_CONFIG := experiments/$(TASK)/pretrain-$(SCALE).yaml
PRETRAIN_HF := $(RUNS)/pretrain-$(SCALE)/hf
HAS_PRETRAIN := $(wildcard $(PRETRAIN_CONFIG))
SIBLING_TEXT := cnn_dailymail/train.jsonl:article eli5/train.jsonl:answer wmt16_en_ro/train.jsonl:translation.en \
	xsum/train.jsonl:document
comma := ,
empty :=
space := $(empty) $(empty)
# A task's own training targets join its pre-training text where the sources alone are not the language the
# model must write: ELI5's questions are one line, en-ro's sources are English.
OWN_TEXT_eli5 := eli5/train.jsonl:answer
OWN_TEXT_wmt16_en_ro := wmt16_en_ro/train.jsonl:translation.ro
EXTRA_TEXT := $(if $(DATA_DIR),$(foreach c,$(SIBLING_TEXT),$(if $(filter-out $(TASK),$(firstword $(subst /, ,$(c)))),\
	$(if $(wildcard $(DATA_DIR)/../$(firstword $(subst :, ,$(c)))),$(DATA_DIR)/../$(c)))) \
	$(foreach c,$(OWN_TEXT_$(TASK)),$(DATA_DIR)/$(subst $(TASK)/,,$(c))))
EXTRA_TEXT_ARG := $(if $(strip $(EXTRA_TEXT)),--data.extra_text=[$(subst $(space),$(comma),$(strip $(EXTRA_TEXT)))])
FROM_PRETRAIN := $(if $(HAS_PRETRAIN),--model.model=$(PRETRAIN_HF) --data.tokenizer=$(PRETRAIN_HF))
# A fit refuses a run folder holding an earlier run unless it continues it (README, "When things go wrong"):
# a stage killed half-way continues from its last.ckpt when `make` is run again. Expanded when the recipe runs.
RESUME = $(if $(wildcard $(1)/checkpoints/last.ckpt),--ckpt_path=last)

$(PRETRAIN_HF)/config.json: | $(STAMP)
	$(PY) -m dq_lightning fit --config $(PRETRAIN_CONFIG) $(DATA_ARG) $(EXTRA_TEXT_ARG) $(GPU_ARGS) \
		$(call RESUME,$(RUNS)/pretrain-$(SCALE))

$(RUNS)/teacher-$(SCALE)/hf/config.json: | $(STAMP)
	$(if $(HAS_PRETRAIN),@$(MAKE) --no-print-directory $(PRETRAIN_HF)/config.json)
	$(PY) -m dq_lightning fit --config experiments/$(TASK)/teacher-$(SCALE).yaml $(DATA_ARG) $(GPU_ARGS) $(FROM_PRETRAIN) \
		$(call RESUME,$(RUNS)/teacher-$(SCALE))
	$(PY) -m dq_lightning test --config experiments/$(TASK)/teacher-$(SCALE).yaml $(DATA_ARG) $(GPU_ARGS) \
		--model.model=$(RUNS)/teacher-$(SCALE)/hf --data.tokenizer=$(RUNS)/teacher-$(SCALE)/hf
	$(if $(or $(DATA_DIR),$(filter demo,$(TASK))),$(PY) -m dq_lightning baseline --task $(TASK) \
		$(if $(DATA_DIR),--data-dir $(DATA_DIR)) --run $(RUNS)/teacher-$(SCALE))

# TEST_FILE=path (make sweep / make report): also test every finished run and the teacher on that file.
TEST_FILE ?=
# ROBUSTNESS=rate (make sweep): also score the teacher and every run on test sources with that share of words
# perturbed (python -m dq_lightning robustness); results.csv gains robust<rate>/... columns.
ROBUSTNESS ?=
# WORKERS=n runs trained at once; auto: one per core without GPUs (each with its share of the cores), else one.
WORKERS ?= auto
SWEEP_ARGS := --task $(TASK) --scale $(SCALE) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(if $(GPUS),--gpus $(GPUS)) \
	$(if $(TEST_FILE),--test-file $(TEST_FILE)) $(if $(ROBUSTNESS),--robustness $(ROBUSTNESS)) --workers $(WORKERS)

# --preflight first: a malformed sweep file, missing data while offline or GPUs the machine lacks is one error
# line before the teacher is trained, not after.
sweep: check-task $(STAMP) ## Teacher if missing, then the grid of DQ students; results in runs/TASK/sweep/
	@$(PY) -m dq_lightning sweep $(SWEEP_ARGS) --preflight
	@$(MAKE) --no-print-directory $(RUNS)/teacher-$(SCALE)/hf/config.json
	$(PY) -m dq_lightning sweep $(SWEEP_ARGS)

# One elastic DQ supernet for the whole curve (experiments/TASK/supernet-SCALE.yaml: the sweep grid's quantized dq
# points), teacher first if missing; then every point extracted (FINETUNE=n: and fine-tuned n steps) and tested
# beside the trained points.
FINETUNE ?=
SUPERNET_RUN := $(RUNS)/supernet-$(SCALE)
.PHONY: supernet
supernet: check-task $(STAMP) ## Teacher if missing, one supernet fit, then every point extracted and tested; runs/TASK/sweep/
	@$(PY) -m dq_lightning sweep $(SWEEP_ARGS) --preflight
	@$(MAKE) --no-print-directory $(RUNS)/teacher-$(SCALE)/hf/config.json
	@$(MAKE) --no-print-directory $(SUPERNET_RUN)/fit_metrics.json
	$(PY) -m dq_lightning sweep $(SWEEP_ARGS) --from-supernet $(SUPERNET_RUN) $(if $(FINETUNE),--finetune-steps $(FINETUNE))

# A supernet killed half-way continues from its last.ckpt when `make supernet` is run again.
$(SUPERNET_RUN)/fit_metrics.json: | $(STAMP)
	$(PY) -m dq_lightning fit --config experiments/$(TASK)/supernet-$(SCALE).yaml $(DATA_ARG) $(GPU_ARGS) \
		$(call RESUME,$(SUPERNET_RUN))

# The genetic search of the teacher layers a DEPTH (encoder-decoder) x BITS (W-E-A) student copies, teacher first
# if missing; the same command continues a killed search. ARGS: more search-map flags (e.g. ARGS='--steps 40').
DEPTH ?= 6-3
BITS ?= 2-2-8
.PHONY: search-map
SEARCH_ARGS = --config experiments/$(TASK)/dq-$(SCALE).yaml --depth $(DEPTH) --bits $(BITS) \
	$(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(ARGS)
search-map: check-task $(STAMP) ## Search the layer map of a DEPTH=6-3 BITS=2-2-8 student; runs/TASK/search-map/
	@$(PY) -m dq_lightning search-map $(SEARCH_ARGS) --preflight
	@$(MAKE) --no-print-directory $(RUNS)/teacher-$(SCALE)/hf/config.json
	$(PY) -m dq_lightning search-map $(SEARCH_ARGS)

# An online sweep across machines: create it once here, then one `wandb agent` per machine
# (experiments/cluster/slurm-sweep.sbatch runs them as a SLURM job array).
sweep-id: check-task $(STAMP) ## Create the W&B sweep of TASK at SCALE once and keep its id (for agents on several machines)
	$(PY) -m dq_lightning.cluster sweep-id --task $(TASK) --scale $(SCALE)

# Without NODES, Lightning starts the GPUS processes of this machine itself; with NODES, torchrun does, on every
# node (Lightning reads the ranks torchrun sets). global_batch_size keeps the paper configs' 16 sequences per step.
fit: $(STAMP) ## One fit of CONFIG=file [GPUS=n per node] [NODES=n: torchrun, run on every node] [ARGS=...]
	@if [ -z "$(CONFIG)" ] || [ ! -f "$(CONFIG)" ]; then echo "error: CONFIG=$(CONFIG) is not a config file; e.g. CONFIG=experiments/xsum/dq-paper.yaml" >&2; exit 2; fi
	$(if $(NODES),$(TORCHRUN),$(PY) -m dq_lightning) fit --config $(CONFIG) $(DATA_ARG) $(GPU_ARGS) \
		$(if $(NODES),--trainer.num_nodes=$(NODES)) $(ARGS)

report: check-task $(STAMP) ## Rebuild results.csv, tradeoff.png and report.md from finished runs [TEST_FILE=path: on that test set]
	$(PY) -m dq_lightning sweep $(SWEEP_ARGS) --report-only

clean: ## Remove runs/, caches and the virtual environment
	rm -rf runs wandb lightning_logs .cache $(VENV)
