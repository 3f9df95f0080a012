"""B4: training throughput on a GPU (`make bench-gpu`).

Each guide model is built from its published config (cockatoo_lib/configs) with random
weights (nothing is downloaded) and trained through the project's own trainer, collator and
optimizer on B1's token lengths. Rows per model: the guide's split, eager; the split derived
for this card, eager; the derived split, compiled; and the model alone (forward and backward,
no trainer, no optimizer) at the same widths, as the ceiling. For CLIP, text rows and rows
with an image. On a machine with several GPUs, also `cockatoo train` on 1 GPU against all of
them (B9's comparison, bench.data_parallel.bench_processes).

MFU counts 6 × non-embedding parameters × real tokens (for CLIP image rows, the vision
tower's parameters × its 257 patch tokens as well) against the card's dense bf16 peak.

Without CUDA it prints one line and exits 0, leaving docs/benchmarks.md alone; the CPU test
(tests/test_bench.py) runs the same code on tiny configs so that it cannot rot.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.harness import RESULTS, ROOT, machine, replace_section, social_media_lengths
from bench.training_throughput import counting_trainer, synthetic_split

# Dense bf16 peaks in TFLOP/s (without sparsity), by the name torch reports.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}
GUIDE_MODELS = ("deberta", "modernbert", "clip-vit")


def peak_flops(device_name: str) -> float | None:
    for key, tflops in PEAK_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


def build_model(model_type: str, config: dict, labels: int):
    """A classifier of the published (or given) architecture with random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from cockatoo_lib.training.models import CLIPClassifier

    torch.manual_seed(0)
    hf_config = AutoConfig.for_model(**config, num_labels=labels)
    if hf_config.model_type == "clip":
        return CLIPClassifier(hf_config)
    return AutoModelForSequenceClassification.from_config(hf_config)


WARM_STEPS = 3


def tower_parameters(model, vision: bool) -> int:
    """Non-embedding parameters of the text model, or of CLIP's vision tower."""
    return sum(p.numel() for name, p in model.named_parameters()
               if "embed" not in name and ("vision" in name) == vision)


def _with_images(data, size: int):
    """Every row with an image: random uint8 pixels as the tokenize cache stores them."""
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, 3 * size * size, dtype=np.uint8).tobytes() for _ in range(len(data))]
    spec = {"shape": [3, size, size], "dtype": "uint8", "rescale_factor": 1 / 255,
            "image_mean": [0.481, 0.458, 0.408], "image_std": [0.269, 0.261, 0.276]}
    from cockatoo_lib.data.clip_images import PIXEL_COLUMN

    return data.add_column(PIXEL_COLUMN, pixels), spec


