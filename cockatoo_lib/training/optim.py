"""Optimizers and layer-wise learning-rate decay (LLRD) parameter groups.

LLRD as the model switching guide specifies it: the head (classifier / head / pooler) at the
full learning rate (depth 0); transformer layer i of a stack of N at depth N - i, found by the
regex `\\.layers?\\.N\\.` (DeBERTa/BERT `encoder.layer.N.`, ModernBERT `layers.N.`, CLIP's two
towers `encoder.layers.N.`, each tower counted on its own); embeddings and everything else at
the lowest rate. lr(d) = learning_rate * decay ** d.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict

import torch
from torch import nn

from cockatoo_lib.plan.catalogue import Plan

log = logging.getLogger(__name__)

LAYER_RE = re.compile(r"^(.*)\.layers?\.(\d+)\.")
HEAD_RE = re.compile(r"(^|\.)(classifier|head|pooler)(\.|$)")


def _no_decay(param: nn.Parameter) -> bool:
    # Biases and normalization weights are 1-D; decaying them only hurts. This covers
    # LayerNorm.weight, layer_norm.weight and ModernBERT's *_norm.weight alike.
    return param.ndim < 2


def parameter_depths(model: nn.Module) -> dict[str, int]:
    """Depth of every trainable parameter: 0 for the head, up to N + 1 for embeddings."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    stacks: dict[str, int] = defaultdict(int)
    for name, _ in named:
        if m := LAYER_RE.match(name):
            stacks[m.group(1)] = max(stacks[m.group(1)], int(m.group(2)) + 1)
    bottom = max(stacks.values(), default=0) + 1
    depths = {}
    for name, _ in named:
        if m := LAYER_RE.match(name):
            depths[name] = stacks[m.group(1)] - int(m.group(2))
        elif HEAD_RE.search(name):
            depths[name] = 0
        else:
            depths[name] = bottom
    return depths


def parameter_groups(model: nn.Module, plan: Plan) -> list[dict]:
    """Groups keyed by (learning rate, weight decay); LLRD only when the plan asks for it."""
    depths = parameter_depths(model) if plan.use_llrd else None
    groups: dict[tuple[float, float], list[nn.Parameter]] = defaultdict(list)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = plan.learning_rate * (plan.llrd_decay_factor ** depths[name] if depths else 1.0)
        wd = 0.0 if _no_decay(param) else plan.weight_decay
        groups[(lr, wd)].append(param)
    if depths:
        log.info("LLRD: %d depths, lr %.3g (head) to %.3g (embeddings)", max(depths.values()) + 1,
                 plan.learning_rate, plan.learning_rate * plan.llrd_decay_factor ** max(depths.values()))
    return [{"params": ps, "lr": lr, "weight_decay": wd}
            for (lr, wd), ps in sorted(groups.items(), reverse=True)]


def build_optimizer(model: nn.Module, plan: Plan) -> torch.optim.Optimizer:
    groups = parameter_groups(model, plan)
    if plan.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(groups, lr=plan.learning_rate)
        # bitsandbytes keeps per-parameter overrides in a process-wide manager: start it afresh,
        # so no earlier model's overrides (keyed by object ids) reach this one.
        manager = bnb.optim.GlobalOptimManager.get_instance()
        manager.initialize()
        if plan.embedding_state_bits == 32:
            # As transformers' adamw_bnb_8bit does: embeddings' rare rows get few, large updates,
            # which 8-bit block quantization of their state can distort.
            embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
            for module in embeddings:
                manager.register_module_override(module, "weight", {"optim_bits": 32})
            log.info("adamw_8bit: 32-bit state for %d embedding tables (%.1fM parameters)", len(embeddings),
                     sum(m.weight.numel() for m in embeddings) / 1e6)
        return optimizer
    if plan.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=plan.learning_rate)
    if plan.optimizer == "adam":
        return torch.optim.Adam(groups, lr=plan.learning_rate)
    return torch.optim.SGD(groups, lr=plan.learning_rate, momentum=0.9)
