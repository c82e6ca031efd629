# The two quick-start commands (README) and the bootstrap they share.
#   make demo   — the main job on the embedded default (no ImageNet, SLURM or GPU needed)
#   make costs  — the per-layer cost tables of the low-rank models
#   make test   — the test suite (what .ci/run runs)
#   make test-floor — the version-sensitive tests on the oldest supported versions (.ci/run too)
#   make test-recipes — the paper recipes too slow for `make test`, trained on real digits (.ci/run too)
# `make setup` creates .venv and installs the project with every extra; it re-runs only when
# pyproject.toml changed, so the two commands above are quick the second time.

PYTHON ?= python3
comma  := ,
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: setup setup-floor demo costs test test-floor test-recipes bench clean-venv

# The project with every extra into the venv whose python is $(1), with pip options $(2).
# The core dependencies (torch among them, at pyproject.toml's bounds) go first: DeepSpeed's sdist
# imports torch while it builds (hence --no-build-isolation).
define install
	$(1) -m pip install -q $(2) setuptools wheel
	$(1) -m pip install -q $(2) --no-build-isolation -e .
	$(1) -m pip install -q $(2) --no-build-isolation -e '.[dali,deepspeed,submitit,dev$(3)]'
endef

setup: $(STAMP)

# .venv gets every extra; the floor venv (below) all but export: no floor test exports.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(call install,$(PY),,$(comma)export)
	rm -f $(VENV)/.installed-*
	touch $@

# The supported-versions floor: a second venv with every dependency at pyproject.toml's lower
# bound (.ci/floor_pins.py). pins.txt keeps its date unless the list changes, so the venv is made
# again from nothing only when a floor moves.
FLOOR    := .venv-floor
FLOOR_PY := $(FLOOR)/env/bin/python

$(FLOOR)/pins.txt: pyproject.toml .ci/floor_pins.py
	mkdir -p $(FLOOR)
	$(PYTHON) .ci/floor_pins.py > $@.new
	if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi

$(FLOOR)/installed: $(FLOOR)/pins.txt
	rm -rf $(FLOOR)/env $@
	$(PYTHON) -m venv $(FLOOR)/env
	$(call install,$(FLOOR_PY),-c $(FLOOR)/pins.txt)
	touch $@

setup-floor: $(FLOOR)/installed

# The demo: a learnable synthetic JPEG set in ImageNet layout (made once), then the debug low-rank
# model trained on it on the CPU (or the GPU if there is one); prints top-1/top-5 and where the
# checkpoints and TensorBoard logs are. Running it again resumes (or just re-evaluates) that run.
demo: setup
	test -d data/synthetic/train || $(PY) -m lowrank_dist.data.synthetic --out data/synthetic
	$(PY) -m lowrank_dist.train --config configs/debug.yaml

# Per-layer theoretical costs (MACs, parameters) of every low-rank model.
costs: setup
	$(PY) -m lowrank_dist.speed.costs

test: setup
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q

# The tests that touch version-sensitive APIs, on the floor versions: the guards' both paths, DDP
# (options, comm hook, torch.compile) and DeepSpeed ZeRO-2 (step by step against DDP, resumed from
# its shards) through the real launcher, checkpoint loading (weights_only, safe_globals), the
# trainer (stopped by a signal and resumed exactly, SkippingSGD, its loop's host syncs), both data
# back-ends.
FLOOR_TESTS := tests/test_floor.py tests/test_safe_loading.py tests/test_data.py tests/test_host_syncs.py \
	tests/test_distributed.py::test_ddp_options_keep_the_numerics_and_bf16_compression_stays_close \
	'tests/test_distributed.py::test_evaluation_counts_every_val_image_once_across_ranks[2-dali]' \
	tests/test_reliability.py::test_a_stop_signal_checkpoints_the_current_step_and_the_resume_is_exact \
	tests/test_train.py::test_skipping_sgd_is_torch_sgd_and_skips_a_non_finite_update_on_the_device \
	tests/test_launch.py::test_local_two_processes_match_one_process \
	'tests/test_launch.py::test_deepspeed_zero_matches_ddp_step_by_step_and_resumes[2]'

# TORCH_EXTENSIONS_DIR: DeepSpeed's C++ op, built once for the floor's torch and kept with its venv
# (the default folder is shared with .venv's torch, and each would rebuild it for the other).
test-floor: setup-floor
	FLOOR_PINS=$(FLOOR)/pins.txt TORCH_EXTENSIONS_DIR=$(abspath $(FLOOR))/env/torch_extensions \
		$(FLOOR_PY) -m pytest -q $(FLOOR_TESTS)

# The paper recipes marked slow in tests/test_paper_recipes.py (several CPU-minutes each; docs/paper.md).
test-recipes: setup
	$(PY) -m pytest -q -m slow tests/test_paper_recipes.py

bench: setup
	$(PY) bench/decompose_vgg16.py

clean-venv:
	rm -rf $(VENV) $(FLOOR)
