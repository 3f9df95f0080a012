"""The training step as CUDA runs it, compiled (torch_compile: torch.compile with inductor),
here on the CPU: the project's model, loss and label mask must compile, with gradient
checkpointing and the 8-bit optimizer the CUDA plan sets, and give eager's loss and update. A
compile failure in that code would otherwise first show on a user's GPU."""

import copy
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch._inductor.config

from cockatoo_lib.plan.catalogue import planned_card, resolve_plan
from cockatoo_lib.tokenize import load_tokenized
from cockatoo_lib.training.collate import COMPILE_WIDTH_MULTIPLE, PaddingCollator
from cockatoo_lib.training.models import load_base_model
from cockatoo_lib.training.optim import build_optimizer
from cockatoo_lib.training.trainer import CockatooTrainer

pytestmark = pytest.mark.slow


def _step(model, plan, batch):
    """One optimizer step through the trainer's own compute_loss; the loss."""
    trainer = SimpleNamespace(plan=plan, loss_weights=None, pos_weight=None,
                              args=SimpleNamespace(world_size=1))
    optimizer = build_optimizer(model, plan)
    loss = CockatooTrainer.compute_loss(trainer, model, dict(batch), num_items_in_batch=len(batch["labels"]))
    loss.backward()
    optimizer.step()
    return loss.detach()


def one_layer(base: Path, folder: Path) -> Path:
    """The tiny model with one layer: inductor's compile time grows with the unrolled graph,
    and one layer holds every kind of kernel (and checkpointed block) that two do."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(base)
    config.num_hidden_layers = 1
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def test_the_compiled_training_step_gives_eagers_loss_and_update(trained_run, tiny_models, tmp_path):
    assert shutil.which("cc"), "inductor compiles C++: install a C compiler (apt-get install gcc)"
    # The plan a CUDA card gets: compiled, checkpointed, 8-bit AdamW, ASL with the label mask.
    base = one_layer(tiny_models["deberta"], tmp_path / "one-layer")
    plan = resolve_plan("deberta", {"base_model": str(base), "gradient_checkpointing": True},
                        planned_card(80))
    assert plan.torch_compile and plan.gradient_checkpointing and plan.optimizer == "adamw_8bit"
    plan = plan.model_copy(update={"fp16": False, "bf16": False})  # the CPU computes in fp32
    datasets, info = load_tokenized(trained_run["tok"])
    rows = [datasets["train"][i] for i in range(8)]
    batch = PaddingCollator(0, pad_to_multiple_of=COMPILE_WIDTH_MULTIPLE)(rows)
    assert batch["label_mask"].min() == 0  # some labels masked: the mask is in the graph
    torch.manual_seed(0)
    eager = load_base_model(plan, info["labels"])
    eager.gradient_checkpointing_enable()
    eager.train()
    for module in eager.modules():  # compiled dropout draws other random numbers than eager's
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    compiled = copy.deepcopy(eager)
    want = _step(eager, plan, batch)
    # The CPU's vector instructions as /proc/cpuinfo lists them, without inductor's probe, which
    # builds and loads a test library per instruction set: half of a cold compile's time here.
    with torch._inductor.config.patch({"cpp.vec_isa_ok": True}):
        got = _step(torch.compile(compiled), plan, batch)
    # Inductor reorders float sums: fp32 results agree to about 1e-4 of the loss.
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)
