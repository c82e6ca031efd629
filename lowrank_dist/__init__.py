"""lowrank-dist: training low-rank-constrained CNNs (Tai et al., ICLR 2016) at scale."""

__version__ = "0.1.0"
__all__ = ["Decomposition", "LowRankConv2d", "decompose_kernel", "max_rank"]


def __getattr__(name: str):
    """The API's names, imported when first used: `python -m lowrank_dist.train` then installs its
    signal handlers before torch is imported (seconds), not after."""
    if name in ("Decomposition", "decompose_kernel", "max_rank"):
        from .lowrank import svd

        return getattr(svd, name)
    if name == "LowRankConv2d":
        from .lowrank.layers import LowRankConv2d

        return LowRankConv2d
    raise AttributeError(f"module 'lowrank_dist' has no attribute {name!r}")
