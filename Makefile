# webdistill — `make all` runs the whole demo, `make test` the test suite. `make help` lists targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# GPU=1: faiss-gpu instead of faiss-cpu (torch's wheel is the same for both: it runs on CPU and CUDA)
FAISS := $(if $(GPU),gpu,cpu)
OTHER_FAISS := $(if $(GPU),cpu,gpu)
STAMP := $(VENV)/.webdistill-installed-$(FAISS)
# SCENARIO=textile: the textile-inspection demo (configs/textile.yaml, runs/textile) instead of the digits
SCENARIO ?= digits
CONFIG ?= $(if $(filter textile,$(SCENARIO)),configs/textile.yaml,configs/demo.yaml)
# synthetic pool sizes of the filter benchmark; 1000000 adds ~10 minutes
FILTER_SIZES ?= 100000
RUN_DIR ?= $(if $(filter textile,$(SCENARIO)),runs/textile,runs/demo)
# `python -m pipeline` runs the code of this checkout (not another editable install)
WD := $(PY) -m pipeline
# SET="key=value …": config overrides for the demo, its teacher, the run and the bench, e.g.
# make all SET="synthesize.steps=10 distill.epochs=2" (a quicker, weaker demo)
OVERRIDES := $(foreach s,$(SET),--set $(s))

# No hub or update checks at run time: everything loads from local files.
export HF_HUB_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled

STAGES := crawl score filter synthesize perturb distill evaluate report

.PHONY: help setup demo-data teacher all test bench bench-rebuild bench-stages bench-variants bench-synthesis bench-scale gpu-check status clean $(STAGES)

help:  ## list the targets
	@grep -hE '^([a-zA-Z_-]+|\$$\(STAGES\)):.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/; s/^\$$\(STAGES\)/$(STAGES)/' | \
	  awk -F'\t' '{printf "  %-24s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install webdistill (GPU=1: with faiss-gpu; a stamp file skips it next time)

$(STAMP): pyproject.toml constraints.txt
	@free_kb=$$(df -Pk . | awk 'NR==2 {print $$4}'); [ "$$free_kb" -gt 9000000 ] || echo "warning: \
	$$((free_kb / 1024)) MiB free on this disk; the install needs about 9 GiB (torch's CUDA build runs on \
	CPU too and brings its nvidia packages): pip may fail with 'No space left on device'" >&2
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# the two FAISS builds share the module's files: drop the other one, then (re)install this one whole
	rm -f $(VENV)/.webdistill-installed-$(OTHER_FAISS)
	if $(PY) -m pip show --quiet faiss-$(OTHER_FAISS) 2>/dev/null; then $(PY) -m pip uninstall --quiet -y \
	  faiss-$(OTHER_FAISS) && $(PY) -m pip install --quiet --force-reinstall --no-deps -c constraints.txt faiss-$(FAISS); fi
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,$(FAISS)]'
	$(PY) -m pip check
	touch $@

demo-data: setup  ## build the demo: private MNIST split, 10k-image web pool, URL list
	$(WD) demo-data $(CONFIG) $(OVERRIDES)

teacher: demo-data  ## train the demo teacher on the private train split (skipped when up to date)
	$(WD) demo-teacher $(CONFIG) $(OVERRIDES)

all: teacher  ## set up, build the demo and its teacher, run every stage of the pipeline, print the status
	$(WD) run $(CONFIG) $(OVERRIDES)

$(STAGES): setup  ## re-run one stage (add FORCE=1 to re-run a done one)
	$(WD) $@ $(if $(wildcard $(RUN_DIR)/config.yaml),$(RUN_DIR),$(CONFIG)) $(if $(FORCE),--force) $(OVERRIDES)

status: setup  ## show which stages of runs/demo are done, stale or missing
	$(WD) status $(RUN_DIR)

test: setup  ## run the test suite
	$(PY) -m pytest -q

bench: teacher  ## methods × 5 seeds on the scenario's web (bench/results/methods.md; textile: bench/results/textile/), ≤ 1 h each
	$(WD) bench $(CONFIG) $(OVERRIDES)

# A second build of the digits demo (another pool sample, another teacher initialisation): its own folders
# and port, the same settings otherwise, so the headline's spread across builds is measured, not assumed.
REBUILD := demo_data_seed1
REBUILD_SET := --set demo.seed=1 --set demo.dir=$(REBUILD) --set data.url_list=$(REBUILD)/web_urls.parquet \
  --set data.serve_folder=$(REBUILD)/web --set data.serve_port=8767 --set teacher.spec_file=$(REBUILD)/teacher/spec.yaml \
  --set filter.diagnostics_sources=$(REBUILD)/web_sources.parquet --set 'evaluate.test_set=$(REBUILD)/private/test-*.tar' \
  --set evaluate.val_set=$(REBUILD)/private/train-000000.tar --set 'bench.upper_bound_data=$(REBUILD)/private/train-*.tar' \
  --set run_dir=runs/demo_seed1 --set bench.work_dir=bench/work/seed1 --set bench.results_dir=bench/results/rebuild
REBUILD_METHODS ?= upper_bound,pool_kd,filter_kd,webdistill

bench-rebuild: setup  ## the digits bench's headline rows on a second build of the demo (bench/results/rebuild/, ~20 min)
	$(WD) demo-data configs/demo.yaml $(REBUILD_SET)
	$(WD) demo-teacher configs/demo.yaml $(REBUILD_SET)
	$(WD) bench configs/demo.yaml --only $(REBUILD_METHODS) $(REBUILD_SET)

bench-stages: teacher  ## crawl vs raw img2dataset, score vs bare forward pass, filter vs brute-force kNN, distill vs in-memory loop
	$(PY) bench/bench_crawl.py --config $(CONFIG)
	$(PY) bench/bench_score.py --config $(CONFIG)
	$(PY) bench/bench_filter.py --config $(CONFIG) --sizes $(FILTER_SIZES)
	$(PY) bench/bench_distill.py --config $(CONFIG)

gpu-check: setup  ## one script, sized for ≤ 8 min on one GPU (not yet run on one): score, filter at 10M vectors, distill with AMP, 2-GPU torchrun → bench/results/gpu.md
	$(PY) bench/gpu_check.py

bench-scale: teacher  ## score → filter → perturb → distill's loader on generated pools of 100k and 1M images: time, peak memory
	$(PY) bench/bench_scale.py --config $(CONFIG) $(if $(SCALE_SIZES),--sizes $(SCALE_SIZES))

bench-variants: teacher  ## settings of filter + KD (budget, T, IPW, augmentation) × 2 seeds, judged on the private train split (~16 min)
	$(PY) bench/bench_variants.py --config $(CONFIG)

bench-synthesis: teacher  ## steps-to-quality of the hybrid (kept web images) vs DeepInversion from noise (~12 min on the digits)
	$(PY) bench/bench_synthesis.py --config $(CONFIG) --name $(SCENARIO)

clean:  ## remove run outputs and demo data (keeps .venv)
	rm -rf runs demo_data demo_data_seed1 demo_textile bench/work
