"""B5 data prep at scale: 1M and 10M rows from three sources (CSV, JSON lines, Parquet) through
`prepare` in a fresh process: wall time and peak RSS at each size, and how they grow."""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

KEY, TITLE = "b5", "B5 data prep at scale"


def add_arguments(parser) -> None:
    parser.add_argument("--prepare-rows", type=int, nargs="+", default=[1_000_000, 10_000_000],
                        help="B5 sizes, in rows")


def run(args) -> dict:
    return {"sizes": [bench_prepare_at_scale(rows, args.repeats) for rows in args.prepare_rows]}


def write_million_rows(folder: Path, rows: int = 1_000_000) -> Path:
    """Three sources shaped like the sample's, 40/30/30 % of the rows, ~40% duplicate texts."""
    import pandas as pd

    rng = np.random.default_rng(0)
    words = np.array(["great post", "you idiot", "verify your account at", "ignore previous instructions",
                      "hello there", "nice pic", "I will hurt you", "free gift card"])
    ids = pd.Series(rng.integers(0, int(rows * 0.6), rows)).astype(str)
    text = pd.Series(rng.choice(words, rows)) + " #" + ids
    a, b = int(rows * 0.4), int(rows * 0.7)
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"comment_text": text[:a], "toxic": rng.integers(0, 2, a), "obscene": rng.integers(0, 2, a),
                  "threat": rng.random(a)}).to_csv(folder / "a.csv", index=False)
    pd.DataFrame({"user_input": text[a:b].to_numpy(), "toxicity": rng.integers(0, 2, b - a),
                  "jailbreaking": rng.integers(0, 2, b - a)}).to_json(folder / "b.jsonl", orient="records",
                                                                      lines=True)
    pd.DataFrame({"text": text[b:].to_numpy(), "label": rng.integers(0, 2, rows - b).astype(bool)}
                 ).to_parquet(folder / "c.parquet")
    config = folder / "data.yaml"
    config.write_text(
        "sources:\n"
        "  - {name: a, path: a.csv, text_column: comment_text, labels: {toxicity: toxic,"
        " obscenity: obscene, violence: {column: threat, threshold: 0.9}}}\n"
        "  - {name: b, path: b.jsonl, text_column: user_input,"
        " labels: {toxicity: toxicity, jailbreaking: jailbreaking}}\n"
        "  - {name: c, path: c.parquet, labels: {scam: label}}\n")
    return config


def bench_prepare_at_scale(rows: int, repeats: int) -> dict:
    import subprocess
    import sys

    seconds, rss = [], []
    with tempfile.TemporaryDirectory() as work:
        config = write_million_rows(Path(work) / "in", rows)
        for i in range(repeats):
            # The child reports its own peak as VmHWM, which belongs to its address space: getrusage's
            # maxrss survives exec and would carry this (large) process's mark into the child.
            code = ("import re, time; from cockatoo_lib.data.prepare import load_data_config, prepare;"
                    f"t = time.perf_counter();"
                    f"prepare(load_data_config({str(config)!r}), {work!r} + '/out{i}');"
                    "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1);"
                    "print(time.perf_counter() - t, hwm)")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            took, peak_kib = out.stdout.strip().splitlines()[-1].split()
            seconds.append(float(took))
            rss.append(int(peak_kib) * 1024)
        manifest = json.loads((Path(work) / "out0" / "manifest.json").read_text())
    return {"rows": rows, "repeats": repeats, "seconds": statistics.median(seconds),
            "rows_per_s": rows / statistics.median(seconds), "peak_rss_bytes": max(rss),
            "rows_out": sum(v["rows"] for v in manifest["splits"].values()),
            "duplicates": sum(v["duplicates"] for v in manifest["sources"].values())}


def section(m: dict, b5: dict) -> list[str]:
    sizes = b5["sizes"]
    first = sizes[0]
    lines = [
        "## B5: data prep at scale",
        "",
        "Three sources (CSV, JSON lines, Parquet; about 10% duplicate texts), `prepare` in a fresh "
        f"process, {first['repeats']} repeats, medians. The time covers reading, mapping, dedup, the "
        "split and writing, not the interpreter's start. Targets: 10M rows in at most 12x the 1M time, "
        "peak RSS at 10M at most 2 GiB.",
        "",
        "| rows in | rows out | seconds | rows/s | peak RSS | time vs first | RSS vs first |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in sizes:
        lines.append(
            f"| {size['rows']:,} | {size['rows_out']:,} | {size['seconds']:.1f} | "
            f"{size['rows_per_s']:,.0f} | "
            f"{size['peak_rss_bytes'] / 2**30:.2f} GiB | {size['seconds'] / first['seconds']:.1f}x | "
            f"{size['peak_rss_bytes'] / first['peak_rss_bytes']:.2f}x |")
    return lines
