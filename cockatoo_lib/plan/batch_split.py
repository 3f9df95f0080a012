"""The micro-batch split of one optimizer step, derived from the card's memory.

The guide fixes each model's effective batch (micro-batch × accumulation × processes, 96 for
the three guide models); its split into micro-batches (8 × 12 with checkpointing for
ModernBERT-large) fits its authors' card. Here the micro-batch is the largest divisor of the
effective batch whose estimated peak memory at the worst-case width (max_length, and for CLIP
every row with an image) fits the card, and gradient checkpointing is on only when no
micro-batch of useful size fits without it. On CUDA, train then checks the estimate with a
real step at that width and steps down on out-of-memory (`probe`).

The estimate (bytes, mixed precision, after Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models"): per layer and sample, s·h·(15 + 19·r) for the
activations kept for backward, r being the MLP's width against 4h (× 1.5 for a gated MLP),
plus 5·a·s² for eager attention's scores (SDPA keeps none); with checkpointing, 2·s·h per
layer plus one layer's full set. Weights, gradients and 8-bit AdamW state: 12 bytes per
parameter. It is deliberately simple; the probe is what makes it safe.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Protocol

from cockatoo_lib.errors import CockatooError

log = logging.getLogger(__name__)


class BatchPlan(Protocol):
    """What a split needs of a plan (catalogue.Plan has it; this module does not import it)."""

    model_type: str
    max_length: int
    attention_implementation: str
    batch_size: int
    gradient_accumulation_steps: int

    @property
    def effective_batch_size(self) -> int: ...

GIB = 1024**3
HEADROOM = 0.85  # share of the card the estimate may fill: allocator fragmentation, workspaces
CONTEXT_BYTES = 1.0 * GIB  # CUDA context, cuBLAS workspaces, the collated batch
STATE_BYTES_PER_PARAMETER = 12  # fp32 weights and gradients, 8-bit AdamW's two moments
USEFUL_MICRO_BATCH = 8  # below this, checkpointing at a larger micro-batch is faster


@dataclass(frozen=True)
class Tower:
    tokens: int
    hidden: int
    layers: int
    heads: int
    mlp_ratio: float  # the MLP's activation width against 4 × hidden

    def activation_bytes(self, checkpointing: bool, eager_attention: bool) -> float:
        s, h = self.tokens, self.hidden
        layer = s * h * (15 + 19 * self.mlp_ratio) + (5 * self.heads * s * s if eager_attention else 0)
        if checkpointing:
            return 2 * s * h * self.layers + layer
        return layer * self.layers


@dataclass(frozen=True)
class Split:
    micro_batch: int
    accumulation: int
    gradient_checkpointing: bool
    estimated_gib: float
    reason: str


@cache
def published_config(model_type: str) -> dict | None:
    """The base model's published architecture (cockatoo_lib/configs), or None."""
    path = resources.files("cockatoo_lib") / "configs" / f"{model_type}.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    config.pop("_source", None)
    return config


def parameter_count(model_type: str) -> tuple[int, int]:
    """(all parameters, embedding parameters) of the published architecture."""
    from transformers import AutoConfig

    config = published_config(model_type)
    if config is None:
        raise CockatooError(f"no published config for {model_type}")
    return count_parameters(AutoConfig.for_model(**config))


def count_parameters(config) -> tuple[int, int]:
    """(all parameters, embedding parameters) of a transformers config's model, counted on the
    meta device (no memory, no download)."""
    import torch
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embed" in n)
    return total, embedding


def _tower(config: dict, tokens: int) -> Tower:
    gated = config.get("model_type") == "modernbert"  # ModernBERT's MLP is a GLU
    ratio = config["intermediate_size"] / (4 * config["hidden_size"]) * (1.5 if gated else 1.0)
    return Tower(tokens, config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
                 ratio)


def towers(plan: BatchPlan, config: dict) -> list[Tower]:
    if config["model_type"] == "clip":
        vision = config["vision_config"]
        patches = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
        return [_tower({**config["text_config"], "model_type": "clip"}, plan.max_length),
                _tower({**vision, "model_type": "clip"}, patches)]
    return [_tower(config, plan.max_length)]


@cache
def _parameters(model_type: str) -> int:
    return parameter_count(model_type)[0]


