"""Benchmark harness: `make bench` runs the benchmarks and writes docs/benchmarks.md.

Each benchmark is a module of bench/ with KEY, TITLE, run(args), section(machine, result)
and, if it has options, add_arguments(parser); _benchmarks() lists them in the order they run.

B4 (bench/gpu.py, `make bench-gpu`) runs on a CUDA machine and B10 (bench/container_images.py,
`make bench-images`) beside a container engine; each writes its own section.

Every figure is a median over several repeats; every comparison a ratio of medians taken
side by side in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "build" / "bench"

# deberta-v3-base's published dimensions (config.json of microsoft/deberta-v3-base).
DEBERTA_V3_BASE = dict(vocab_size=128100, hidden_size=768, num_hidden_layers=12,
                       num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
                       relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm",
                       share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False,
                       type_vocab_size=0, max_relative_positions=-1)


def machine() -> dict:
    import bitsandbytes
    import torch
    import transformers

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d")}


def social_media_lengths(n: int, max_length: int, seed: int = 0) -> np.ndarray:
    """Token counts of short posts: lognormal with a mean near 40 and a long tail, capped at
    max_length (the tail's cap is where truncation puts the longest posts)."""
    rng = np.random.default_rng(seed)
    lengths = rng.lognormal(mean=3.35, sigma=0.75, size=n).astype(int) + 3
    return np.clip(lengths, 4, max_length)


def sample_texts(n: int, seed: int = 0) -> list[str]:
    import random

    import bench.make_sample_data as sample

    rng = random.Random(seed)
    templates = sample.NEUTRAL + sample.TOXIC + sample.SCAM + sample.HAM + sample.CHAT_BENIGN
    return [f"{sample.fill(rng.choice(templates), rng)} #{i}" for i in range(n)]


def posts(lengths: np.ndarray, seed: int = 0) -> list[str]:
    """Texts of about these many words, from the demo's templates (B1's length mix)."""
    words = " ".join(sample_texts(2000, seed)).split()
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(words) - lengths.max(), len(lengths))
    return [" ".join(words[s:s + n]) for s, n in zip(starts, lengths)]



# ------------------------------------------------------------------ report


B4_TEXT = [
    '## B4: GPU',
    '',
    '**Not measured.** No GPU was lent to the sessions that built B4; nothing here is estimated.',
    '`make bench-gpu` (bench/gpu.py, docs/gpu.md) writes this section on a CUDA machine: for',
    'deberta-v3-base, ModernBERT-large and CLIP ViT-L/14 (text rows, and rows with an image),',
    "built from their published configs with random weights on B1's lengths, the guide's split",
    'eager, the derived split eager and compiled, and the model alone as the ceiling; samples/s,',
    'real tokens/s, padding share, peak memory, MFU and share of the ceiling. Targets on one H100:',
    'ModernBERT-large at least 2,500 samples/s (about 21% MFU), deberta 4,000, CLIP text rows',
    '3,000, every model at least 10x its guide split, peak memory at most 90% of the card. On a',
    "machine with several GPUs, also `cockatoo train` on 1 GPU against all of them (B9's comparison).",
]


def _recorded_sections(path: Path) -> dict[str, list[str]]:
    """The sections of an existing report, by key ("b1", ...), to keep what this run did not measure."""
    if not path.is_file():
        return {}
    sections, key = {}, None
    for line in path.read_text().splitlines():
        if line.startswith("## B"):
            key = line[3:].split(":")[0].lower()
            sections[key] = []
        elif line.startswith("## ") or line.startswith("# "):
            key = None
        if key:
            sections[key].append(line)
    return {k: v[:-1] if v and not v[-1] else v for k, v in sections.items()}


def replace_section(path: Path, key: str, section: list[str]) -> None:
    """Write one section (`## B4: ...`) into the report written by `make bench`, in its place, or at
    the end where it has none yet: for the benchmarks measured elsewhere (B4 on a GPU, B10 with
    a container engine)."""
    text = path.read_text()
    heading = f"## {key.upper()}:"
    start = text.find(heading)
    if start < 0:
        path.write_text(text.rstrip("\n") + "\n\n" + "\n".join(section) + "\n")
        return
    end = text.find("\n## B", start + 1)
    rest = "\n" + text[end:] if end > 0 else "\n"
    path.write_text(text[:start] + "\n".join(section) + rest)


def write_report(results: dict, path: Path) -> None:
    """Rewrite the report: the sections measured now, and the recorded ones for the rest."""
    m = results["machine"]
    recorded = _recorded_sections(path)
    sections = {bench.KEY: bench.section for bench in _benchmarks()}
    measured = [k for k in sections if k in results]
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (bench/harness.py). Medians over repeats; each ratio compares",
        "medians measured side by side in the same run, alternating the two sides.",
        "",
        f"Machine of the last run ({', '.join(k.upper() for k in measured)}): {m['cores']} CPU cores "
        f"({m['cpu']}), GPU: {m['gpu'] or 'none'}; Python {m['python']}, torch {m['torch']}, transformers "
        f"{m['transformers']}, bitsandbytes {m['bitsandbytes']}; {m['date']}. Sections it did not measure "
        "(`--only`) keep the figures of the run that did, on the same kind of machine.",
    ]
    # In number order: those run here, B4 and B10 (measured elsewhere), and any recorded.
    for key in sorted({*sections, "b4", "b10", *recorded}, key=lambda k: int(k[1:])):
        if key in results:
            section = sections[key](m, results[key])
        elif key == "b4":
            section = recorded.get("b4", B4_TEXT)
        else:
            section = recorded.get(key)
        if section:
            lines += ["", *section]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _benchmarks() -> tuple:
    """The benchmarks `make bench` runs, in order (cheap first); B4 and B10 run elsewhere."""
    from bench import (
        backlog_scoring,
        data_parallel,
        image_prep,
        optimizer_memory,
        predict_speed,
        prepare_at_scale,
        quality,
        serving,
        tokenization,
        training_throughput,
    )

    return (optimizer_memory, tokenization, prepare_at_scale, image_prep, training_throughput, quality,
            predict_speed, backlog_scoring, data_parallel, serving)


def main() -> None:
    benchmarks = {bench.KEY: bench for bench in _benchmarks()}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    for bench in benchmarks.values():
        if hasattr(bench, "add_arguments"):
            bench.add_arguments(parser)
    parser.add_argument("--only", default=",".join(benchmarks),
                        help="comma-separated benchmarks to run (b1,...,b9 but b4); the rest of the "
                             "report keeps its recorded figures")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    only = [b.strip().lower() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(only) - set(benchmarks))
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; valid: {', '.join(sorted(benchmarks))}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    # The steps' progress lines would drown the report's; set here, for the whole process, not
    # in the bench functions, which tests call within a process whose logging they rely on.
    logging.getLogger("cockatoo_lib").setLevel(logging.WARNING)
    results = {"machine": machine()}
    for key, bench in benchmarks.items():
        if key in only:
            print(f"{bench.TITLE} ...", flush=True)
            results[key] = bench.run(args)
            print(json.dumps(results[key])[:2000], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
