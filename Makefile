# The two quick-start commands (README) and the bootstrap they share.
#   make demo   — the main job on the embedded default (no ImageNet, SLURM or GPU needed)
#   make costs  — the per-layer cost tables of the low-rank models
#   make test   — the test suite (what .ci/run runs)
# `make setup` creates .venv and installs the project with every extra; it re-runs only when
# pyproject.toml changed, so the two commands above are quick the second time.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: setup demo costs test bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: DeepSpeed's sdist imports torch while it builds (hence --no-build-isolation below).
	$(PY) -m pip install -q "torch>=2.3" "torchvision>=0.18" setuptools wheel
	$(PY) -m pip install -q --no-build-isolation -e '.[dali,deepspeed,submitit,export,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

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

bench: setup
	$(PY) bench/decompose_vgg16.py

clean-venv:
	rm -rf $(VENV)
