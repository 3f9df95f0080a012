"""B9 data-parallel path: `cockatoo train` in 1 and in 2 CPU processes (torchrun, gloo) on the
same data and plan: samples/s and optimizer steps, a check of the path (B4 on a GPU machine
measures what it buys)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.harness import posts, social_media_lengths

KEY, TITLE = "b9", "B9 data-parallel training"


def add_arguments(parser) -> None:
    parser.add_argument("--parallel-rows", type=int, default=1000, help="B9 rows")


def run(args) -> dict:
    return bench_processes(args.parallel_rows, args.repeats)


def bench_processes(rows: int, repeats: int, counts: tuple[int, int] = (1, 2),
                    keep: Path | None = None, model_type: str = "minilm",
                    base_model: str | None = None) -> dict:
    """One epoch of `cockatoo train` with each count of processes (one per GPU on CUDA),
    alternately, each a fresh command as a user runs it, with a checkpoint root as the pipeline
    always gives it; samples/s over the Trainer's own training time. On 2 processes the plan's
    16 x 2 becomes 16 x 2 processes x 1: the same effective batch, and about the same steps.
    With `keep`, the runs stay there: model-N-I, its checkpoint root ck-N-I (the last
    checkpoint kept) and its log log-N-I.txt for N processes, repeat I. `model_type` and
    `base_model` replace MiniLM (the tests train a tiny model)."""
    import json as json_
    import subprocess
    import sys

    import pandas as pd

    from cockatoo_lib.data.prepare import load_data_config, prepare
    from cockatoo_lib.plan.catalogue import resolve_plan
    from cockatoo_lib.tokenize import tokenize

    settings = {"num_epochs": 1, "dataloader_num_workers": 0, "early_stopping_patience": 0, "batch_size": 16,
                "gradient_accumulation_steps": 2, **({"base_model": base_model} if base_model else {})}
    plan = resolve_plan(model_type, settings)
    rng = np.random.default_rng(0)
    runs: dict[int, list[dict]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as scratch:
        work = keep or Path(scratch)
        texts = posts(social_media_lengths(rows, plan.max_length))
        pd.DataFrame({"text": texts, "label": (rng.random(rows) < 0.3).astype(int)}).to_parquet(
            work / "rows.parquet")
        (work / "data.yaml").write_text(
            "labels: [scam]\nsources: [{name: s, path: rows.parquet, labels: {scam: label}}]\n")
        prepare(load_data_config(str(work / "data.yaml")), work / "data")
        tokenize(work / "data", plan, work / "tok", str(work / "cache"))
        train_rows = json_.loads((work / "data" / "manifest.json").read_text())["splits"]["train"]["rows"]
        for i in range(repeats):
            for processes in counts:
                out = work / f"model-{processes}-{i}"
                start = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", "cockatoo_lib.cli", "train", "--tokenized",
                                       str(work / "tok"), "--output", str(out), "--model-type", model_type,
                                       *[f"--set={k}={v}" for k, v in settings.items()],
                                       "--processes", str(processes), "--checkpoint-root",
                                       str(work / f"ck-{processes}-{i}"), "--keep-checkpoints", "1"],
                                      capture_output=True, text=True)
                wall = time.perf_counter() - start
                (work / f"log-{processes}-{i}.txt").write_text(done.stderr)
                if done.returncode:
                    raise RuntimeError(f"{processes}-process training failed: {done.stderr[-3000:]}")
                manifest = json_.loads((out / "cockatoo.json").read_text())
                split = manifest["batch_split"]
                runs[processes].append({"wall_s": wall, "train_s": manifest["train_seconds"],
                                        "steps": manifest["optimizer_steps"],
                                        "effective_batch": split["effective_batch"],
                                        "accumulation": split["gradient_accumulation_steps"]})
    med = {n: {k: statistics.median(r[k] for r in v) for k in v[0]} for n, v in runs.items()}
    for m in med.values():
        m["samples_per_s"] = train_rows / m["train_s"]
    return {"rows": rows, "train_rows": train_rows, "repeats": repeats,
            "model": base_model or "all-MiniLM-L6-v2 (22M parameters), 1 label",
            "micro_batch": plan.batch_size, "max_length": plan.max_length, "median": med,
            "counts": list(counts),
            "ratio_samples_per_s": med[counts[1]]["samples_per_s"] / med[counts[0]]["samples_per_s"]}


def section(m: dict, b9: dict) -> list[str]:
    one, two = b9["median"][1], b9["median"][2]
    row = "| {} | {:.1f} | {:.1f} | {:.1f} | {} | {} ({}) |"
    return [
        "## B9: data-parallel training on CPU (1 against 2 processes)",
        "",
        f"One epoch of `cockatoo train` on {b9['train_rows']:,} training rows of B1's length mix "
        f"({b9['rows']:,} prepared), {b9['model']}, micro-batch {b9['micro_batch']}, max length "
        f"{b9['max_length']}, {m['cores']} CPU cores, {b9['repeats']} repeats alternating; each a fresh "
        "command, with a checkpoint root as the pipeline gives one (a checkpoint at the epoch's end). "
        "Two processes: torchrun, gloo, one thread each (torchrun's default) against one process with "
        "every core.",
        "",
        "| processes | samples/s | train seconds | command seconds | optimizer steps | "
        "effective batch (accumulation) |",
        "|---|---|---|---|---|---|",
        row.format(1, one["samples_per_s"], one["train_s"], one["wall_s"], int(one["steps"]),
                   int(one["effective_batch"]), int(one["accumulation"])),
        row.format(2, two["samples_per_s"], two["train_s"], two["wall_s"], int(two["steps"]),
                   int(two["effective_batch"]), int(two["accumulation"])),
        "",
        f"**Ratio: {b9['ratio_samples_per_s']:.2f}× samples/s** with 2 processes. On 2 cores this checks the "
        "path (the effective batch kept by lowering the accumulation, the steps per epoch, one model "
        "written), not a speed-up: both "
        "sides share the same two cores. B4, on a GPU machine, is where data parallelism pays.",
    ]
