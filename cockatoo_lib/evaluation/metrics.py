"""Masked multi-label metrics. Only rows whose source annotates a label count for that label;
labels with no positive among those rows have no support and are left out of macro averages."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score

THRESHOLD_STEPS = 100
BOOTSTRAP_SAMPLES = 1000


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


def _counts(pred: np.ndarray, y: np.ndarray, m: np.ndarray):
    """True positives, false positives, false negatives over annotated rows, summed over axis -2."""
    pred, y, m = pred.astype(bool), y.astype(bool), m.astype(bool)
    tp = (pred & y & m).sum(axis=-2)
    fp = (pred & ~y & m).sum(axis=-2)
    fn = (~pred & y & m).sum(axis=-2)
    return tp, fp, fn


def _f1(tp, fp, fn):
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def support(y: np.ndarray, m: np.ndarray) -> np.ndarray:
    return (y.astype(bool) & m.astype(bool)).sum(axis=0)


def macro_f1(probs: np.ndarray, y: np.ndarray, m: np.ndarray, thresholds) -> float:
    f1 = _f1(*_counts(probs >= np.asarray(thresholds), y, m))
    supported = support(y, m) > 0
    return float(f1[supported].mean()) if supported.any() else 0.0


def mean_average_precision(probs: np.ndarray, y: np.ndarray, m: np.ndarray) -> float:
    """Mean over labels of average precision (area under the precision-recall curve) on the
    rows annotating each label; labels whose rows hold only one class are left out. It ranks
    rows, so no threshold enters it."""
    scores = []
    for j in range(y.shape[1]):
        rows = m[:, j].astype(bool)
        if len(np.unique(y[rows, j])) == 2:
            scores.append(average_precision_score(y[rows, j], probs[rows, j]))
    return float(np.mean(scores)) if scores else 0.0


def sweep_thresholds(probs: np.ndarray, y: np.ndarray, m: np.ndarray, steps: int = THRESHOLD_STEPS,
                     unannotated_flag_cost: float = 0.0) -> tuple[list[float], list[bool]]:
    """Per label, the threshold in (0, 1) with the best F1 on these rows (ties: the lowest).
    With `unannotated_flag_cost` c > 0, a flag on a row whose source does not annotate the label
    counts as c of a false positive, so a threshold is not set where the label fires on traffic
    its sources never showed it. Labels with no positive keep 0.5; the second list says which
    labels were tuned."""
    grid = np.linspace(0, 1, steps + 2)[1:-1]
    pred = probs[:, None, :] >= grid[None, :, None]  # rows x thresholds x labels
    tp, fp, fn = _counts(pred.transpose(1, 0, 2), y[None], m[None])  # thresholds x labels
    if unannotated_flag_cost:
        fp = fp + unannotated_flag_cost * (pred & ~m.astype(bool)[:, None, :]).sum(axis=0)
    f1 = _f1(tp, fp, fn)
    tuned = support(y, m) > 0
    best = np.where(tuned, grid[f1.argmax(axis=0)], 0.5)
    return [round(float(t), 6) for t in best], tuned.tolist()


def report(probs: np.ndarray, y: np.ndarray, m: np.ndarray, labels: list[str],
           thresholds: list[float]) -> dict:
    """Macro/micro F1 and per-label precision, recall, F1, support, ROC-AUC and PR-AUC."""
    per_label, pred = {}, probs >= np.asarray(thresholds)
    for j, label in enumerate(labels):
        rows = m[:, j].astype(bool)
        yj, pj, sj = y[rows, j], pred[rows, j], probs[rows, j]
        p, r, f, _ = precision_recall_fscore_support(yj, pj, average="binary", zero_division=0)
        both = len(np.unique(yj)) == 2
        tp, fp, fn = _counts(pred[:, [j]], y[:, [j]], m[:, [j]])
        per_label[label] = {
            "precision": float(p), "recall": float(r), "f1": float(f),
            "support": int(yj.sum()), "annotated": int(rows.sum()),
            "roc_auc": float(roc_auc_score(yj, sj)) if both else None,
            "pr_auc": float(average_precision_score(yj, sj)) if both else None,
            "confusion_matrix": [[int(rows.sum() - tp[0] - fp[0] - fn[0]), int(fp[0])],
                                 [int(fn[0]), int(tp[0])]],
            "in_macro_average": bool(yj.sum() > 0),
        }
    tp, fp, fn = (c.sum() for c in _counts(pred, y, m))
    return {
        "macro_f1": macro_f1(probs, y, m, thresholds),
        "micro_f1": float(_f1(tp, fp, fn)),
        "labels_without_support": [x for x in labels if not per_label[x]["in_macro_average"]],
        "per_label": per_label,
    }


def spillover(probs: np.ndarray, m: np.ndarray, labels: list[str], thresholds) -> dict:
    """Per label, how often the model flags rows whose source does not annotate that label (the
    traffic a moderation model meets that its label's sources never showed it): rows, flagged
    rows and their share. Labels every row annotates have no such rows (share None)."""
    flagged = (probs >= np.asarray(thresholds)) & ~m.astype(bool)
    rows = (~m.astype(bool)).sum(axis=0)
    return {label: {"rows": int(rows[j]), "flagged": int(flagged[:, j].sum()),
                    "share": round(float(flagged[:, j].sum() / rows[j]), 6) if rows[j] else None}
            for j, label in enumerate(labels)}


def label_confusion(probs: np.ndarray, y: np.ndarray, m: np.ndarray, thresholds) -> list[list[int]]:
    """Multi-label confusion: cell [i][j] counts rows truly positive for label i and predicted
    positive for label j, among rows annotating both. The diagonal is each label's true
    positives; off-diagonal cells show which labels the model mixes up."""
    pred = (probs >= np.asarray(thresholds)) & m.astype(bool)
    truth = y.astype(bool) & m.astype(bool)
    return (truth.T.astype(np.int64) @ pred.astype(np.int64)).tolist()


def bootstrap_gain(challenger_hits: np.ndarray, champion_hits: np.ndarray, y: np.ndarray, m: np.ndarray,
                   samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> list[float]:
    """Paired bootstrap 95% interval of macro-F1(challenger) - macro-F1(champion): rows are
    resampled with replacement, the same rows for both models; a resample's labels without a
    positive are left out of its macro averages, as in `report`. Either side may be a stack of
    hit arrays (one per training seed, say): its macro-F1 is then their mean on each resample."""
    y, m = y.astype(bool), m.astype(bool)
    n, width = y.shape
    # How often each row is drawn in each resample; a resample's counts are then one product.
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=samples).astype(float)

    def macro(hits):
        stack = np.asarray(hits, dtype=bool).reshape(-1, n, width)
        f1 = 0.0
        for one in stack:
            per_row = np.concatenate([one & y & m, one & ~y & m, ~one & y & m], axis=1).astype(float)
            tp, fp, fn = (weights @ per_row).reshape(samples, 3, width).transpose(1, 0, 2)
            f1 = f1 + _f1(tp, fp, fn)
        return f1 / len(stack)

    supported = weights @ (y & m).astype(float) > 0
    difference = (macro(challenger_hits) - macro(champion_hits)) * supported
    gain = difference.sum(1) / np.maximum(supported.sum(1), 1)
    low, high = np.percentile(gain[supported.any(1)], [2.5, 97.5]) if supported.any() else (0.0, 0.0)
    return [round(float(low), 6), round(float(high), 6)]
