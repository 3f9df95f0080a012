"""Check that the installed dependencies are the versions pyproject.toml pins.

The images run `python -m cockatoo_lib.versions` as their last build step, so an image that
drifted from the pins fails to build instead of training with other versions.
"""

from __future__ import annotations

import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

DISTRIBUTION = "cockatoo-pipelines"


def pinned() -> dict[str, SpecifierSet]:
    """name -> specifier for every pinned requirement of the installed project, extras and
    environment markers included (an extra's requirements only where that extra is installed)."""
    pins = {}
    for line in metadata.requires(DISTRIBUTION) or []:
        requirement = Requirement(line)
        if not any(spec.operator in ("==", "===") for spec in requirement.specifier):
            continue
        if requirement.marker is not None and "extra" in str(requirement.marker):
            try:
                metadata.version(requirement.name)
            except metadata.PackageNotFoundError:
                continue
        elif requirement.marker is not None and not requirement.marker.evaluate():
            continue
        pins[requirement.name] = requirement.specifier
    return pins


def mismatches() -> list[str]:
    problems = []
    for name, specifier in pinned().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            problems.append(f"{name}: pinned {specifier}, not installed")
            continue
        # PEP 440: a local version such as torch's 2.13.0+cpu matches ==2.13.0.
        if not specifier.contains(installed, prereleases=True):
            problems.append(f"{name}: pinned {specifier}, installed {installed}")
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
