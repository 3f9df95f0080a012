"""Tests that need CUDA (`make test-gpu`); skipped, with the reason, everywhere else. Each
guide model at tiny size: one training step in fp16 and in bf16, 8-bit optimizer state on the
card, the derived split at full width without running out of memory, compiled against eager."""

from __future__ import annotations

import pytest
import torch

from cockatoo_lib.plan.batch_split import derive_split
from cockatoo_lib.plan.catalogue import detect_hardware, resolve_plan
from cockatoo_lib.training.models import load_base_model
from cockatoo_lib.training.optim import build_optimizer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

LABELS = ["a", "b", "c"]
MODELS = ["deberta", "modernbert", "clip-vit"]


def _batch(rows: int, width: int) -> dict:
    return {"input_ids": torch.randint(5, 300, (rows, width), device="cuda"),
            "attention_mask": torch.ones(rows, width, dtype=torch.long, device="cuda")}


def _model(plan):
    return load_base_model(plan, LABELS).cuda().train()


@pytest.mark.parametrize("model_type", MODELS)
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_one_training_step(model_type, precision, tiny_models):
    plan = resolve_plan(model_type, {"base_model": str(tiny_models[model_type]), "fp16": precision == "fp16",
                                     "bf16": precision == "bf16"})
    model = _model(plan)
    optimizer = build_optimizer(model, plan)
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16):
        loss = model(**_batch(4, 16)).logits.float().pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("model_type", MODELS)
def test_eight_bit_state_on_the_card(model_type, tiny_models):
    plan = resolve_plan(model_type, {"base_model": str(tiny_models[model_type])})
    model = _model(plan)
    optimizer = build_optimizer(model, plan)
    model(**_batch(2, 16)).logits.sum().backward()
    optimizer.step()
    big = max(model.parameters(), key=lambda p: p.numel())
    assert optimizer.state[big]["state1"].dtype == torch.uint8 and optimizer.state[big]["state1"].is_cuda


@pytest.mark.parametrize("model_type", MODELS)
def test_the_derived_split_fits_at_max_length(model_type, tiny_models):
    """The published-size model at the split derived for this card, at full width: one forward
    and backward pass runs without out-of-memory."""
    from bench.gpu import build_model
    from cockatoo_lib.plan.batch_split import published_config

    hardware = detect_hardware()
    plan = resolve_plan(model_type, {}, hardware)
    split = derive_split(plan, hardware.memory_gib)
    model = build_model(model_type, published_config(model_type), labels=3).cuda().train()
    if split.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16 if plan.bf16 else torch.float16):
        model(**_batch(split.micro_batch, plan.max_length)).logits.float().sum().backward()
    peak = torch.cuda.max_memory_allocated() / 1024**3
    assert peak <= 0.9 * hardware.memory_gib


@pytest.mark.parametrize("model_type", MODELS)
def test_compiled_matches_eager(model_type, tiny_models):
    plan = resolve_plan(model_type, {"base_model": str(tiny_models[model_type])})
    torch.manual_seed(0)
    model = _model(plan).eval()
    batch = _batch(4, 32)
    with torch.no_grad():
        eager = model(**batch).logits
        compiled = torch.compile(model)(**batch).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)


def test_the_probe_runs_on_the_process_own_card(tiny_models, monkeypatch):
    """Each process of a data-parallel training probes its own card (LOCAL_RANK's), not GPU 0."""
    from cockatoo_lib.training.collate import PaddingCollator
    from cockatoo_lib.training.trainer import check_split_on_card

    plan = resolve_plan("deberta", {"base_model": str(tiny_models["deberta"])}, detect_hardware())
    model = load_base_model(plan, LABELS)
    rows = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [0, 1, 0],
             "label_mask": [1, 1, 1]}]
    last = torch.cuda.device_count() - 1
    monkeypatch.setenv("LOCAL_RANK", str(last))
    checked = check_split_on_card(model, plan, PaddingCollator(0, 8), rows)
    assert next(model.parameters()).device == torch.device("cuda", last)
    assert torch.cuda.current_device() == last
    assert checked.batch_size == plan.batch_size  # a tiny model holds the derived micro-batch at full width
