"""Valid ranges of the numeric options that are not plan settings (the Plan model checks
those), declared once for the command line, the library and the pipeline, and checked before
any work."""

from __future__ import annotations

from cockatoo_lib.errors import CockatooError

# name -> (lowest, highest or None); a float bound allows any number, an int only whole ones
RANGES: dict[str, tuple[float, float | None]] = {
    "seed": (0, 2**32 - 1),  # numpy's generators take no negative seed
    "max_samples": (0, None),  # 0: all rows
    "max_train_rows": (0, None),  # 0: the whole train split
    "gpus": (0, 64),
    "processes": (1, 64),
    "nodes": (1, 256),
    "keep_checkpoints": (0, 1000),
    "retries": (0, 20),
    "gpu_memory_gib": (1.0, 1024.0),
    "batch_size": (1, 65536),  # predict's
    "shard_rows": (1, 100_000_000),  # predict's, into a folder
    "shards": (1, 10_000),  # the score pipeline's pods
    "parallelism": (0, 10_000),  # of its shards at once; 0: all
    "http_port": (1, 65535),
    # The promote gate's rules, in macro-F1 and F1 points.
    "min_improvement": (-1.0, 1.0),
    "min_gain_over_baseline": (-1.0, 1.0),
    "max_label_drop": (0.0, 1.0),
}


# Pixels an image may have, read from its header before anything is decoded (prepare, predict,
# serve; a server may set less). Far below Pillow's own limit (about 179 million): a 164 kB PNG
# of 20,000 x 20,000 pixels decodes to 1.6 GB. 25 million holds a 6000 x 4000 camera photo; the
# model reads 224 x 224.
MAX_IMAGE_PIXELS = 25_000_000


def check_range(name: str, value, shown: str | None = None) -> None:
    low, high = RANGES[name]
    whole_only = isinstance(low, int)
    kind = (int,) if whole_only else (int, float)
    valid = isinstance(value, kind) and not isinstance(value, bool)
    if not valid or value < low or (high is not None and value > high):
        bound = f"from {low:g} to {high:g}" if high is not None else f"of at least {low:g}"
        if whole_only:  # no exponent in a seed's bound
            bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise CockatooError(f"{shown or name} must be a {'whole ' if whole_only else ''}number {bound}; "
                            f"got {value!r}")
