"""B3 optimizer memory: bytes of optimizer state, bitsandbytes AdamW8bit against
torch.optim.AdamW, for a model of deberta-v3-base's published size (random weights)."""

from __future__ import annotations

from bench.harness import DEBERTA_V3_BASE

KEY, TITLE = "b3", "B3 optimizer memory"


def run(args) -> dict:
    return bench_optimizer_memory()


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


def section(m: dict, b3: dict) -> list[str]:
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
