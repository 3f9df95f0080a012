"""The micro-batch split derived from a card's memory (cockatoo_lib/plan/batch_split.py)."""

from __future__ import annotations

import pytest
from helpers import error_line, run_cli

from cockatoo_lib.errors import CockatooError
from cockatoo_lib.plan.batch_split import Split, derive_split, estimate_bytes, parameter_count, probe
from cockatoo_lib.plan.catalogue import resolve_plan

GUIDE_MODELS = ["deberta", "modernbert", "clip-vit"]


@pytest.mark.parametrize(("model_type", "published"), [("deberta", 184e6), ("modernbert", 395e6),
                                                       ("clip-vit", 428e6)])
def test_the_kept_configs_are_the_published_architectures(model_type, published):
    total, embedding = parameter_count(model_type)
    assert abs(total - published) / published < 0.01
    assert 0 < embedding < total


@pytest.mark.parametrize("model_type", GUIDE_MODELS)
@pytest.mark.parametrize("memory_gib", [80, 40, 24, 16, 12])
def test_the_split_keeps_the_effective_batch_and_fits_the_card(model_type, memory_gib):
    seed = resolve_plan(model_type)
    split = derive_split(seed, memory_gib)
    assert split.micro_batch * split.accumulation == seed.effective_batch_size == 96
    assert split.estimated_gib <= 0.85 * memory_gib
    # The largest that fits: the next larger divisor of 96 would not.
    larger = [d for d in range(split.micro_batch + 1, 97) if 96 % d == 0]
    if larger:
        assert estimate_bytes(seed, larger[0], split.gradient_checkpointing) > 0.85 * memory_gib * 1024**3


def test_an_h100_takes_modernbert_large_at_32_or_more_without_checkpointing(capsys, monkeypatch):
    code, out, _ = run_cli(["plan", "-m", "modernbert", "--gpu-memory-gib", "80"], capsys, monkeypatch)
    rows = dict(line.split(None, 1) for line in out.strip().splitlines() if not line.startswith("adjustment"))
    assert code == 0
    assert int(rows["batch_size"]) >= 32 and rows["gradient_checkpointing"] == "False"
    assert rows["effective_batch_size"] == "96" and rows["bf16"] == "True"
    assert "batch split for a 80 GiB card" in out and "(was 8 x 12)" in out


def test_without_a_card_the_plan_is_the_seeds_and_a_setting_pins_it(capsys, monkeypatch):
    _, out, _ = run_cli(["plan", "-m", "modernbert"], capsys, monkeypatch)
    assert "batch_size                   8\n" in out and "gradient_checkpointing       True" in out
    _, out, _ = run_cli(["plan", "-m", "modernbert", "--gpu-memory-gib", "80", "--set", "batch_split=seed"],
                        capsys, monkeypatch)
    assert "batch_size                   8\n" in out and "adjustment" not in out


def test_a_split_the_user_sets_is_kept(capsys, monkeypatch):
    _, out, _ = run_cli(["plan", "-m", "modernbert", "--gpu-memory-gib", "80", "--set", "batch_size=4"],
                        capsys, monkeypatch)
    rows = dict(line.split(None, 1) for line in out.strip().splitlines() if not line.startswith("adjustment"))
    assert (rows["batch_size"], rows["gradient_accumulation_steps"], rows["bf16"]) == ("4", "12", "True")
    assert "batch split" not in out


def test_a_small_card_turns_checkpointing_on_only_when_nothing_useful_fits():
    plan = resolve_plan("modernbert")
    small = derive_split(plan, 8)
    assert small.gradient_checkpointing and small.micro_batch >= 8
    roomy = derive_split(plan, 16)
    assert not roomy.gradient_checkpointing and roomy.micro_batch >= 8
    with pytest.raises(CockatooError, match="does not fit 2 GiB"):
        derive_split(plan, 2)


def test_a_model_without_a_published_config_keeps_its_split():
    assert derive_split(resolve_plan("minilm"), 80) is None