class _StepClock:
    """The time at the end of each optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                clock.ends.append(time.perf_counter())

        self.ends: list[float] = []
        self.callback = Callback()


def measure(model_type: str, config: dict, plan, lengths: np.ndarray, steps: int, *,
            compiled: bool = False, model_only: bool = False, images: bool = False) -> dict:
    """One row of B4: `steps` optimizer steps (or forward-backward passes for `model_only`)
    after WARM_STEPS unmeasured ones."""
    import torch

    from cockatoo_lib.training.collate import PaddingCollator
    from cockatoo_lib.training.sampling import LengthGroupedShuffle
    from cockatoo_lib.training.trainer import pad_multiple, training_arguments

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = build_model(model_type, config, labels=7)
    text_config = getattr(model.config, "text_config", model.config)
    data, pixels = synthetic_split(lengths, text_config.vocab_size, 7), None
    if images:
        data, pixels = _with_images(data, model.config.vision_config.image_size)
    plan = plan.model_copy(update={"torch_compile": compiled})
    collator = PaddingCollator(0, pad_multiple(plan, cuda), pixels, plan.max_length)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    total = steps + WARM_STEPS
    clock = _StepClock()
    if model_only:  # the trainer's batches (same sampler, same widths), without trainer or optimizer
        model.to(device).train()
        dtype = torch.bfloat16 if plan.bf16 else torch.float16 if plan.fp16 else torch.float32
        order = np.fromiter(LengthGroupedShuffle(lengths, plan.batch_size, plan.seed), dtype=np.int64)
        seen = {"tokens": 0, "real": 0}
        start = time.perf_counter()
        for k in range(total * plan.gradient_accumulation_steps):
            first = k * plan.batch_size % len(order)
            idx = order[first:first + plan.batch_size]
            batch = collator([data[int(i)] for i in idx])
            seen["tokens"] += batch["input_ids"].numel()
            seen["real"] += int(batch["attention_mask"].sum())
            inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()
                      if k in ("input_ids", "attention_mask", "pixel_values", "has_image")}
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                model(**inputs).logits.float().sum().backward()
            model.zero_grad(set_to_none=True)
            clock.callback.on_step_end(None, None, None)
    else:
        with tempfile.TemporaryDirectory() as work:
            args = dataclasses.replace(
                training_arguments(plan, work, cuda=cuda), eval_strategy="no",
                save_strategy="no", logging_strategy="no", load_best_model_at_end=False,
                disable_tqdm=True, max_steps=total)
            trainer, seen = counting_trainer(model, args, collator, data, plan, [clock.callback])
            start = time.perf_counter()
            trainer.train()
    # The model alone logs each micro-batch; the trainer each optimizer step.
    step_ends = clock.ends[plan.gradient_accumulation_steps - 1::plan.gradient_accumulation_steps] \
        if model_only else clock.ends
    warm_end = step_ends[WARM_STEPS - 1]
    seconds = step_ends[-1] - warm_end
    step_seconds = seconds / steps
    rows = steps * plan.effective_batch_size
    real_share = seen["real"] / max(seen["tokens"], 1)
    real_tokens = float(lengths.mean()) * rows
    peak = peak_flops(torch.cuda.get_device_name(0)) if cuda else None
    flops = 6 * tower_parameters(model, vision=False) * real_tokens
    if images:
        vision = model.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2 + 1
        flops += 6 * tower_parameters(model, vision=True) * patches * rows
    return {"samples_per_s": rows / seconds, "real_tokens_per_s": real_tokens / seconds,
            "padding_share": 1 - real_share,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 1024**3 if cuda else None,
            "mfu": flops / seconds / peak if peak else None,
            "warm_up_seconds_beyond_steps": max(0.0, warm_end - start - WARM_STEPS * step_seconds)
            if compiled else None,
            "split": f"{plan.batch_size} x {plan.gradient_accumulation_steps}"
                     f"{' ckpt' if plan.gradient_checkpointing else ''}"}


def bench_model(model_type: str, config: dict, seed_plan, derived_plan, lengths: np.ndarray,
                steps: int, compile_rows: bool = True, images: bool = False) -> dict:
    """B4's rows for one model, measured side by side in one process (the CPU test leaves the
    compiled row out: inductor on CPU needs a C compiler and minutes)."""
    rows = {
        "guide split, eager": measure(model_type, config, seed_plan, lengths, steps, images=images),
        "derived split, eager": measure(model_type, config, derived_plan, lengths, steps, images=images),
    }
    if compile_rows:
        rows["derived split, compiled"] = measure(model_type, config, derived_plan, lengths, steps,
                                                  compiled=True, images=images)
    rows["model alone (ceiling)"] = measure(model_type, config, derived_plan, lengths, steps, model_only=True,
                                            images=images)
    ceiling = rows["model alone (ceiling)"]["samples_per_s"]
    for row in rows.values():
        row["share_of_ceiling"] = row["samples_per_s"] / ceiling
    best = rows.get("derived split, compiled", rows["derived split, eager"])
    rows["speedup_over_guide"] = best["samples_per_s"] / rows["guide split, eager"]["samples_per_s"]
    return rows


def bench_gpu(steps: int) -> dict:
    from cockatoo_lib.plan.batch_split import published_config
    from cockatoo_lib.plan.catalogue import detect_hardware, resolve_plan

    hardware = detect_hardware()
    results = {}
    for model_type in GUIDE_MODELS:
        seed = resolve_plan(model_type, {"batch_split": "seed", "dataloader_num_workers": 0}, hardware)
        derived = resolve_plan(model_type, {"dataloader_num_workers": 0}, hardware)
        lengths = social_media_lengths(derived.effective_batch_size * (steps + WARM_STEPS) * 2,
                                       derived.max_length)
        results[model_type] = bench_model(model_type, published_config(model_type), seed, derived, lengths,
                                          steps)
        if model_type == "clip-vit":
            results["clip-vit, images"] = bench_model(model_type, published_config(model_type), seed, derived,
                                                      lengths, steps, images=True)
    return results


def bench_all_gpus(rows: int, repeats: int) -> dict | None:
    """`cockatoo train` on 1 GPU against every GPU of the machine (B9's comparison, on CUDA:
    one process per GPU, NCCL); None with a single GPU."""
    import torch

    from bench.data_parallel import bench_processes

    gpus = torch.cuda.device_count()
    return bench_processes(rows, repeats, (1, gpus)) if gpus > 1 else None


def parallel_section(parallel: dict | None) -> list[str]:
    if parallel is None:
        return ["", "1 GPU against all: this machine has one GPU; nothing to compare."]
    one, n = parallel["counts"]
    rows = [f"| {k} | {r['samples_per_s']:,.0f} | {r['train_s']:.1f} | {int(r['steps'])} | "
            f"{int(r['effective_batch'])} ({int(r['accumulation'])}) |"
            for k, r in sorted(parallel["median"].items(), key=lambda kv: int(kv[0]))]
    return ["", f"1 GPU against all {n}: one epoch of `cockatoo train` ({parallel['model']}, "
                f"{parallel['train_rows']:,} rows, {parallel['repeats']} repeats alternating; torchrun, "
                "one process per GPU, NCCL).", "",
            "| GPUs | samples/s | train seconds | optimizer steps | effective batch (accumulation) |",
            "|---|---|---|---|---|", *rows, "",
            f"**{n} GPUs: {parallel['ratio_samples_per_s']:.2f}× the samples/s of {one}.**"]


def section(m: dict, b4: dict, parallel: dict | None = None) -> list[str]:
    lines = ["## B4: GPU", "",
             f"{m['gpu']}, `make bench-gpu` (bench/gpu.py), {m['date']}. Published configs, random weights, "
             "B1's lengths, the full training step (trainer, collator, 8-bit AdamW). MFU: 6 × non-embedding "
             "parameters × tokens (image rows: plus the vision tower × 257 patches) against the card's "
             "dense bf16 peak.", "",
             "| model | row | split | samples/s | real tokens/s | padding | peak GiB | MFU | % of ceiling |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model, rows in b4.items():
        for name, row in rows.items():
            if isinstance(row, dict):
                mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
                lines.append(f"| {model} | {name} | {row['split']} | {row['samples_per_s']:,.0f} | "
                             f"{row['real_tokens_per_s']:,.0f} | {row['padding_share']:.1%} | "
                             f"{row['peak_memory_gib']:.1f} | {mfu} | {row['share_of_ceiling']:.0%} |")
        lines.append(f"| {model} | derived compiled / guide eager | | **{rows['speedup_over_guide']:.1f}×** "
                     "| | | | | |")
    return lines + parallel_section(parallel)


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description="B4: training throughput on a GPU")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--parallel-rows", type=int, default=20_000, help="rows of 1 GPU against all")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("B4: no CUDA device here; nothing measured, docs/benchmarks.md left alone")
        return 0
    m = machine()
    b4 = bench_gpu(args.steps)
    parallel = bench_all_gpus(args.parallel_rows, 3)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "b4.json").write_text(json.dumps({"machine": m, "b4": b4, "parallel": parallel}, indent=2))
    replace_section(args.output, "b4", section(m, b4, parallel))
    print(f"wrote B4 into {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
