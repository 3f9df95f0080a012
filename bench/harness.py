"""Benchmark harness: `make bench` runs it and writes docs/benchmarks.md.

B1  training throughput: the project's batching (per-batch padding + length-grouped
    sampling) against padding every row to max length with random batches, same model,
    data and machine, measured alternately in one run.
B2  tokenization: rows/s of a cold run over 100,000 rows, and a cache hit's time as a
    fraction of it.
B3  optimizer memory: bytes of optimizer state, bitsandbytes AdamW8bit against
    torch.optim.AdamW, for a model of deberta-v3-base's published size (random weights).
B4  GPU throughput (bench/gpu.py, `make bench-gpu` on a CUDA machine); not measured here.
B5  data prep at scale: 1,000,000 rows from three sources (CSV, JSON lines, Parquet) through
    `cockatoo prepare` in a fresh process: wall time and peak RSS.
B6  images for CLIP: photo-sized JPEGs through prepare (fetch, decode check) and tokenize
    (CLIP-L's image processor, cached uint8 pixels): seconds and disk per 1,000 images, and
    the per-batch cost of collating cached pixels against decoding the JPEGs each time.
B7  model quality on real, imbalanced, multi-label data (bench/quality.py): test macro-F1 of
    the default minilm recipe against the linear baseline on the same splits, and ASL
    against BCE.
B8  predict: rows/s of `cockatoo predict` (file in, file out) against transformers'
    pipeline("text-classification") on the same model folder and batch size.
B9  data-parallel path: `cockatoo train` in 1 and in 2 CPU processes (torchrun, gloo) on the
    same data and plan: samples/s and optimizer steps, a check of the path (B4 on a GPU
    machine measures what it buys).

Every figure is a median over several repeats; every comparison a ratio of medians taken
side by side in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.quality import QUALITY_ROWS, bench_quality

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


# ------------------------------------------------------------------ B1


def _synthetic_split(lengths: np.ndarray, vocab: int, labels: int, seed: int = 0):
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    return Dataset.from_dict({
        "input_ids": [rng.integers(5, vocab, size=n).tolist() for n in lengths],
        "attention_mask": [[1] * int(n) for n in lengths],
        "labels": rng.integers(0, 2, size=(len(lengths), labels)).tolist(),
        "label_mask": np.ones((len(lengths), labels), dtype=int).tolist(),
        "length": lengths.tolist(),
    })


class PadToMaxCollator:
    """What the original scripts did: every row padded to the model's max length."""

    def __init__(self, inner, max_length: int):
        self.inner, self.max_length = inner, max_length

    def __call__(self, features):
        batch = self.inner(features)
        width = self.max_length - batch["input_ids"].shape[1]
        if width > 0:
            import torch.nn.functional as F

            batch["input_ids"] = F.pad(batch["input_ids"], (0, width), value=self.inner.pad_token_id)
            batch["attention_mask"] = F.pad(batch["attention_mask"], (0, width), value=0)
        return batch


def counting_trainer(model, args, collator, data, plan, callbacks=None):
    """The project's trainer, and a count of the tokens it feeds the model (`tokens`, padding
    included, and `real`), filled as it trains."""
    from cockatoo_lib.training.trainer import CockatooTrainer

    trainer = CockatooTrainer(model=model, args=args, data_collator=collator, train_dataset=data, plan=plan,
                              callbacks=callbacks)
    seen = {"tokens": 0, "real": 0}
    original = trainer.compute_loss

    def counting(model, inputs, *a, **k):
        seen["tokens"] += inputs["input_ids"].numel()
        seen["real"] += int(inputs["attention_mask"].sum())
        return original(model, inputs, *a, **k)

    trainer.compute_loss = counting
    return trainer, seen


def _throughput(model_config: dict, lengths: np.ndarray, plan, grouped: bool, steps: int) -> dict:
    import torch
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    from cockatoo_lib.training.trainer import PaddingCollator, training_arguments

    torch.manual_seed(0)
    config = DebertaV2Config(**model_config, num_labels=7, problem_type="multi_label_classification")
    model = DebertaV2ForSequenceClassification(config)
    data = _synthetic_split(lengths, config.vocab_size, 7)
    collator = PaddingCollator(0) if grouped else PadToMaxCollator(PaddingCollator(0), plan.max_length)
    run_plan = plan.model_copy(update={"train_sampling_strategy": "group_by_length" if grouped else "random"})
    with tempfile.TemporaryDirectory() as work:
        args = dataclasses.replace(
            training_arguments(run_plan, work, cuda=torch.cuda.is_available()),
            max_steps=steps, eval_strategy="no", save_strategy="no", logging_strategy="no",
            load_best_model_at_end=False, disable_tqdm=True)
        trainer, seen = counting_trainer(model, args, collator, data, run_plan)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    samples = steps * plan.batch_size * plan.gradient_accumulation_steps
    return {"samples_per_s": samples / seconds, "tokens_per_s": seen["real"] / seconds,
            "padded_tokens_per_s": seen["tokens"] / seconds,
            "padding_share": 1 - seen["real"] / max(seen["tokens"], 1)}


