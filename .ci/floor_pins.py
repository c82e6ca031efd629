"""Print the supported-versions floor as pip pins: every dependency of pyproject.toml (the extras
`make setup` installs included) at the lower bound written there, `name>=X` becoming `name==X`.

`make test-floor` installs exactly these in .venv-floor, so each lower bound in pyproject.toml is
a version the tests have run on, not a guess. A dependency without a `>=` bound is an error: the
floor would not be defined.
"""

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    raise SystemExit("error: .ci/floor_pins.py reads pyproject.toml with tomllib: run it with Python >= 3.11") from None

EXTRAS = ("dali", "deepspeed", "submitit", "dev")  # what `make setup` installs, but export (no floor test exports)
LOWER_BOUND = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*>=\s*([^\s,;]+)\s*$")


def floor_pins(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in EXTRAS:
        requirements += project["optional-dependencies"][extra]
    pins = []
    for requirement in requirements:
        match = LOWER_BOUND.match(requirement)
        if match is None:
            raise SystemExit(f"error: {pyproject}: dependency {requirement!r} is not 'name>=version': "
                             "the supported-versions floor needs one lower bound per dependency")
        pins.append(f"{match[1]}=={match[2]}")
    return pins


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    print("\n".join(floor_pins(root / "pyproject.toml")))
