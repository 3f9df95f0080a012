"""B8 predict: rows/s of `cockatoo predict` (file in, file out) against transformers'
pipeline("text-classification") on the same model folder and batch size."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.harness import posts, social_media_lengths

KEY, TITLE = "b8", "B8 predict"


def add_arguments(parser) -> None:
    parser.add_argument("--predict-rows", type=int, default=4000, help="B8 rows")


def run(args) -> dict:
    return bench_predict(args.predict_rows, args.repeats)


def demo_model_folder(folder: Path, labels: list[str], plan=None) -> Path:
    """A cockatoo model folder of the demo's model (all-MiniLM-L6-v2, offline package), or of
    `plan`'s base model, with an untrained head: throughput does not depend on what the head
    learnt."""
    from transformers import AutoTokenizer

    from cockatoo_lib.plan.catalogue import resolve_plan
    from cockatoo_lib.storage.fileio import write_json
    from cockatoo_lib.training.model_folder import MODEL_MANIFEST
    from cockatoo_lib.training.models import load_base_model

    plan = plan or resolve_plan("minilm")
    load_base_model(plan, labels).save_pretrained(folder)
    AutoTokenizer.from_pretrained(plan.base_model).save_pretrained(folder)
    write_json(folder / MODEL_MANIFEST, {
        "model_type": plan.model_type, "architecture": plan.architecture, "base_model": plan.base_model,
        "labels": labels, "thresholds": dict.fromkeys(labels, 0.5), "max_length": plan.max_length,
        "inference_max_length": plan.inference_max_length, "plan": plan.model_dump(mode="json")})
    return folder


def bench_predict(rows: int, repeats: int, batch_size: int = 64, base_model: str = "") -> dict:
    """`cockatoo predict` against transformers' pipeline, alternately, on one model and file.
    `base_model`: other weights in MiniLM's recipe (the tests' tiny model)."""
    import pandas as pd
    from transformers import pipeline

    from cockatoo_lib.plan.catalogue import resolve_plan
    from cockatoo_lib.release.predict import Classifier, predict_file

    labels = ["scam", "violence", "harassment", "hate_speech", "toxicity", "obscenity", "jailbreaking"]
    plan = resolve_plan("minilm", {"base_model": base_model} if base_model else {})
    max_length = plan.inference_max_length
    lengths = social_media_lengths(rows, max_length)
    texts = posts(lengths)
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        folder = demo_model_folder(work / "model", labels, plan)
        pd.DataFrame({"text": texts}).to_parquet(work / "in.parquet")
        for i in range(repeats):
            start = time.perf_counter()
            predict_file(str(folder), str(work / "in.parquet"), work / f"out{i}.parquet",
                         batch_size=batch_size)
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()  # what a user would write instead, from the same file
            classify = pipeline("text-classification", model=str(folder), batch_size=batch_size,
                                top_k=None, function_to_apply="sigmoid")
            frame = pd.read_parquet(work / "in.parquet")
            out = classify(frame["text"].tolist(), truncation=True, max_length=max_length)
            pd.DataFrame([{f"p_{d['label']}": d["score"] for d in row} for row in out]).to_parquet(
                work / f"theirs{i}.parquet")
            theirs.append(time.perf_counter() - start)
        # Both score the same: the comparison is of speed alone.
        mine = pd.read_parquet(work / "out0.parquet")[[f"p_{x}" for x in labels]].to_numpy()
        other = pd.read_parquet(work / "theirs0.parquet")[[f"p_{x}" for x in labels]].to_numpy()
        agreement = float(np.abs(mine - other).max())
        tokens = Classifier(folder).tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return {"rows": rows, "repeats": repeats, "batch_size": batch_size, "max_length": max_length,
            "model": "all-MiniLM-L6-v2 (22M parameters), 7 labels",
            "length_mean": float(np.mean([len(t) for t in tokens])),
            "length_max": int(max(len(t) for t in tokens)),
            "cockatoo_s": statistics.median(ours), "pipeline_s": statistics.median(theirs),
            "cockatoo_rows_per_s": rows / statistics.median(ours),
            "pipeline_rows_per_s": rows / statistics.median(theirs),
            "ratio": statistics.median(theirs) / statistics.median(ours),
            "max_probability_difference": agreement}


def section(m: dict, b8: dict) -> list[str]:
    return [
        "## B8: predict",
        "",
        f"{b8['rows']:,} texts of B1's length mix ({b8['length_mean']:.0f} tokens on average, the longest "
        f"{b8['length_max']}), {b8['model']}, batch {b8['batch_size']}, max length {b8['max_length']}, "
        f"{m['cores']} CPU cores, {b8['repeats']} repeats alternating; both read the same Parquet file, "
        "load the model and write Parquet.",
        "",
        "| | seconds | rows/s |",
        "|---|---|---|",
        f"| `cockatoo predict` (length-sorted batches, inference mode) | {b8['cockatoo_s']:.2f} | "
        f"{b8['cockatoo_rows_per_s']:,.0f} |",
        f"| transformers `pipeline(\"text-classification\")` | {b8['pipeline_s']:.2f} | "
        f"{b8['pipeline_rows_per_s']:,.0f} |",
        "",
        f"**Ratio: {b8['ratio']:.2f}× rows/s** (target: at least 2×). Largest difference between the two "
        f"sides' probabilities: {b8['max_probability_difference']:.1e}.",
    ]
