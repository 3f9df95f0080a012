"""Length-grouped batches: padding at the bound of sorting everything, a new order each epoch."""

from __future__ import annotations

import numpy as np
import pytest

from bench.harness import social_media_lengths
from cockatoo_lib.training.sampling import LengthGroupedShuffle, padding_share, sorted_bound


@pytest.mark.parametrize("rows", [300, 5_000, 200_000])
@pytest.mark.parametrize("batch_size", [8, 96])
def test_padding_stays_at_the_sorted_bound_at_any_size(rows, batch_size):
    lengths = social_media_lengths(rows, 512)
    order = list(LengthGroupedShuffle(lengths, batch_size, seed=42))
    assert sorted(order) == list(range(rows))  # every row once
    assert padding_share(lengths, order, batch_size) <= 1.25 * sorted_bound(lengths, batch_size) + 1e-12


def test_the_order_changes_each_epoch_and_follows_the_seed():
    lengths = social_media_lengths(2_000, 512)
    sampler = LengthGroupedShuffle(lengths, 32, seed=42)
    first, second = list(sampler), list(sampler)
    assert first != second
    again = LengthGroupedShuffle(lengths, 32, seed=42)
    assert list(again) == first and list(again) == second
    assert list(LengthGroupedShuffle(lengths, 32, seed=7)) != first
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_batches_hold_similar_lengths_and_only_the_last_is_short():
    lengths = np.array([5, 50, 6, 51, 7, 52, 8])
    order = list(LengthGroupedShuffle(lengths, 3, seed=1))
    batches = [order[i:i + 3] for i in range(0, len(order), 3)]
    assert sorted(map(sorted, batches[:2])) == [[1, 3, 5], [2, 4, 6]] and len(batches[-1]) == 1


def test_padding_share_by_hand():
    # Batches [4, 2] and [3]: 8 + 3 positions hold 9 tokens.
    assert padding_share([4, 2, 3], [0, 1, 2], 2) == pytest.approx(1 - 9 / 11)
    assert sorted_bound([4, 2, 3], 2) == pytest.approx(1 - 9 / 10)  # [4, 3], [2]


def test_training_draws_its_batches_from_it(tiny_models, tmp_path):
    from datasets import Dataset

    from cockatoo_lib.plan.catalogue import resolve_plan
    from cockatoo_lib.training.models import load_base_model
    from cockatoo_lib.training.trainer import CockatooTrainer, training_arguments

    plan = resolve_plan("deberta", {"base_model": str(tiny_models["deberta"]), "batch_size": 4})
    data = Dataset.from_dict({"input_ids": [[1] * n for n in (3, 9, 4, 8)], "length": [3, 9, 4, 8]})
    args = training_arguments(plan, str(tmp_path), cuda=False)
    trainer = CockatooTrainer(model=load_base_model(plan, ["a"]), args=args, train_dataset=data,
                              eval_dataset=data, plan=plan)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedShuffle) and sampler.batch_size == 4 and sampler.seed == plan.seed
