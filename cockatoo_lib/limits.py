"""Valid ranges of the numeric options that are not plan settings (the Plan model checks
those), declared once for the command line, the library and the pipeline, and checked before
any work."""

from __future__ import annotations

from cockatoo_lib.errors import CockatooError

# name -> (lowest, highest or None)
RANGES: dict[str, tuple[int, int | None]] = {
    "seed": (0, 2**32 - 1),  # numpy's generators take no negative seed
    "max_samples": (0, None),  # 0: all rows
    "gpus": (0, 64),
}


def check_range(name: str, value, shown: str | None = None) -> None:
    low, high = RANGES[name]
    whole = isinstance(value, int) and not isinstance(value, bool)
    if not whole or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise CockatooError(f"{shown or name} must be a whole number {bound}; got {value!r}")
