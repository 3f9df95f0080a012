"""B1 training throughput: the project's batching (per-batch padding + length-grouped
sampling) against padding every row to max length with random batches, same model, data and
machine, measured alternately in one run."""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time

import numpy as np

from bench.harness import DEBERTA_V3_BASE, social_media_lengths

KEY, TITLE = "b1", "B1 training throughput"


def add_arguments(parser) -> None:
    parser.add_argument("--steps", type=int, default=24,
                        help="B1 optimizer steps (one epoch) per measurement")


def run(args) -> dict:
    return bench_training(args.repeats, args.steps)


def synthetic_split(lengths: np.ndarray, vocab: int, labels: int, seed: int = 0):
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

    from cockatoo_lib.training.collate import PaddingCollator
    from cockatoo_lib.training.trainer import training_arguments

    torch.manual_seed(0)
    config = DebertaV2Config(**model_config, num_labels=7, problem_type="multi_label_classification")
    model = DebertaV2ForSequenceClassification(config)
    data = synthetic_split(lengths, config.vocab_size, 7)
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


def section(m: dict, b1: dict) -> list[str]:
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
