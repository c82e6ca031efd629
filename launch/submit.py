#!/usr/bin/env python
"""Submit a training run to SLURM through submitit, or run it here: `python launch/submit.py --help`.

The command itself is lowrank_dist/launch/cli.py (also `python -m lowrank_dist.launch`). This file
lets it run from a checkout as the README types it, with whichever `python` is on the PATH: an
interpreter without the project's packages re-runs this command under the checkout's .venv (made
by `make setup`), or says in one line how to get one.
"""

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
VENV_PYTHON = VENV / "bin" / "python"


def packages_missing() -> list[str]:
    return [name for name in ("torch", "yaml", "pydantic") if importlib.util.find_spec(name) is None]


if __name__ == "__main__":
    missing = packages_missing()
    if missing and VENV_PYTHON.exists() and Path(sys.prefix).resolve() != VENV.resolve():  # not already in it
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), __file__, *sys.argv[1:]])
    if missing:
        print(f"error: {sys.executable} lacks {', '.join(missing)}: run `make setup` in {ROOT} once (it makes .venv,"
              " which this command then uses by itself), or activate an environment with the project installed",
              file=sys.stderr)
        sys.exit(2)
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing
    from lowrank_dist.launch.cli import main

    sys.exit(main())