def bench_training(repeats: int, steps: int) -> dict:
    from cockatoo_lib.plan.catalogue import resolve_plan
    from cockatoo_lib.training.sampling import sorted_bound

    plan = resolve_plan("deberta", {"gradient_accumulation_steps": 1, "dataloader_num_workers": 0,
                                    "fp16": False, "tf32": False})
    # 2 CPU cores cannot train deberta-v3-base in benchmark time, so B1 uses its architecture
    # at a quarter of the width and a third of the depth; both sides use the same model.
    small = {**DEBERTA_V3_BASE, "hidden_size": 192, "num_hidden_layers": 4, "num_attention_heads": 4,
             "intermediate_size": 768, "vocab_size": 32000}
    # One whole epoch per measurement: length grouping orders batches longest first, so a
    # partial epoch would measure only the worst batches.
    lengths = social_media_lengths(plan.batch_size * steps, plan.max_length)
    runs = {"grouped": [], "padded": []}
    for _ in range(repeats):  # alternate, so drift on a noisy machine hits both alike
        runs["grouped"].append(_throughput(small, lengths, plan, True, steps))
        runs["padded"].append(_throughput(small, lengths, plan, False, steps))
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    return {"model": small, "batch_size": plan.batch_size, "max_length": plan.max_length,
            "steps": steps, "repeats": repeats,
            "length_mean": float(lengths.mean()), "length_p50": float(np.median(lengths)),
            "length_p99": float(np.percentile(lengths, 99)), "length_max": int(lengths.max()),
            "median": med, "sorted_bound": sorted_bound(lengths, plan.batch_size),
            "ratio_samples_per_s": med["grouped"]["samples_per_s"] / med["padded"]["samples_per_s"]}


# ------------------------------------------------------------------ B2


def _texts(n: int, seed: int = 0) -> list[str]:
    import random

    import bench.make_sample_data as sample

    rng = random.Random(seed)
    templates = sample.NEUTRAL + sample.TOXIC + sample.SCAM + sample.HAM + sample.CHAT_BENIGN
    return [f"{sample.fill(rng.choice(templates), rng)} #{i}" for i in range(n)]


def bench_tokenization(rows: int, repeats: int) -> dict:
    import pandas as pd

    from cockatoo_lib.data.prepare import load_data_config, prepare
    from cockatoo_lib.plan.catalogue import resolve_plan
    from cockatoo_lib.tokenize import tokenize

    plan = resolve_plan("minilm")
    cold, hit = [], []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        pd.DataFrame({"text": _texts(rows), "label": np.arange(rows) % 2}).to_parquet(work / "rows.parquet")
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
    return {"rows": rows, "repeats": repeats, "tokenizer": "all-MiniLM-L6-v2 (BERT WordPiece, fast)",
            "cold_s": statistics.median(cold), "hit_s": statistics.median(hit),
            "cold_rows_per_s": rows / statistics.median(cold),
            "hit_fraction": statistics.median(hit) / statistics.median(cold)}


# ------------------------------------------------------------------ B3


def optimizer_state_bytes(optimizer) -> int:
    import torch

    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if isinstance(v, torch.Tensor))


def bench_optimizer_memory() -> dict:
    """Optimizer state after one step, through the project's own build_optimizer."""
    import torch
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification

    from cockatoo_lib.plan.catalogue import resolve_plan
    from cockatoo_lib.training.optim import build_optimizer

    torch.manual_seed(0)
    model = DebertaV2ForSequenceClassification(DebertaV2Config(**DEBERTA_V3_BASE, num_labels=7))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    sizes = {}
    for name, overrides in (("adamw", {"optimizer": "adamw"}),
                            ("adamw_8bit", {"optimizer": "adamw_8bit", "embedding_state_bits": 8}),
                            ("adamw_8bit_embeddings_32bit",
                             {"optimizer": "adamw_8bit", "embedding_state_bits": 32})):
        optimizer = build_optimizer(model, resolve_plan("deberta", overrides))
        optimizer.step()  # state is created on the first step
        sizes[name] = optimizer_state_bytes(optimizer)
        del optimizer
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return {"parameters": sum(p.numel() for p in params), "embedding_parameters": embeddings, "bytes": sizes,
            "ratio": sizes["adamw_8bit"] / sizes["adamw"],
            "ratio_embeddings_32bit": sizes["adamw_8bit_embeddings_32bit"] / sizes["adamw"]}


