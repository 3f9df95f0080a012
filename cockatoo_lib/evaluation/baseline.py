"""The linear baseline every evaluation reports beside the model: TF-IDF of character n-grams
and one logistic regression per label, fitted on the run's own train split, its thresholds
tuned on validation the way the model's are, scored on the same test rows.

A fine-tuned transformer that does no better than this has learned nothing that a bag of
character n-grams would not; the report puts the two side by side so that shows at once.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from scipy import sparse
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from cockatoo_lib.evaluation.metrics import sweep_thresholds

log = logging.getLogger(__name__)

# A sample this large fits in seconds to a minute on two cores; more rows change a bag of
# n-grams little. The sample is drawn with the run's seed.
MAX_TRAIN_ROWS = 50_000
DESCRIPTION = ("TF-IDF of character 2-5-grams (within word boundaries, sublinear tf) + logistic "
               "regression per label (C=4, balanced class weights), thresholds tuned on validation")


def _vectorizer() -> TfidfVectorizer:
    return TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, max_features=500_000,
                           sublinear_tf=True, dtype=np.float32)


def fit_predict(train_texts: list[str], y: np.ndarray, m: np.ndarray,
                others: dict[str, list[str]], seed: int = 42) -> tuple[dict[str, np.ndarray], dict]:
    """Fit on the train rows (only the rows annotating a label count for it) and return
    probabilities for each text list in `others`, plus what was fitted."""
    start = time.perf_counter()
    rows = np.arange(len(train_texts))
    if len(rows) > MAX_TRAIN_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(len(rows), MAX_TRAIN_ROWS, replace=False))
    texts = [train_texts[i] for i in rows]
    y, m = y[rows], m[rows].astype(bool)
    vectorizer = _vectorizer()
    features = vectorizer.fit_transform(texts)
    other_features = {name: vectorizer.transform(t) if len(t) else sparse.csr_matrix((0, features.shape[1]))
                      for name, t in others.items()}
    probs = {name: np.zeros((f.shape[0], y.shape[1])) for name, f in other_features.items()}
    fitted = []
    for j in range(y.shape[1]):
        yj = y[m[:, j], j]
        if len(np.unique(yj)) < 2:  # nothing to learn: the label's prior everywhere
            for name in probs:
                probs[name][:, j] = float(yj.mean()) if len(yj) else 0.0
            continue
        model = LogisticRegression(C=4.0, class_weight="balanced", max_iter=1000, solver="liblinear")
        model.fit(features[m[:, j]], yj)
        fitted.append(j)
        for name, f in other_features.items():
            if f.shape[0]:
                probs[name][:, j] = model.predict_proba(f)[:, 1]
    info = {"description": DESCRIPTION, "train_rows": int(len(rows)), "features": int(features.shape[1]),
            "labels_fitted": len(fitted), "seconds": round(time.perf_counter() - start, 2)}
    return probs, info


def baseline_probabilities(splits: dict, texts: list[str], seed: int = 42
                           ) -> tuple[np.ndarray, list[float], dict]:
    """The baseline's probabilities for `texts` and its thresholds, tuned on validation.
    `splits` maps train and validation to (texts, labels, mask)."""
    train_texts, y, m = splits["train"]
    probs, info = fit_predict(train_texts, y, m, {"validation": splits["validation"][0], "scored": texts},
                              seed)
    _, val_y, val_m = splits["validation"]
    thresholds, _ = sweep_thresholds(probs["validation"], val_y, val_m)
    log.info("baseline: %s on %d train rows in %.1f s", DESCRIPTION, info["train_rows"], info["seconds"])
    return probs["scored"], thresholds, info