def estimate_bytes(plan: BatchPlan, micro_batch: int, checkpointing: bool) -> float:
    config = published_config(plan.model_type)
    eager = plan.attention_implementation == "eager"
    per_sample = sum(t.activation_bytes(checkpointing, eager) for t in towers(plan, config))
    return CONTEXT_BYTES + STATE_BYTES_PER_PARAMETER * _parameters(plan.model_type) + micro_batch * per_sample


def divisors(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def derive_split(plan: BatchPlan, memory_gib: float, processes: int = 1) -> Split | None:
    """Each process's split on a card of `memory_gib` when `processes` share the plan's effective
    batch, or None when the model has no published config."""
    if published_config(plan.model_type) is None:
        return None
    per_process = _per_process(plan.effective_batch_size, processes)
    budget = HEADROOM * memory_gib * GIB
    for checkpointing in (False, True):
        for micro in divisors(per_process):
            if not checkpointing and micro < min(USEFUL_MICRO_BATCH, per_process):
                break
            needed = estimate_bytes(plan, micro, checkpointing)
            if needed <= budget:
                why = (f"largest micro-batch that fits {memory_gib:g} GiB at width {plan.max_length} "
                       f"(estimated {needed / GIB:.1f} GiB of {HEADROOM:.0%})")
                if checkpointing:
                    why += f"; no micro-batch of {USEFUL_MICRO_BATCH} fits without checkpointing"
                return Split(micro, per_process // micro, checkpointing, round(needed / GIB, 1), why)
    raise CockatooError(f"{plan.model_type} does not fit {memory_gib:g} GiB even at micro-batch 1 with "
                        f"checkpointing (estimated {estimate_bytes(plan, 1, True) / GIB:.1f} GiB)")


def _per_process(effective: int, processes: int) -> int:
    if effective % processes:
        raise CockatooError(
            f"the effective batch of {effective} rows does not divide among {processes} processes; "
            "train on a number of GPUs that divides it, or pin the split (--set batch_size=N, or "
            f"--set batch_split=seed) to train at the nearest effective batch that {processes} processes "
            "can share")
    return effective // processes


def probe(split: Split, effective_per_process: int, fits: Callable[[int], bool]) -> Split:
    """Check `split` with `fits(micro_batch)` (a real step at the worst-case width: False on
    out-of-memory), stepping down through the divisors of the effective batch until one fits."""
    for micro in [d for d in divisors(effective_per_process) if d <= split.micro_batch]:
        if fits(micro):
            if micro == split.micro_batch:
                return split
            log.warning("batch split: micro-batch %d ran out of memory at full width; %d fits",
                        split.micro_batch, micro)
            return Split(micro, effective_per_process // micro, split.gradient_checkpointing,
                         split.estimated_gib, f"{split.reason}; the card held {micro} at full width, "
                         f"not {split.micro_batch}")
    raise CockatooError("not even a micro-batch of 1 fits this card at full width")


def split_for_processes(plan: BatchPlan, processes: int, pinned: bool) -> tuple[int, int, str]:
    """Data parallel without a card to derive from (CPU, a split the user pinned, a model without
    a published config): each of `processes` takes a micro-batch per step, so the plan's effective
    batch is kept by lowering the accumulation, and the micro-batch where the accumulation cannot
    absorb it. Returns (micro-batch, accumulation, note). Where `processes` does not divide the
    effective batch, that is an error, unless the user pinned the split: then the nearest
    effective batch at the pinned micro-batch is taken and the note says so."""
    target = plan.effective_batch_size
    if target % processes and pinned:
        accumulation = max(1, round(target / (plan.batch_size * processes)))
        effective = plan.batch_size * processes * accumulation
        return plan.batch_size, accumulation, (
            f"data parallel: micro-batch {plan.batch_size} x {processes} processes x accumulation "
            f"{accumulation} = {effective} rows per step, not the plan's {target} "
            f"({plan.batch_size} x {plan.gradient_accumulation_steps}), which {processes} processes cannot "
            "share evenly; kept because the split is pinned")
    per_process = _per_process(target, processes)
    micro = next(d for d in divisors(per_process) if d <= plan.batch_size)
    accumulation = per_process // micro
    note = (f"data parallel: micro-batch {micro} x {processes} processes x accumulation {accumulation} = "
            f"{target} rows per step (the plan's {plan.batch_size} x {plan.gradient_accumulation_steps})")
    if micro < plan.batch_size:
        note += f"; micro-batch lowered from {plan.batch_size}: each process takes {per_process} rows a step"
    return micro, accumulation, note
