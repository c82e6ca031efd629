"""Reports on what factorization buys: theoretical costs (costs.py) and measured speed — per conv
layer and whole model (timing.py, report.py; rendered by render.py) — and speed-aware ranks that
factorize only where it is measured faster (speed_aware.py). `python -m lowrank_dist.speed`.

Nothing is imported here, so `python -m lowrank_dist.speed.costs` runs its module once (runpy warns
when a package has already imported the module it is asked to run)."""
