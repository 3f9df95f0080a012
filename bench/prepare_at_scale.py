"""B5 data prep at scale: 1,000,000 rows from three sources (CSV, JSON lines, Parquet) through
`cockatoo prepare` in a fresh process: wall time and peak RSS."""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

KEY, TITLE = "b5", "B5 data prep at scale"


def add_arguments(parser) -> None:
    parser.add_argument("--prepare-rows", type=int, default=1_000_000, help="B5 rows")


def run(args) -> dict:
    return bench_prepare_at_scale(args.prepare_rows, args.repeats)


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
    return [
        "## B5: data prep at scale",
        "",
        f"{b5['rows']:,} rows in three sources (CSV, JSON lines, Parquet; {b5['duplicates']:,} duplicate "
        f"texts dropped, {b5['rows_out']:,} rows out), `prepare` in a fresh process, "
        f"{b5['repeats']} repeats: "
        f"**{b5['seconds']:.1f} s** median ({b5['rows_per_s']:,.0f} rows/s), "
        f"**peak RSS {b5['peak_rss_bytes'] / 2**30:.2f} GiB** (targets: at most 60 s and 3 GB). "
        "The time covers reading, mapping, dedup, the split and writing, not the interpreter's start.",
    ]
