"""lowrank-dist: training low-rank-constrained CNNs (Tai et al., ICLR 2016) at scale."""

__version__ = "0.1.0"
__all__ = ["Decomposition", "LowRankConv2d", "decompose_kernel", "max_rank"]

REQUIRED = ("torch", "numpy", "yaml", "pydantic")  # what every command imports first


def _commands_need_their_packages() -> None:
    """`python -m lowrank_dist.X`, typed as the README writes it from a checkout with a `python` that
    lacks the project's packages (no venv activated): re-run it under the checkout's .venv (made by
    `make setup`) where there is one, else say in one line how to get one (exit 2), instead of a
    ModuleNotFoundError traceback. Only for commands: an import from Python code raises as usual."""
    import sys

    if sys.argv[:1] != ["-m"]:  # what runpy sets while it imports the package of `python -m`
        return
    import importlib.util
    import os
    from pathlib import Path

    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if not missing:
        return
    root = Path(__file__).resolve().parents[1]
    venv = root / ".venv"
    python = venv / "bin" / "python"
    if python.exists() and Path(sys.prefix).resolve() != venv.resolve():
        os.execv(str(python), [str(python), *sys.orig_argv[1:]])
    print(f"error: {sys.executable} lacks {', '.join(missing)}: run `make setup` in {root} once (it makes .venv, which"
          " the commands then use by themselves), or activate an environment with the project installed", file=sys.stderr)
    sys.exit(2)


_commands_need_their_packages()


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
