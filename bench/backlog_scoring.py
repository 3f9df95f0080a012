"""B12 scoring a backlog: `cockatoo predict --output FOLDER/` at two sizes (time, peak RSS: memory
flat in the rows?) and the cockatoo-score pipeline's local run over the larger one in shards.

The model is all-MiniLM-L6-v2's tokenizer before a 1-layer, 32-wide encoder: what is measured is
the machinery around the model (reading, tokenizing, batching, writing shards, the pipeline's
steps). MiniLM itself scores ~100 rows/s on 2 cores (B8): a million rows would take hours here,
and on a GPU the time is the model's, B4's business."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.harness import posts, social_media_lengths

KEY, TITLE = "b12", "B12 scoring a backlog"
LABELS = ["scam", "violence", "harassment", "hate_speech", "toxicity", "obscenity", "jailbreaking"]


def add_arguments(parser) -> None:
    parser.add_argument("--backlog-rows", default="100000,1000000",
                        help="B12 predict sizes (the last is scored by the pipeline too)")
    parser.add_argument("--backlog-shards", type=int, default=4, help="B12 pipeline shards")


def run(args) -> dict:
    return bench_backlog([int(n) for n in args.backlog_rows.split(",")], args.backlog_shards)


def tiny_model_folder(folder: Path) -> Path:
    """A cockatoo model folder with MiniLM's tokenizer and manifest, and a 1-layer, 32-wide encoder."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from bench.predict_speed import demo_model_folder

    demo_model_folder(folder, LABELS)
    config = AutoConfig.from_pretrained(folder)
    config.update({"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                   "intermediate_size": 64})
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    return folder


def write_backlog(folder: Path, rows: int, file_rows: int = 250_000) -> Path:
    """`rows` posts of B1's length mix as Parquet files of `file_rows` (a day's posts, written
    hourly): the same files at every size, so that predict reads the same chunks."""
    import pandas as pd

    folder.mkdir(parents=True)
    texts = posts(social_media_lengths(rows, 256))
    for i, start in enumerate(range(0, rows, file_rows)):
        chunk = texts[start:start + file_rows]
        pd.DataFrame({"text": chunk, "ref": range(start, start + len(chunk))}).to_parquet(
            folder / f"part{i:02d}.parquet")
    return folder


def _measured(code: str) -> dict:
    """Run `code` in a fresh process; it prints one JSON line last."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


# The child's own peak (VmHWM): getrusage's maxrss survives exec and would carry this process's mark.
_PEAK = "int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024"


def bench_backlog(sizes: list[int], shards: int) -> dict:
    result: dict = {"model": "MiniLM's tokenizer, a 1-layer 32-wide encoder, 7 labels", "predict": [],
                    "shards": shards}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        model = tiny_model_folder(work / "model")
        for rows in sizes:
            backlog = write_backlog(work / f"in-{rows}", rows)
            code = ("import json, re, time; from cockatoo_lib.release.batch_predict import predict_folder;"
                    "t = time.perf_counter();"
                    f"m = predict_folder({str(model)!r}, {str(backlog)!r}, {str(work / f'out-{rows}')!r});"
                    f"print(json.dumps({{'rows': m['rows'], 'shards': m['shards'], "
                    f"'seconds': time.perf_counter() - t, 'peak_rss_bytes': {_PEAK}}}))")
            result["predict"].append(_measured(code))
        # The pipeline over the largest backlog: plan, a step per shard, finish, each its own process
        # (kfp.local); the peak is the largest step's, as this process waited for them.
        rows = sizes[-1]
        params = {"input_uri": str(work / f"in-{rows}"), "output_uri": str(work / "scored"),
                  "model": str(model), "shards": shards}
        code = ("import json, resource, time; from pipelines.runner import score_local;"
                f"t = time.perf_counter(); m = score_local({params!r}, {str(work / 'root')!r});"
                "print(json.dumps({'rows': m['rows'], 'shards': len(m['shards']), "
                "'seconds': time.perf_counter() - t, "
                "'shard_seconds': [s['seconds'] for s in m['shards']], "
                "'peak_rss_bytes': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))")
        result["pipeline"] = _measured(code)
    return result


def section(m: dict, b12: dict) -> list[str]:
    small, large = b12["predict"][0], b12["predict"][-1]
    pipeline = b12["pipeline"]
    lines = [
        "## B12: scoring a backlog",
        "",
        f"Posts of B1's length mix in Parquet files of 250,000 rows, {b12['model']}: the machinery around "
        "the model (read, tokenize, batch, write shards), not the model, is measured; all-MiniLM-L6-v2 "
        f"itself scores ~100 rows/s on these cores (B8). {m['cores']} CPU cores, one run each, in a fresh "
        "process.",
        "",
        "| | rows | seconds | rows/s | peak RSS |",
        "|---|---|---|---|---|",
    ]
    for p in b12["predict"]:
        lines.append(f"| `predict --output FOLDER/` | {p['rows']:,} | {p['seconds']:.1f} | "
                     f"{p['rows'] / p['seconds']:,.0f} | {p['peak_rss_bytes'] / 2**30:.2f} GiB |")
    lines += [
        f"| `cockatoo score`, {pipeline['shards']} shards one after another (kfp.local) | "
        f"{pipeline['rows']:,} | "
        f"{pipeline['seconds']:.1f} | {pipeline['rows'] / pipeline['seconds']:,.0f} | "
        f"{pipeline['peak_rss_bytes'] / 2**30:.2f} GiB (largest step) |",
        "",
        f"**Peak RSS at {large['rows']:,} rows: {large['peak_rss_bytes'] / small['peak_rss_bytes']:.2f}× "
        f"that at {small['rows']:,}** (target: at most 1.3×). The pipeline's shards took "
        f"{', '.join(f'{s:.0f}' for s in pipeline['shard_seconds'])} s each; on a cluster they run at once, "
        f"one pod each, so its time there is about the longest shard's plus the steps' starts.",
        "",
        "Memory follows the largest piece read at once, not the rows: a Parquet row group is read whole "
        "(these files hold one each; the 100,000-row backlog's is 100,000 rows) and cut into `--shard-rows` "
        "chunks (100,000), whose texts are tokenized 16,384 at a time.",
    ]
    return lines