def test_the_probe_steps_down_to_what_the_card_holds():
    split = Split(96, 1, False, 49.1, "estimate")
    tried = []

    def fits(micro):
        tried.append(micro)
        return micro <= 20

    found = probe(split, 96, fits)
    assert (found.micro_batch, found.accumulation) == (16, 6) and tried == [96, 48, 32, 24, 16]
    assert "held 16" in found.reason
    assert probe(split, 96, lambda micro: True) is split
    with pytest.raises(CockatooError, match="not even a micro-batch of 1"):
        probe(split, 96, lambda micro: False)


def test_a_card_size_out_of_range_is_one_line(capsys, monkeypatch):
    code, _, err = run_cli(["plan", "-m", "deberta", "--gpu-memory-gib", "0.5"], capsys, monkeypatch)
    assert code == 2 and "--gpu-memory-gib must be a number from 1 to 1024" in error_line(err)


def test_the_split_used_is_in_the_manifest_and_the_runs_metrics(tiny_models, small_data, tmp_path):
    from cockatoo_lib.evaluation.evaluate import evaluate, kfp_metrics
    from cockatoo_lib.tokenize import tokenize
    from cockatoo_lib.training.trainer import train

    plan = resolve_plan("deberta", {"base_model": str(tiny_models["deberta"]), "num_epochs": 1,
                                    "batch_size": 16, "gradient_accumulation_steps": 2,
                                    "dataloader_num_workers": 0, "batch_split": "seed"})
    tokenize(small_data, plan, tmp_path / "tok", cache_root=str(tmp_path / "cache"))
    manifest = train(tmp_path / "tok", plan, tmp_path / "model")
    assert manifest["batch_split"] == {
        "micro_batch": 16, "gradient_accumulation_steps": 2, "processes": 1, "effective_batch": 32,
        "gradient_checkpointing": False, "precision": "fp16", "torch_compile": False, "how": "seed",
        "why": ["the plan's values, pinned"]}
    scalars, _ = kfp_metrics(evaluate(tmp_path / "model", tmp_path / "tok", tmp_path / "eval"))
    assert (scalars["train_micro_batch"], scalars["train_gradient_accumulation_steps"],
            scalars["train_gradient_checkpointing"]) == (16, 2, 0)


def test_the_readmes_table_is_what_the_plan_derives():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme[readme.index("| model | guide split | derived, 80 GiB"):].split("\n\n")[0].splitlines()[2:]
    for line in table:
        model, guide, *derived = [c.strip() for c in line.strip("|").split("|")]
        seed = resolve_plan(model)
        assert guide.startswith(f"{seed.batch_size} × {seed.gradient_accumulation_steps}")
        for memory_gib, cell in zip((80, 24, 16), derived):
            split = derive_split(seed, memory_gib)
            assert cell == f"{split.micro_batch} × {split.accumulation}", (model, memory_gib)


def test_on_cuda_the_model_is_compiled_on_bucketed_widths_from_pinned_memory():
    from cockatoo_lib.training.collate import COMPILE_WIDTH_MULTIPLE, PaddingCollator
    from cockatoo_lib.training.trainer import pad_multiple, training_arguments

    plan = resolve_plan("deberta", {"fp16": False, "tf32": False})
    assert pad_multiple(plan, cuda=True) == COMPILE_WIDTH_MULTIPLE == 64
    assert pad_multiple(plan.model_copy(update={"torch_compile": False}), cuda=True) == 8
    assert pad_multiple(plan, cuda=False) == 1
    cpu = training_arguments(plan, "unused", cuda=False)
    assert not cpu.torch_compile and not cpu.dataloader_pin_memory
    batch = PaddingCollator(0, pad_multiple(plan, cuda=True), max_length=256)(
        [{"input_ids": [5] * n, "labels": [1], "label_mask": [1]} for n in (3, 70)])
    assert batch["input_ids"].shape == (2, 128) and batch["input_ids"].dtype.is_floating_point is False
