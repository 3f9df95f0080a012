"""How one optimizer step is split into micro-batches changes nothing the model learns."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from cockatoo_lib.plan.catalogue import resolve_plan
from cockatoo_lib.training.collate import PaddingCollator
from cockatoo_lib.training.models import load_base_model
from cockatoo_lib.training.trainer import CockatooTrainer, training_arguments

# Eight rows of unequal length; rows annotate different labels, one annotates none, so the
# micro-batches of a split hold unequal numbers of annotated rows.
ROWS = [
    ([2, 9, 14, 3], [1, 0, 0], [1, 1, 1]),
    ([2, 30, 41, 52, 63, 7, 3], [0, 1, 0], [1, 1, 0]),
    ([2, 11, 3], [0, 0, 1], [0, 0, 1]),
    ([2, 12, 13, 3], [0, 0, 0], [0, 0, 0]),
    ([2, 15, 16, 17, 18, 3], [1, 1, 0], [1, 1, 1]),
    ([2, 19, 3], [0, 0, 0], [1, 0, 0]),
    ([2, 21, 22, 23, 24, 25, 26, 27, 3], [0, 1, 1], [1, 1, 1]),
    ([2, 28, 29, 3], [1, 0, 0], [1, 0, 0]),
]


class _Gradients(TrainerCallback):
    def __init__(self):
        self.seen: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.seen = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _one_step_gradients(base, micro_batch: int, accumulation: int, loss: str, tmp_path):
    plan = resolve_plan("deberta", {"base_model": str(base), "batch_size": micro_batch,
                                    "gradient_accumulation_steps": accumulation, "loss": loss,
                                    "train_sampling_strategy": "random", "dataloader_num_workers": 0,
                                    "fp16": False, "tf32": False})
    torch.manual_seed(0)
    model = load_base_model(plan, ["a", "b", "c"])
    for module in model.modules():  # dropout would draw differently per micro-batch
        for attribute in ("p", "drop_prob"):
            if "Dropout" in type(module).__name__ and hasattr(module, attribute):
                setattr(module, attribute, 0.0)
    ids, labels, mask = zip(*ROWS)
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids],
                              "labels": labels, "label_mask": mask})
    args = training_arguments(plan, str(tmp_path / f"{micro_batch}x{accumulation}"), cuda=False)
    args.max_steps, args.max_grad_norm, args.eval_strategy = 1, 0.0, "no"
    args.load_best_model_at_end, args.save_strategy = False, "no"
    grads = _Gradients()
    CockatooTrainer(model=model, args=args, data_collator=PaddingCollator(0), train_dataset=data, plan=plan,
                    callbacks=[grads]).train()
    return grads.seen


@pytest.mark.parametrize("loss", ["asl", "bce"])
def test_one_steps_gradient_is_the_same_at_any_split(tiny_models, loss, tmp_path):
    whole = _one_step_gradients(tiny_models["deberta"], 8, 1, loss, tmp_path)
    assert whole and any(g.abs().sum() > 0 for g in whole.values())
    for micro_batch, accumulation in ((4, 2), (2, 4), (1, 8)):
        split = _one_step_gradients(tiny_models["deberta"], micro_batch, accumulation, loss, tmp_path)
        assert split.keys() == whole.keys()
        for name, grad in whole.items():
            where = f"{name} at {micro_batch} x {accumulation}"
            torch.testing.assert_close(split[name], grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, w=where: f"{w}: {m}")
