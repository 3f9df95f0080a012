"""Evaluation on the test split: metrics at 0.5 and at the tuned thresholds, a metrics JSON,
and an HTML report that opens offline (plots embedded as PNG data URIs)."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cockatoo_lib.errors import CockatooError
from cockatoo_lib.evaluation.baseline import baseline_probabilities
from cockatoo_lib.evaluation.metrics import (
    bootstrap_gain,
    label_confusion,
    macro_f1,
    mean_average_precision,
    report,
    sigmoid,
    spillover,
)
from cockatoo_lib.evaluation.model_card import MODEL_CARD, render_model_card
from cockatoo_lib.storage.fileio import (
    atomic_output_dir,
    check_output,
    sha256_files,
    write_json,
    write_text_atomic,
)
from cockatoo_lib.tokenize import load_tokenized
from cockatoo_lib.training.collate import PaddingCollator
from cockatoo_lib.training.model_folder import MODEL_MANIFEST, check_same_data, read_model_manifest
from cockatoo_lib.training.models import load_trained_model, predict_logits

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
# Every scored row's probabilities, the model's and the baseline's (and, for a model combined
# with a char n-gram partner, each part's), beside its labels and mask (numpy arrays, loaded
# with allow_pickle=False): for error analysis, and for B7's intervals over several trainings.
SCORES_FILE = "scores.npz"


def _batches(dataset, collator, batch_size: int):
    order = np.argsort(dataset["length"], kind="stable")  # similar lengths pad less
    for start in tqdm(range(0, len(order), batch_size), desc="evaluate", unit="batch"):
        idx = order[start:start + batch_size]
        yield collator([dataset[int(i)] for i in idx]), idx


def evaluate(model_dir: str | Path, tokenized_dir: str | Path, output: str | Path,
             data_dir: str | Path | None = None, split: str = "test") -> dict:
    check_output(output)
    model_info = read_model_manifest(model_dir)
    datasets, tok_info = load_tokenized(tokenized_dir)
    check_same_data(tok_info, tokenized_dir, data_dir)
    labels = model_info["labels"]
    if tok_info["labels"] != labels:
        raise CockatooError(f"tokenized data {tokenized_dir} has labels {tok_info['labels']}, "
                            f"the model {model_dir} was trained on {labels}")
    if split not in datasets:
        raise CockatooError(f"tokenized data {tokenized_dir} has no {split!r} split")
    dataset = datasets[split]
    if len(dataset) == 0:
        raise CockatooError(f"the {split} split in {tokenized_dir} is empty")

    digest = weights_digest(model_dir)  # before the card is written into the folder
    model = load_trained_model(model_dir, model_info["architecture"])
    if torch.cuda.is_available():
        model = model.cuda()
    from transformers import AutoTokenizer

    pad_id = AutoTokenizer.from_pretrained(str(model_dir)).pad_token_id or 0
    collator = PaddingCollator(pad_id, pixels=tok_info.get("images"))
    batch_size = model_info.get("plan", {}).get("batch_size", 16) * 2
    logits, order = [], []
    for batch, idx in _batches(dataset, collator, batch_size):
        logits.append(predict_logits(model, [batch]))
        order.append(idx)
    probs = np.empty((len(dataset), len(labels)))
    probs[np.concatenate(order)] = sigmoid(torch.cat(logits).numpy())
    y = np.asarray(dataset["labels"], dtype=np.int8)
    m = np.asarray(dataset["label_mask"], dtype=np.int8)
    combination, parts_probs = model_info.get("combination"), {}
    if combination:  # what ships: the model combined with its char n-gram partner; each part alone too
        from cockatoo_lib.evaluation.baseline import CharNgramModel, combine

        partner_probs = CharNgramModel.load(Path(model_dir), labels).predict_proba(dataset["text"])
        weight, alone = combination["transformer_weight"], combination
        combination = {"transformer_weight": weight,
                       "transformer": {"macro_f1": macro_f1(probs, y, m, alone["transformer_thresholds"])},
                       "partner": {"macro_f1": macro_f1(partner_probs, y, m, alone["partner_thresholds"])}}
        parts_probs = {"transformer_probabilities": probs.astype(np.float32),
                       "partner_probabilities": partner_probs.astype(np.float32)}
        probs = combine(probs, partner_probs, weight)

    # The thresholds stored in the model, tuned on validation when it was trained.
    tuned = [model_info["thresholds"][x] for x in labels]
    sources = np.asarray(dataset["source"], dtype=object)
    base_probs, base_thresholds, base_info = baseline_probabilities(
        {s: (datasets[s]["text"], np.asarray(datasets[s]["labels"]), np.asarray(datasets[s]["label_mask"]))
         for s in ("train", "validation")}, dataset["text"], seed=model_info.get("seed", 42))
    results = {
        "model_type": model_info["model_type"],
        "batch_split": model_info.get("batch_split"),
        "split": split,
        "rows": len(dataset),
        "labels": labels,
        "data_fingerprint": tok_info["data_fingerprint"],
        # Ties these figures to this model: the gate refuses them for any other.
        "weights_sha256": digest,
        "at_0.5": report(probs, y, m, labels, [0.5] * len(labels)),
        "at_tuned_thresholds": report(probs, y, m, labels, tuned),
        "thresholds": dict(zip(labels, tuned)),
        "label_confusion": label_confusion(probs, y, m, tuned),
        "mean_average_precision": mean_average_precision(probs, y, m),
    }
    results["macro_f1"] = results["at_tuned_thresholds"]["macro_f1"]
    if combination:
        results["combination"] = combination
    results["micro_f1"] = results["at_tuned_thresholds"]["micro_f1"]
    base = report(base_probs, y, m, labels, base_thresholds)
    results["baseline"] = {**base_info, "macro_f1": base["macro_f1"], "micro_f1": base["micro_f1"],
                           "mean_average_precision": mean_average_precision(base_probs, y, m),
                           "per_label_f1": {k: v["f1"] for k, v in base["per_label"].items()},
                           "thresholds": dict(zip(labels, base_thresholds))}
    results["macro_f1_minus_baseline"] = round(results["macro_f1"] - base["macro_f1"], 6)
    # How far the margin could move on other rows like these: a paired bootstrap over the rows.
    results["margin_95_interval"] = bootstrap_gain(probs >= np.asarray(tuned),
                                                   base_probs >= np.asarray(base_thresholds), y, m)
    results["spillover"] = spillover(probs, m, labels, tuned)
    results["per_source"] = per_source(probs, base_probs, y, m, sources, labels, tuned, base_thresholds)
    card = render_model_card(model_info, tok_info, results)
    with atomic_output_dir(output) as tmp:
        write_json(tmp / METRICS_FILE, results)
        np.savez_compressed(tmp / SCORES_FILE, probabilities=probs.astype(np.float32),
                            baseline_probabilities=base_probs.astype(np.float32), labels=y, label_mask=m,
                            **parts_probs)
        (tmp / REPORT_FILE).write_text(render_report(results, probs, y, m))
        (tmp / MODEL_CARD).write_text(card)
    # The card travels with the model: whatever serves or registers it needs only its folder.
    try:
        write_text_atomic(Path(model_dir) / MODEL_CARD, card)
    except OSError as exc:  # a read-only input mount: the card is still in the evaluation output
        log.warning("evaluate: cannot write the model card into %s (%s); it is in %s", model_dir, exc,
                    Path(output) / MODEL_CARD)
    log.info("evaluated %s on %s: macro-F1 %.4f (tuned), %.4f (0.5); linear baseline %.4f",
             model_info["model_type"], split, results["macro_f1"], results["at_0.5"]["macro_f1"],
             base["macro_f1"])
    if results["macro_f1_minus_baseline"] <= 0:
        log.warning("evaluate: the model (macro-F1 %.4f) does no better than the linear baseline (%.4f)",
                    results["macro_f1"], base["macro_f1"])
    return results


def weights_digest(model_dir: str | Path) -> str:
    """SHA-256 of what makes the model answer as it does: its files (weights, tokenizer, config)
    and, of its manifest, the labels and thresholds it decides with. A retraining that comes out
    the same has the same digest; the manifest's timings and the model card (which evaluate
    writes into the folder) do not count."""
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.rglob("*")
                   if p.is_file() and p.name not in (MODEL_MANIFEST, MODEL_CARD))
    if not any(p.suffix == ".safetensors" for p in files):
        raise CockatooError(f"model folder {model_dir} holds no .safetensors weights")
    manifest = read_model_manifest(model_dir)
    decides = {k: manifest.get(k) for k in ("architecture", "labels", "thresholds", "inference_max_length")}
    if "combination" in manifest:  # the partner's files are among the files above
        decides["transformer_weight"] = manifest["combination"]["transformer_weight"]
    return hashlib.sha256((sha256_files(files, model_dir) + json.dumps(decides, sort_keys=True)).encode()
                          ).hexdigest()


def per_source(probs, base_probs, y, m, sources, labels, thresholds, base_thresholds) -> dict:
    """Each source's rows on the labels that source annotates, model and baseline."""
    out = {}
    for name in sorted(set(sources)):
        rows = sources == name
        cols = np.flatnonzero(m[rows].any(axis=0))
        if not len(cols):
            continue
        sub = [labels[j] for j in cols]
        ys, ms = y[rows][:, cols], m[rows][:, cols]
        model = report(probs[rows][:, cols], ys, ms, sub, [thresholds[j] for j in cols])
        base = report(base_probs[rows][:, cols], ys, ms, sub, [base_thresholds[j] for j in cols])
        out[str(name)] = {
            "rows": int(rows.sum()), "labels": sub,
            "macro_f1": model["macro_f1"], "micro_f1": model["micro_f1"],
            "mean_average_precision": mean_average_precision(probs[rows][:, cols], ys, ms),
            "baseline_macro_f1": base["macro_f1"],
            "per_label": {k: {"f1": v["f1"], "support": v["support"]} for k, v in model["per_label"].items()},
            "labels_without_support": model["labels_without_support"],
        }
    return out


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def render_report(results: dict, probs: np.ndarray, y: np.ndarray, m: np.ndarray) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve

    labels = results["labels"]
    at05, tuned = results["at_0.5"]["per_label"], results["at_tuned_thresholds"]["per_label"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    x = np.arange(len(labels))
    ax.bar(x - 0.2, [at05[k]["f1"] for k in labels], 0.4, label="threshold 0.5")
    ax.bar(x + 0.2, [tuned[k]["f1"] for k in labels], 0.4, label="tuned threshold")
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, frameon=False)
    f1_plot = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 5))
    for j, label in enumerate(labels):
        rows = m[:, j].astype(bool)
        if tuned[label]["pr_auc"] is None:
            continue
        precision, recall, _ = precision_recall_curve(y[rows, j], probs[rows, j])
        ax.plot(recall, precision, label=f"{label} (AP {tuned[label]['pr_auc']:.2f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    pr_plot = _png(fig)
    plt.close(fig)

    def cell(v):
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    base = results["baseline"]
    rows = "".join(
        f"<tr><td>{html.escape(k)}{'' if tuned[k]['in_macro_average'] else ' (no support)'}</td>"
        + "".join(f"<td>{cell(tuned[k][c])}</td>" for c in
                  ("precision", "recall", "f1", "support", "annotated", "roc_auc", "pr_auc"))
        + f"<td>{cell(at05[k]['f1'])}</td><td>{results['thresholds'][k]:.3f}</td>"
        f"<td>{cell(base['per_label_f1'][k])}</td></tr>"
        for k in labels)
    source_rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{row['rows']}</td>"
        f"<td>{html.escape(', '.join(row['labels']))}</td>"
        f"<td>{cell(row['macro_f1'])}</td><td>{cell(row['baseline_macro_f1'])}</td>"
        f"<td>{cell(row['mean_average_precision'])}</td></tr>"
        for name, row in results["per_source"].items())
    delta = results["macro_f1_minus_baseline"]
    verdict = f"{delta:+.4f}" if delta > 0 else f"{delta:+.4f}: no better than the baseline"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Cockatoo evaluation: {html.escape(results['model_type'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}</style>
</head><body>
<h1>{html.escape(results['model_type'])} on the {results['split']} split ({results['rows']} rows)</h1>
<p>Macro-F1 <b>{results['macro_f1']:.4f}</b> at tuned thresholds ({results['at_0.5']['macro_f1']:.4f} at 0.5);
micro-F1 {results['micro_f1']:.4f}. Labels without support are left out of macro averages:
{html.escape(', '.join(results['at_tuned_thresholds']['labels_without_support']) or 'none')}.</p>
<p>Linear baseline ({html.escape(base['description'])}, fitted on this run's train split): macro-F1
<b>{base['macro_f1']:.4f}</b>; the model: <b>{verdict}</b>.</p>
<table><tr><th>label</th><th>precision</th><th>recall</th><th>F1</th><th>support</th><th>annotated rows</th>
<th>ROC-AUC</th><th>PR-AUC</th><th>F1 at 0.5</th><th>threshold</th><th>baseline F1</th></tr>{rows}</table>
<h2>Per source, on the labels each annotates</h2>
<table><tr><th>source</th><th>test rows</th><th>labels</th><th>macro-F1</th><th>baseline macro-F1</th>
<th>mean AP</th></tr>{source_rows}</table>
<h2>F1 per label</h2><img alt="F1 per label" src="{f1_plot}">
<h2>Precision-recall curves</h2><img alt="precision-recall curves" src="{pr_plot}">
</body></html>
"""


def kfp_metrics(results: dict) -> tuple[dict[str, float], list[list[int]]]:
    """Scalars for KFP's Metrics artifact (model beside the linear baseline, per label and per
    source) and the label confusion matrix."""
    tuned = results["at_tuned_thresholds"]
    scalars = {"test_macro_f1": results["macro_f1"],
               "baseline_test_macro_f1": results["baseline"]["macro_f1"],
               "test_macro_f1_minus_baseline": results["macro_f1_minus_baseline"],
               "test_micro_f1": results["micro_f1"],
               "test_mean_average_precision": results["mean_average_precision"],
               "test_macro_f1_at_0_5": results["at_0.5"]["macro_f1"]}
    if results.get("combination"):  # the shipped combination's parts, each alone
        parts = results["combination"]
        scalars.update(transformer_weight=parts["transformer_weight"],
                       transformer_test_macro_f1=parts["transformer"]["macro_f1"],
                       partner_test_macro_f1=parts["partner"]["macro_f1"])
    for label, row in tuned["per_label"].items():
        scalars[f"f1_{label}"] = row["f1"]
        if row["pr_auc"] is not None:
            scalars[f"pr_auc_{label}"] = row["pr_auc"]
    for source, row in results["per_source"].items():
        scalars[f"source_{source}_macro_f1"] = row["macro_f1"]
    for label, row in results.get("spillover", {}).items():
        if row["share"] is not None:
            scalars[f"spillover_{label}"] = row["share"]
    if results.get("batch_split"):  # how training split each step, beside what it achieved
        split = results["batch_split"]
        scalars.update(train_micro_batch=split["micro_batch"],
                       train_gradient_accumulation_steps=split["gradient_accumulation_steps"],
                       train_gradient_checkpointing=int(split["gradient_checkpointing"]))
    return {k: round(float(v), 6) for k, v in scalars.items()}, results["label_confusion"]
