"""Check that the installed dependencies are the versions pyproject.toml pins, and that torch is
the build an image declares.

The images run `python -m cockatoo_lib.versions` as their last build step, so an image that
drifted from the pins, or whose torch is another build than it promises (the CPU image with
CUDA torch, the CUDA image with another CUDA), fails to build instead of training with them.
"""

from __future__ import annotations

import os
import re
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


# What an image promises about torch: "cpu", or "cuda" and the CUDA major ("cuda13").
TORCH_BUILD_ENV = "COCKATOO_TORCH_BUILD"


def torch_build_problem(declared: str, torch_cuda: str | None) -> str | None:
    """Why torch's build (its `torch.version.cuda`, None for the CPU build) is not `declared`."""
    found = f"cuda{torch_cuda.split('.')[0]}" if torch_cuda else "cpu"
    if not re.fullmatch(r"cpu|cuda\d+", declared):
        return f"{TORCH_BUILD_ENV}={declared!r} is neither 'cpu' nor 'cuda' and a CUDA major, e.g. 'cuda13'"
    if found != declared:
        built = f"CUDA {torch_cuda}" if torch_cuda else "no CUDA (the CPU build)"
        return f"torch: this image declares {TORCH_BUILD_ENV}={declared}, but its torch has {built}"
    return None


def main() -> int:
    problems = mismatches()
    declared = os.environ.get(TORCH_BUILD_ENV)
    if declared:
        import torch

        problem = torch_build_problem(declared, torch.version.cuda)
        problems += [problem] if problem else []
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        build = f"; torch is the {declared} build this image declares" if declared else ""
        print(f"all {len(pinned())} pinned dependencies installed at their pinned versions{build}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
