"""Rebalancing the train split: label weights, resampling, and how risky the weights are.

Weights are per label, from the frequency f of positives among the rows that annotate the
label, with additive smoothing: inverse_frequency 1/f, sqrt_inverse 1/sqrt(f), effective_num
(Cui et al., 2019) (1 - beta) / (1 - beta^positives); normalized to mean 1. The spread of the
weights (max / min) is classified in bands; from `caution` up, a reweighted loss trains with
a tenth of the learning rate, because large weights make large, noisy steps.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

BANDS = [(5, "safe"), (20, "caution"), (50, "dangerous"), (100, "critical"), (float("inf"), "extreme")]
RISKY_LR_SCALE = 0.1


class Rebalance(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # none; oversampling: repeat each row by its rarest positive label's weight relative to the
    # least-weighted label (at most pos_weight_cap times); undersampling:
    # thin the rows with no positive label to as many as the rows with one; combined: both;
    # reweighting: weight each label's loss.
    policy: Literal["none", "oversampling", "undersampling", "reweighting", "combined"] = "none"
    weights: Literal["inverse_frequency", "effective_num", "sqrt_inverse"] = "inverse_frequency"
    smoothing: float = Field(default=1.0, ge=0)
    beta: float = Field(default=0.999, gt=0, lt=1)
    pos_weight_cap: float = Field(default=10.0, gt=0)


def label_weights(y: np.ndarray, m: np.ndarray, config: Rebalance) -> np.ndarray:
    positives = (y * m).sum(axis=0).astype(float)
    annotated = m.sum(axis=0).astype(float)
    frequency = (positives + config.smoothing) / np.maximum(annotated + config.smoothing, 1e-9)
    frequency = np.clip(frequency, 1e-9, 1.0)
    if config.weights == "inverse_frequency":
        raw = 1.0 / frequency
    elif config.weights == "sqrt_inverse":
        raw = 1.0 / np.sqrt(frequency)
    else:
        raw = (1 - config.beta) / np.maximum(1 - config.beta ** (positives + config.smoothing), 1e-12)
    return raw / raw.mean()


def pos_weights(y: np.ndarray, m: np.ndarray, cap: float) -> np.ndarray:
    """BCE pos_weight: negatives / positives among annotated rows, capped."""
    positives = (y * m).sum(axis=0).astype(float)
    negatives = ((1 - y) * m).sum(axis=0).astype(float)
    weights = np.where(positives > 0, negatives / np.maximum(positives, 1), cap)
    return np.clip(weights, 1e-3, cap)


def band(ratio: float) -> str:
    return next(name for limit, name in BANDS if ratio < limit)


def resample(y: np.ndarray, m: np.ndarray, weights: np.ndarray, policy: str, seed: int,
             max_repeats: float) -> np.ndarray:
    """Row indices of the rebalanced train split (repeats allowed), in a seeded order."""
    rng = np.random.default_rng(seed)
    index = np.arange(len(y))
    positive = (y * m).astype(bool)
    if policy in ("undersampling", "combined"):
        with_positive = positive.any(axis=1)
        negatives = np.flatnonzero(~with_positive)
        keep = min(len(negatives), int(with_positive.sum()))
        index = np.sort(np.concatenate([np.flatnonzero(with_positive),
                                        rng.choice(negatives, keep, replace=False)]))
    if policy in ("oversampling", "combined"):
        relative = np.clip(weights / weights.min(), 1.0, max_repeats)
        repeats = np.where(positive[index], relative, 1.0).max(axis=1)
        index = np.repeat(index, np.rint(repeats).astype(int))
    return index


def rebalance(y: np.ndarray, m: np.ndarray, labels: list[str], config: Rebalance,
              seed: int) -> tuple[np.ndarray, dict]:
    """Rows of the rebalanced train split, and what the manifest records about it."""
    weights = label_weights(y, m, config)
    ratio = float(weights.max() / weights.min())
    level = band(ratio)
    reweighted = config.policy == "reweighting"
    scale = RISKY_LR_SCALE if reweighted and level != "safe" else 1.0
    if level != "safe":
        log.warning("label weights spread %.1f× (%s band)%s", ratio, level,
                    f"; learning rate × {scale:g} for the reweighted loss" if scale != 1 else "")
    index = resample(y, m, weights, config.policy, seed, config.pos_weight_cap)
    info = {
        **config.model_dump(),
        "label_weights": dict(zip(labels, np.round(weights, 6).tolist())),
        "loss_weights": dict(zip(labels, np.round(weights if reweighted else np.ones_like(weights),
                                                  6).tolist())),
        # Of the rows trained on, after resampling.
        "pos_weight": dict(zip(labels, np.round(pos_weights(y[index], m[index], config.pos_weight_cap),
                                                6).tolist())),
        "weight_ratio": round(ratio, 4),
        "band": level,
        "learning_rate_scale": scale,
        "train_rows_before": int(len(y)),
        "train_rows_after": int(len(index)),
    }
    return index, info
