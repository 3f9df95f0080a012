"""The linear baseline every evaluation reports beside the model: TF-IDF of character n-grams
and one logistic regression per label, fitted on the run's own train split, its thresholds
tuned on validation the way the model's are, scored on the same test rows.

A fine-tuned transformer that does no better than this has learned nothing that a bag of
character n-grams would not; the report puts the two side by side so that shows at once.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from cockatoo_lib.errors import CockatooError
from cockatoo_lib.evaluation.metrics import macro_f1, sigmoid, sweep_thresholds

log = logging.getLogger(__name__)

# A sample this large fits in seconds to a minute on two cores; more rows change a bag of
# n-grams little. The sample is drawn with the run's seed.
MAX_TRAIN_ROWS = 50_000
DESCRIPTION = ("TF-IDF of character 2-5-grams (within word boundaries, sublinear tf) + logistic "
               "regression per label (C=4, balanced class weights), thresholds tuned on validation")


PARTNER_FILES = ("partner.json", "partner.safetensors")  # settings and vocabulary; arrays


def _vectorizer(**kwargs) -> TfidfVectorizer:
    return TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, max_features=500_000,
                           sublinear_tf=True, dtype=np.float32, **kwargs)


class CharNgramModel:
    """The baseline as a model: the TF-IDF vectorizer and one logistic regression per label.
    Saved as JSON (vocabulary) and safetensors (idf, coefficients): loading executes nothing.
    A label with a single class among its annotated train rows scores its prior everywhere."""

    def __init__(self, vectorizer: TfidfVectorizer, arrays: dict[str, np.ndarray], info: dict):
        # coef (labels x features), intercept, and per label: fitted (0/1), prior (where not fitted)
        self.vectorizer, self.arrays, self.info = vectorizer, arrays, info

    @classmethod
    def fit(cls, train_texts: list[str], y: np.ndarray, m: np.ndarray, seed: int = 42) -> CharNgramModel:
        """Fit on the train rows (only the rows annotating a label count for it)."""
        start = time.perf_counter()
        rows = np.arange(len(train_texts))
        if len(rows) > MAX_TRAIN_ROWS:
            rows = np.sort(np.random.default_rng(seed).choice(len(rows), MAX_TRAIN_ROWS, replace=False))
        texts = [train_texts[i] for i in rows]
        y, m = y[rows], m[rows].astype(bool)
        vectorizer = _vectorizer()
        features = vectorizer.fit_transform(texts)
        width = features.shape[1]
        arrays = {"coef": np.zeros((y.shape[1], width), np.float32), "intercept": np.zeros(y.shape[1]),
                  "fitted": np.zeros(y.shape[1], np.int8), "prior": np.zeros(y.shape[1])}
        for j in range(y.shape[1]):
            yj = y[m[:, j], j]
            if len(np.unique(yj)) < 2:  # nothing to learn: the label's prior everywhere
                arrays["prior"][j] = float(yj.mean()) if len(yj) else 0.0
                continue
            model = LogisticRegression(C=4.0, class_weight="balanced", max_iter=1000, solver="liblinear")
            model.fit(features[m[:, j]], yj)
            arrays["coef"][j], arrays["intercept"][j] = model.coef_[0], model.intercept_[0]
            arrays["fitted"][j] = 1
        info = {"description": DESCRIPTION, "train_rows": int(len(rows)), "features": int(width),
                "labels_fitted": int(arrays["fitted"].sum()),
                "seconds": round(time.perf_counter() - start, 2)}
        return cls(vectorizer, arrays, info)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        a = self.arrays
        if not len(texts):
            return np.zeros((0, len(a["prior"])))
        probs = sigmoid(self.vectorizer.transform(texts) @ a["coef"].T.astype(np.float64) + a["intercept"])
        return np.where(a["fitted"].astype(bool), probs, a["prior"])

    def save(self, folder: Path, labels: list[str]) -> None:
        from safetensors.numpy import save_file

        vocabulary = sorted(self.vectorizer.vocabulary_, key=self.vectorizer.vocabulary_.get)
        (folder / PARTNER_FILES[0]).write_text(json.dumps(
            {"format_version": 1, "labels": labels, "info": self.info, "vocabulary": vocabulary},
            ensure_ascii=False))
        save_file({"idf": self.vectorizer.idf_.astype(np.float64), **self.arrays},
                  str(folder / PARTNER_FILES[1]))

    @classmethod
    def load(cls, folder: Path, labels: list[str]) -> CharNgramModel:
        """The partner saved in a model folder whose labels are `labels`."""
        from safetensors.numpy import load_file

        for name in PARTNER_FILES:
            if not (folder / name).is_file():
                raise CockatooError(f"{folder}: the model names a char n-gram partner, but {name} is missing")
        saved = json.loads((folder / PARTNER_FILES[0]).read_text())
        if saved["labels"] != labels:
            raise CockatooError(f"{folder / PARTNER_FILES[0]}: labels {saved['labels']}, the model's are "
                                f"{labels}")
        arrays = load_file(str(folder / PARTNER_FILES[1]))
        width = len(saved["vocabulary"])
        if arrays["coef"].shape[1] != width or len(arrays["idf"]) != width:
            raise CockatooError(f"{folder / PARTNER_FILES[1]}: {arrays['coef'].shape[1]} features, "
                                f"{PARTNER_FILES[0]} has a vocabulary of {width}")
        vectorizer = _vectorizer(vocabulary={term: i for i, term in enumerate(saved["vocabulary"])})
        vectorizer.idf_ = arrays.pop("idf")
        return cls(vectorizer, arrays, saved["info"])


def fit_predict(train_texts: list[str], y: np.ndarray, m: np.ndarray,
                others: dict[str, list[str]], seed: int = 42) -> tuple[dict[str, np.ndarray], dict]:
    """Fit on the train rows and return probabilities for each text list in `others`, plus
    what was fitted."""
    model = CharNgramModel.fit(train_texts, y, m, seed)
    return {name: model.predict_proba(texts) for name, texts in others.items()}, model.info


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


# The transformer's weight in a combination with its char n-gram partner: 0 is the partner
# alone, 1 the transformer alone.
COMBINATION_WEIGHTS = tuple(round(w, 2) for w in np.linspace(0, 1, 11))


def combine(model_probs: np.ndarray, partner_probs: np.ndarray, weight: float) -> np.ndarray:
    return weight * model_probs + (1 - weight) * partner_probs


def choose_combination(model_probs: np.ndarray, partner_probs: np.ndarray, y: np.ndarray, m: np.ndarray,
                       unannotated_flag_cost: float = 0.0) -> dict:
    """The weight with the best validation macro-F1 at thresholds re-tuned for it (ties: the
    larger weight), and each weight's figure; the thresholds of the two alone too."""
    tried = {}
    for weight in COMBINATION_WEIGHTS:
        probs = combine(model_probs, partner_probs, weight)
        thresholds, tuned = sweep_thresholds(probs, y, m, unannotated_flag_cost=unannotated_flag_cost)
        tried[weight] = (macro_f1(probs, y, m, thresholds), thresholds, tuned)
    best = max(tried, key=lambda w: (tried[w][0], w))
    return {"transformer_weight": best, "thresholds": tried[best][1], "thresholds_tuned": tried[best][2],
            "validation_macro_f1": {"transformer": tried[1.0][0], "partner": tried[0.0][0],
                                    "combination": tried[best][0]},
            "validation_macro_f1_by_weight": {str(w): round(v[0], 6) for w, v in tried.items()},
            "transformer_thresholds": tried[1.0][1], "partner_thresholds": tried[0.0][1]}
