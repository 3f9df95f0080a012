import logging

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from helpers import write_config

from cockatoo_lib.data.prepare import load_data_config, prepare
from cockatoo_lib.training.losses import asymmetric_loss
from cockatoo_lib.training.rebalance import Rebalance, band, label_weights, rebalance


def _labels(pos_rates, n=1000, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(pos_rates))) < pos_rates).astype(np.int8)
    return y, np.ones_like(y)


@pytest.mark.parametrize("method", ["inverse_frequency", "sqrt_inverse", "effective_num"])
def test_weights_favour_rare_labels_and_average_one(method):
    y, m = _labels([0.02, 0.2, 0.5])
    w = label_weights(y, m, Rebalance(weights=method))
    assert w.mean() == pytest.approx(1.0)
    assert w[0] > w[1] > w[2]


def test_sqrt_inverse_spreads_less_than_inverse_frequency():
    y, m = _labels([0.02, 0.5])
    spread = {k: (lambda w: w.max() / w.min())(label_weights(y, m, Rebalance(weights=k)))
              for k in ("inverse_frequency", "sqrt_inverse")}
    assert spread["sqrt_inverse"] == pytest.approx(np.sqrt(spread["inverse_frequency"]), rel=1e-6)


@pytest.mark.parametrize("ratio, expected", [(1, "safe"), (4.99, "safe"), (5, "caution"), (19, "caution"),
                                             (20, "dangerous"), (50, "critical"), (99, "critical"),
                                             (100, "extreme"), (1e4, "extreme")])
def test_bands(ratio, expected):
    assert band(ratio) == expected


def test_policies_resample_only_as_asked(caplog):
    y, m = _labels([0.02, 0.3])
    labels = ["scam", "toxicity"]
    none, info = rebalance(y, m, labels, Rebalance(), seed=0)
    assert (none == np.arange(len(y))).all() and info["learning_rate_scale"] == 1.0
    assert set(info["loss_weights"].values()) == {1.0}

    over, info = rebalance(y, m, labels, Rebalance(policy="oversampling"), seed=0)
    assert y[over, 0].mean() > 5 * y[:, 0].mean()  # the rare label's rows repeated
    assert info["train_rows_after"] == len(over) > len(y)

    under, _ = rebalance(y, m, labels, Rebalance(policy="undersampling"), seed=0)
    with_positive = y.any(axis=1)
    assert len(under) == 2 * with_positive.sum() and len(set(under)) == len(under)

    combined, _ = rebalance(y, m, labels, Rebalance(policy="combined"), seed=0)
    assert len(combined) > len(under)

    with caplog.at_level(logging.WARNING):
        same, info = rebalance(y, m, labels, Rebalance(policy="reweighting"), seed=0)
    assert len(same) == len(y) and info["band"] in ("caution", "dangerous")
    assert info["learning_rate_scale"] == 0.1 and "learning rate × 0.1" in caplog.text
    assert info["loss_weights"]["scam"] > info["loss_weights"]["toxicity"]


def test_loss_weights_scale_each_labels_term():
    logits, targets, mask = torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2)
    plain = asymmetric_loss(logits, targets, mask)
    weighted = asymmetric_loss(logits, targets, mask, weights=torch.tensor([3.0, 1.0]))
    assert weighted == pytest.approx(2 * plain)  # (3 + 1) / 2


def test_rebalancing_changes_train_only_and_is_recorded(tmp_path):
    rng = np.random.default_rng(1)
    pd.DataFrame({"text": [f"t{i}" for i in range(400)], "s": (rng.random(400) < 0.05).astype(int),
                  "v": (rng.random(400) < 0.4).astype(int)}).to_csv(tmp_path / "d.csv", index=False)
    splits = {}
    for policy in ("none", "oversampling"):
        source = {"name": "d", "path": "d.csv", "labels": {"scam": "s", "violence": "v"}}
        config = write_config(tmp_path, [source], labels=["scam", "violence"], rebalance={"policy": policy})
        manifest = prepare(load_data_config(str(config)), tmp_path / policy)
        splits[policy] = {s: pq.read_table(tmp_path / policy / f"{s}.parquet").to_pandas()
                          for s in ("train", "validation", "test")}
        assert manifest["rebalance"]["policy"] == policy
        assert manifest["splits"]["train"]["rows"] == manifest["rebalance"]["train_rows_after"]
    for split in ("validation", "test"):
        assert splits["none"][split].equals(splits["oversampling"][split])
    assert len(splits["oversampling"]["train"]) > len(splits["none"]["train"])


def test_training_applies_the_risky_band_learning_rate(tiny_models, tmp_path):
    from cockatoo_lib.plan.catalogue import resolve_plan
    from cockatoo_lib.tokenize import tokenize
    from cockatoo_lib.training.trainer import train

    rng = np.random.default_rng(2)
    pd.DataFrame({"text": [f"post number {i}" for i in range(300)], "s": (rng.random(300) < 0.03).astype(int),
                  "v": (rng.random(300) < 0.5).astype(int)}).to_csv(tmp_path / "d.csv", index=False)
    source = {"name": "d", "path": "d.csv", "labels": {"scam": "s", "violence": "v"}}
    config = write_config(tmp_path, [source], labels=["scam", "violence"],
                          rebalance={"policy": "reweighting"})
    manifest = prepare(load_data_config(str(config)), tmp_path / "data")
    assert manifest["rebalance"]["learning_rate_scale"] == 0.1
    plan = resolve_plan("deberta", {"base_model": str(tiny_models["deberta"]), "num_epochs": 1,
                                    "batch_size": 32, "gradient_accumulation_steps": 1})
    tokenize(tmp_path / "data", plan, tmp_path / "tok", cache_root=str(tmp_path / "cache"))
    info = train(tmp_path / "tok", plan, tmp_path / "model")
    assert info["plan"]["learning_rate"] == pytest.approx(2e-6)
    assert any("learning rate × 0.1" in note for note in info["plan"]["adjustments"])
