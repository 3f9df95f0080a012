"""B2 tokenization: rows/s of a cold run over 100,000 rows against the tokenizer alone on the
same texts (what the step adds around it), and a cache hit's time as a fraction of a cold run."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.harness import sample_texts

KEY, TITLE = "b2", "B2 tokenization"


def add_arguments(parser) -> None:
    parser.add_argument("--rows", type=int, default=100_000, help="B2 rows")


def run(args) -> dict:
    return bench_tokenization(args.rows, args.repeats)


def bench_tokenization(rows: int, repeats: int) -> dict:
    import pandas as pd
    from transformers import AutoTokenizer

    from cockatoo_lib.data.prepare import load_data_config, prepare
    from cockatoo_lib.plan.catalogue import resolve_plan
    from cockatoo_lib.tokenize import tokenize

    plan = resolve_plan("minilm")
    cold, hit, alone = [], [], []
    texts = sample_texts(rows)
    tokenizer = AutoTokenizer.from_pretrained(plan.base_model)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        frame = pd.DataFrame({"text": texts, "label": np.arange(rows) % 2})
        frame.to_parquet(work / "rows.parquet")
        (work / "data.yaml").write_text(
            "labels: [scam]\nsources: [{name: s, path: rows.parquet, labels: {scam: label}}]\n")
        prepare(load_data_config(str(work / "data.yaml")), work / "data")
        for i in range(repeats):
            cache = str(work / f"cache{i}")
            start = time.perf_counter()
            tokenize(work / "data", plan, work / f"cold{i}", cache)
            cold.append(time.perf_counter() - start)
            start = time.perf_counter()
            info = tokenize(work / "data", plan, work / f"hit{i}", cache)
            hit.append(time.perf_counter() - start)
            assert info["cache_hit"]
            start = time.perf_counter()  # the tokenizer alone, as the step calls it, on every row
            tokenizer(texts, truncation=True, max_length=plan.max_length)
            alone.append(time.perf_counter() - start)
    return {"rows": rows, "repeats": repeats, "tokenizer": "all-MiniLM-L6-v2 (BERT WordPiece, fast)",
            "cold_s": statistics.median(cold), "hit_s": statistics.median(hit),
            "cold_rows_per_s": rows / statistics.median(cold), "tokenizer_s": statistics.median(alone),
            "cold_share_of_tokenizer": statistics.median(alone) / statistics.median(cold),
            "hit_fraction": statistics.median(hit) / statistics.median(cold)}


def section(m: dict, b2: dict) -> list[str]:
    return [
        "## B2: tokenization and its cache",
        "",
        f"{b2['rows']:,} rows, {b2['tokenizer']}, {b2['repeats']} repeats, local cache folder.",
        "",
        "| run | seconds | rows/s |",
        "|---|---|---|",
        f"| cold (cache miss: tokenize, write output and cache entry) | {b2['cold_s']:.2f} | "
        f"{b2['cold_rows_per_s']:,.0f} |",
        f"| cache hit (copy the entry) | {b2['hit_s']:.2f} | {b2['rows'] / b2['hit_s']:,.0f} |",
        f"| the tokenizer alone on the same texts | {b2['tokenizer_s']:.2f} | "
        f"{b2['rows'] / b2['tokenizer_s']:,.0f} |",
        "",
        f"**A cold run goes at {b2['cold_share_of_tokenizer']:.0%} of the tokenizer's speed** "
        "(target: at least 67%).",
        "",
        f"**A hit costs {b2['hit_fraction']:.1%} of a cold run** (target: at most 5%).",
    ]
