"""Check that the installed dependencies are the versions pyproject.toml pins.

The images run `python -m cockatoo_lib.versions` as their last build step, so an image that
drifted from the pins fails to build instead of training with other versions.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

DISTRIBUTION = "cockatoo-pipelines"


def pinned() -> dict[str, str]:
    """name -> version for every `name==version` requirement of the installed project
    (extras' requirements only where those extras are installed)."""
    pins = {}
    for requirement in metadata.requires(DISTRIBUTION) or []:
        if m := re.match(r"^([A-Za-z0-9_.\-]+)==([^;\s]+)\s*(;.*)?$", requirement):
            name, version, marker = m.groups()
            if marker and "extra" in marker:
                try:
                    metadata.version(name)
                except metadata.PackageNotFoundError:
                    continue
            pins[name] = version
    return pins


def mismatches() -> list[str]:
    problems = []
    for name, version in pinned().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}: pinned {version}, not installed")
            continue
        if installed.split("+")[0] != version:  # torch's +cpu / +cu128 build tags are fine
            problems.append(f"{name}: pinned {version}, installed {installed}")
    return problems


def main() -> int:
    problems = mismatches()
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        print(f"all {len(pinned())} pinned dependencies installed at their pinned versions")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
