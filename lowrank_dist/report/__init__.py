"""Reports on what factorization buys: theoretical costs (costs.py) and measured speed — per conv
layer and whole model (timing.py, speed.py; rendered by render.py) — and speed-aware ranks that
factorize only where it is measured faster (speed_aware.py). `python -m lowrank_dist.report`."""

from .speed import SpeedReport, speed_report
from .speed_aware import SpeedAwareRanks, speed_aware_ranks

__all__ = ["SpeedAwareRanks", "SpeedReport", "speed_aware_ranks", "speed_report"]
