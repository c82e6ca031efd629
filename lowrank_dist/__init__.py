"""lowrank-dist: training low-rank-constrained CNNs (Tai et al., ICLR 2016) at scale."""

from .lowrank.svd import Decomposition, decompose_kernel, max_rank
from .lowrank.layers import LowRankConv2d

__version__ = "0.1.0"
__all__ = ["Decomposition", "LowRankConv2d", "decompose_kernel", "max_rank"]