# ------------------------------------------------------------------ B5


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


# ------------------------------------------------------------------ B6


def photo_jpeg(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    """A JPEG that encodes like a photo: smooth regions plus sensor-like noise, quality 85."""
    import io

    from PIL import Image

    w, h = size
    smooth = Image.fromarray(rng.integers(0, 255, (9, 12, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    noisy = np.asarray(smooth).astype(np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


PHOTO_SIZES = [(640, 480), (1024, 768), (480, 640), (800, 800), (1280, 720)]


def _clip_preprocessor_folder(folder: Path) -> Path:
    """CLIP-L/14's preprocessing without its weights (no network here): the demo model's
    tokenizer and CLIPImageProcessor's defaults, which are CLIP-L/14's (224, bicubic, its mean
    and std)."""
    from transformers import AutoTokenizer
    from transformers.models.clip import CLIPImageProcessorPil

    from cockatoo_lib.plan.catalogue import default_base_model, get_spec

    AutoTokenizer.from_pretrained(default_base_model(get_spec("minilm"))).save_pretrained(folder)
    CLIPImageProcessorPil().save_pretrained(folder)
    return folder


def bench_images(images: int, repeats: int) -> dict:
    import pandas as pd
    import torch

    from cockatoo_lib.data.clip_images import collate_pixels, load_image_processor, to_pixels
    from cockatoo_lib.data.prepare import load_data_config, prepare
    from cockatoo_lib.plan.catalogue import resolve_plan
    from cockatoo_lib.tokenize import load_tokenized, tokenize

    rng = np.random.default_rng(0)
    prep, tok, per_image_disk = [], [], None
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        (work / "img").mkdir()
        jpeg_bytes = 0
        for i in range(images):
            data = photo_jpeg(rng, PHOTO_SIZES[i % len(PHOTO_SIZES)])
            (work / "img" / f"{i}.jpg").write_bytes(data)
            jpeg_bytes += len(data)
        pd.DataFrame({"text": [f"post {i}" for i in range(images)],
                      "image": [f"img/{i}.jpg" for i in range(images)],
                      "label": np.arange(images) % 2}).to_csv(work / "posts.csv", index=False)
        (work / "data.yaml").write_text("labels: [scam]\nsources: [{name: s, path: posts.csv, "
                                        "image_column: image, labels: {scam: label}}]\n")
        folder = _clip_preprocessor_folder(work / "clip")
        plan = resolve_plan("clip-vit", {"base_model": str(folder)})
        for i in range(repeats):
            start = time.perf_counter()
            prepare(load_data_config(str(work / "data.yaml")), work / f"data{i}")
            prep.append(time.perf_counter() - start)
            start = time.perf_counter()
            info = tokenize(work / f"data{i}", plan, work / f"tok{i}", str(work / f"cache{i}"))
            tok.append(time.perf_counter() - start)
            entry = work / f"cache{i}" / "tokenized" / info["cache_key"]
            per_image_disk = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()) / images
        # Per batch of the registry's 16: collate cached pixels, or decode and resize JPEGs.
        processor = load_image_processor(str(folder))
        train = load_tokenized(work / "tok0")[0]["train"]
        spec, batch = info["images"], 16
        cached = [train[j]["pixel_values"] for j in range(batch)]
        jpegs = [(work / "img" / f"{j}.jpg").read_bytes() for j in range(batch)]
        collate_s, decode_s = [], []
        for _ in range(repeats * 5):
            start = time.perf_counter()
            collate_pixels(cached, spec)
            collate_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            pixels = to_pixels(jpegs, processor)
            collate_pixels(pixels, spec)
            decode_s.append(time.perf_counter() - start)
    per_1000 = 1000 / images
    return {"images": images, "repeats": repeats, "threads": torch.get_num_threads(),
            "jpeg_kib_mean": jpeg_bytes / images / 1024, "sizes": [f"{w}x{h}" for w, h in PHOTO_SIZES],
            "prepare_s_per_1000": statistics.median(prep) * per_1000,
            "tokenize_s_per_1000": statistics.median(tok) * per_1000,
            "cached_mib_per_1000": info["images"]["mib_per_1000_images"],
            "entry_mib_per_1000": per_image_disk * 1000 / 2**20,
            "jpeg_mib_per_1000": jpeg_bytes * per_1000 / 2**20,
            "collate_ms_per_batch": statistics.median(collate_s) * 1000,
            "decode_ms_per_batch": statistics.median(decode_s) * 1000}


# ------------------------------------------------------------------ report


# ------------------------------------------------------------------ B8


def posts(lengths: np.ndarray, seed: int = 0) -> list[str]:
    """Texts of about these many words, from the demo's templates (B1's length mix)."""
    words = " ".join(_texts(2000, seed)).split()
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(words) - lengths.max(), len(lengths))
    return [" ".join(words[s:s + n]) for s, n in zip(starts, lengths)]


def demo_model_folder(folder: Path, labels: list[str]) -> Path:
    """A cockatoo model folder of the demo's model (all-MiniLM-L6-v2, offline package) with an
    untrained head: throughput does not depend on what the head learnt."""
    from transformers import AutoTokenizer

    from cockatoo_lib.plan.catalogue import resolve_plan
    from cockatoo_lib.storage.fileio import write_json
    from cockatoo_lib.training.models import load_base_model
    from cockatoo_lib.training.trainer import MODEL_MANIFEST

    plan = resolve_plan("minilm")
    load_base_model(plan, labels).save_pretrained(folder)
    AutoTokenizer.from_pretrained(plan.base_model).save_pretrained(folder)
    write_json(folder / MODEL_MANIFEST, {
        "model_type": plan.model_type, "architecture": plan.architecture, "base_model": plan.base_model,
        "labels": labels, "thresholds": dict.fromkeys(labels, 0.5), "max_length": plan.max_length,
        "inference_max_length": plan.inference_max_length, "plan": plan.model_dump(mode="json")})
    return folder


def bench_predict(rows: int, repeats: int, batch_size: int = 64) -> dict:
    """`cockatoo predict` against transformers' pipeline, alternately, on one model and file."""
    import pandas as pd
    from transformers import pipeline

    from cockatoo_lib.plan.catalogue import resolve_plan
    from cockatoo_lib.release.predict import Classifier, predict_file

    labels = ["scam", "violence", "harassment", "hate_speech", "toxicity", "obscenity", "jailbreaking"]
    max_length = resolve_plan("minilm").inference_max_length
    lengths = social_media_lengths(rows, max_length)
    texts = posts(lengths)
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        folder = demo_model_folder(work / "model", labels)
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


# ------------------------------------------------------------------ B9


def bench_processes(rows: int, repeats: int, counts: tuple[int, int] = (1, 2)) -> dict:
    """One epoch of `cockatoo train` with each count of processes (one per GPU on CUDA),
    alternately, each a fresh command as a user runs it; samples/s over the Trainer's own
    training time. On 2 processes the plan's 16 x 2 becomes 16 x 2 processes x 1: the same
    effective batch, and about the same steps."""
    import json as json_
    import subprocess
    import sys

    import pandas as pd

    from cockatoo_lib.data.prepare import load_data_config, prepare
    from cockatoo_lib.plan.catalogue import resolve_plan
    from cockatoo_lib.tokenize import tokenize

    settings = {"num_epochs": 1, "dataloader_num_workers": 0, "early_stopping_patience": 0, "batch_size": 16,
                "gradient_accumulation_steps": 2}
    plan = resolve_plan("minilm", settings)
    rng = np.random.default_rng(0)
    runs: dict[int, list[dict]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
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
                subprocess.run([sys.executable, "-m", "cockatoo_lib.cli", "train", "--tokenized",
                                str(work / "tok"), "--output", str(out), "--model-type", "minilm",
                                *[f"--set={k}={v}" for k, v in settings.items()],
                                "--processes", str(processes)], check=True, capture_output=True)
                wall = time.perf_counter() - start
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
            "model": "all-MiniLM-L6-v2 (22M parameters), 1 label",
            "micro_batch": plan.batch_size, "max_length": plan.max_length, "median": med,
            "counts": list(counts),
            "ratio_samples_per_s": med[counts[1]]["samples_per_s"] / med[counts[0]]["samples_per_s"]}


def _section_b1(m: dict, b1: dict) -> list[str]:
    g, p = b1["median"]["grouped"], b1["median"]["padded"]
    return [
        "## B1: training throughput, per-batch padding + length grouping vs padding to max length",
        "",
        f"DeBERTa-v2 architecture at reduced size on CPU (hidden {b1['model']['hidden_size']}, "
        f"{b1['model']['num_hidden_layers']} layers, vocab {b1['model']['vocab_size']}), the registry's "
        f"batch {b1['batch_size']} and max length {b1['max_length']}, {b1['steps']} optimizer steps "
        f"(adamw_8bit, ASL), {b1['repeats']} repeats. Token lengths: mean {b1['length_mean']:.1f}, "
        f"median {b1['length_p50']:.0f}, p99 {b1['length_p99']:.0f}, max {b1['length_max']}.",
        "",
        "| batching | samples/s | real tokens/s | tokens/s incl. padding | padding share |",
        "|---|---|---|---|---|",
        f"| project: per-batch padding, group_by_length | {g['samples_per_s']:.2f} | {g['tokens_per_s']:.0f} "
        f"| {g['padded_tokens_per_s']:.0f} | {g['padding_share']:.1%} |",
        f"| original: pad to {b1['max_length']}, random batches | {p['samples_per_s']:.2f} | "
        f"{p['tokens_per_s']:.0f} | {p['padded_tokens_per_s']:.0f} | {p['padding_share']:.1%} |",
        "",
        f"**Ratio: {b1['ratio_samples_per_s']:.2f}× samples/s** (target: at least 3×).",
        *(["", f"Padding of the project's batches against the bound of sorting every row by length: "
           f"{g['padding_share']:.1%} against {b1['sorted_bound']:.1%} "
           f"({g['padding_share'] / max(b1['sorted_bound'], 1e-9):.2f}×; target at most 1.25×)."]
          if "sorted_bound" in b1 else []),
    ]


def _section_b2(m: dict, b2: dict) -> list[str]:
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
        "",
        f"**A hit costs {b2['hit_fraction']:.1%} of a cold run** (target: at most 5%).",
    ]


def _section_b3(m: dict, b3: dict) -> list[str]:
    mib = {k: v / 2**20 for k, v in b3["bytes"].items()}
    return [
        "## B3: optimizer state memory",
        "",
        f"deberta-v3-base dimensions from its published config, random weights "
        f"({b3['parameters'] / 1e6:.1f}M parameters, {b3['embedding_parameters'] / 1e6:.1f}M of them in "
        "embedding tables), the project's build_optimizer, one optimizer step, bytes in optimizer state:",
        "",
        "| optimizer | state bytes | of AdamW's |",
        "|---|---|---|",
        f"| torch.optim.AdamW | {mib['adamw']:,.0f} MiB | 100% |",
        f"| bitsandbytes AdamW8bit, 8-bit state everywhere (`embedding_state_bits: 8`, default) | "
        f"{mib['adamw_8bit']:,.0f} MiB | {b3['ratio']:.1%} |",
        f"| bitsandbytes AdamW8bit, 32-bit state for embeddings (`embedding_state_bits: 32`) | "
        f"{mib['adamw_8bit_embeddings_32bit']:,.0f} MiB | {b3['ratio_embeddings_32bit']:.1%} |",
        "",
        f"**Ratio: {b3['ratio']:.1%}** with the default (target: at most 30%).",
    ]


def _section_b5(m: dict, b5: dict) -> list[str]:
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


def _section_b6(m: dict, b6: dict) -> list[str]:
    return [
        "## B6: images for CLIP",
        "",
        f"{b6['images']:,} generated photo-like JPEGs ({', '.join(b6['sizes'])}; mean "
        f"{b6['jpeg_kib_mean']:.0f} KiB), read from local disk, CLIP-L/14's image processor "
        f"(PIL backend, 224 × 224), {b6['repeats']} repeats, {m['cores']} cores. Per 1,000 images:",
        "",
        "| step | seconds | disk |",
        "|---|---|---|",
        f"| prepare (read, decode check, write Parquet) | {b6['prepare_s_per_1000']:.1f} | "
        f"{b6['jpeg_mib_per_1000']:.0f} MiB of JPEGs |",
        f"| tokenize (decode, resize, crop; write the cache entry) | {b6['tokenize_s_per_1000']:.1f} | "
        f"{b6['entry_mib_per_1000']:.0f} MiB entry, of which pixels {b6['cached_mib_per_1000']:.1f} MiB |",
        "",
        f"Per batch of 16 at training time: **{b6['collate_ms_per_batch']:.1f} ms** to collate cached "
        f"uint8 pixels (rescale and normalize) against **{b6['decode_ms_per_batch']:.0f} ms** to decode "
        "and resize the JPEGs instead "
        f"(ratio {b6['decode_ms_per_batch'] / b6['collate_ms_per_batch']:.0f}×). Float32 pixels would take "
        f"{4 * b6['cached_mib_per_1000']:.0f} MiB per 1,000 images.",
    ]


def _section_b7(m: dict, b7: dict) -> list[str]:
    from bench.quality import render

    return render(b7)


def _section_b8(m: dict, b8: dict) -> list[str]:
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


def _section_b9(m: dict, b9: dict) -> list[str]:
    one, two = b9["median"][1], b9["median"][2]
    row = "| {} | {:.1f} | {:.1f} | {:.1f} | {} | {} ({}) |"
    return [
        "## B9: data-parallel training on CPU (1 against 2 processes)",
        "",
        f"One epoch of `cockatoo train` on {b9['train_rows']:,} training rows of B1's length mix "
        f"({b9['rows']:,} prepared), {b9['model']}, micro-batch {b9['micro_batch']}, max length "
        f"{b9['max_length']}, {m['cores']} CPU cores, {b9['repeats']} repeats alternating; each a fresh "
        "command. Two processes: torchrun, gloo, one thread each (torchrun's default) against one "
        "process with every core.",
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


SECTIONS = {"b1": _section_b1, "b2": _section_b2, "b3": _section_b3, "b5": _section_b5,
            "b6": _section_b6, "b7": _section_b7, "b8": _section_b8, "b9": _section_b9}
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
    measured = [k for k in SECTIONS if k in results]
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
    for key in ("b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8", "b9", "b10"):
        if key in results:
            section = SECTIONS[key](m, results[key])
        elif key == "b4":
            section = recorded.get("b4", B4_TEXT)
        else:
            section = recorded.get(key)
        if section:
            lines += ["", *section]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


BENCHES = ("b3", "b2", "b5", "b6", "b1", "b7", "b8", "b9")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24,
                        help="B1 optimizer steps (one epoch) per measurement")
    parser.add_argument("--rows", type=int, default=100_000, help="B2 rows")
    parser.add_argument("--prepare-rows", type=int, default=1_000_000, help="B5 rows")
    parser.add_argument("--images", type=int, default=1000, help="B6 images")
    parser.add_argument("--quality-rows", type=int, default=QUALITY_ROWS, help="B7 rows (0: all 7,674)")
    parser.add_argument("--predict-rows", type=int, default=4000, help="B8 rows")
    parser.add_argument("--parallel-rows", type=int, default=1000, help="B9 rows")
    parser.add_argument("--only", default=",".join(BENCHES),
                        help="comma-separated benchmarks to run (b1,...,b9 but b4); the rest of the "
                             "report keeps its recorded figures")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    only = [b.strip().lower() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(only) - set(BENCHES))
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; valid: {', '.join(sorted(BENCHES))}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    # The steps' progress lines would drown the report's; set here, for the whole process, not
    # in the bench functions, which tests call within a process whose logging they rely on.
    logging.getLogger("cockatoo_lib").setLevel(logging.WARNING)
    runs = {
        "b3": ("B3 optimizer memory", lambda: bench_optimizer_memory()),
        "b2": ("B2 tokenization", lambda: bench_tokenization(args.rows, args.repeats)),
        "b5": ("B5 data prep at scale", lambda: bench_prepare_at_scale(args.prepare_rows, args.repeats)),
        "b6": ("B6 images", lambda: bench_images(args.images, args.repeats)),
        "b1": ("B1 training throughput", lambda: bench_training(args.repeats, args.steps)),
        "b7": ("B7 quality on real imbalanced data", lambda: bench_quality(RESULTS, args.quality_rows)),
        "b8": ("B8 predict", lambda: bench_predict(args.predict_rows, args.repeats)),
        "b9": ("B9 data-parallel training", lambda: bench_processes(args.parallel_rows, args.repeats)),
    }
    results = {"machine": machine()}
    for key in BENCHES:
        if key in only:
            title, run = runs[key]
            print(f"{title} ...", flush=True)
            results[key] = run()
            print(json.dumps(results[key])[:2000], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
