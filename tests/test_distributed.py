"""Data-parallel training: `cockatoo train --processes 2` on CPU (torchrun, gloo)."""

import subprocess
import sys

import pytest
from helpers import error_line, run_cli

from cockatoo_lib.errors import CockatooError
from cockatoo_lib.plan.catalogue import Hardware, resolve_plan
from cockatoo_lib.tokenize import tokenize
from cockatoo_lib.training.model_folder import MODEL_MANIFEST, read_model_manifest
from cockatoo_lib.training.trainer import train

# Trains, runs pipelines or starts servers: `make test` runs these, `make test-fast` not.
pytestmark = pytest.mark.slow

FAST = {"num_epochs": 1, "batch_size": 16, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
        "dataloader_num_workers": 0}


@pytest.mark.parametrize("micro, accumulation, processes, expected", [
    (24, 4, 2, (24, 2)),  # deberta's 24 x 4 on 2 GPUs: 24 x 2 processes x 2 = 96
    (24, 4, 4, (24, 1)),  # on 4: 24 x 4 x 1
    (24, 4, 8, (12, 1)),  # on 8: accumulation cannot go below 1, so the micro-batch halves: 12 x 8 x 1
    (8, 12, 8, (6, 2)),   # modernbert's 8 x 12 on 8: 12 rows each, largest divisor up to 8: 6 x 2
    (16, 1, 2, (8, 1)),   # nothing to lower but the micro-batch: 8 x 2 x 1 = 16, not 32
])
def test_data_parallel_keeps_the_effective_batch(micro, accumulation, processes, expected):
    plan = resolve_plan("deberta", {"batch_size": micro, "gradient_accumulation_steps": accumulation},
                        Hardware(cuda=False, processes=processes))
    assert (plan.batch_size, plan.gradient_accumulation_steps) == expected
    assert plan.processes == processes and plan.effective_batch_size == micro * accumulation
    assert any(f"= {micro * accumulation} rows per step" in note for note in plan.adjustments)


def test_a_count_of_processes_that_cannot_share_the_batch_is_an_error_unless_the_split_is_pinned(capsys,
                                                                                                  monkeypatch):
    with pytest.raises(CockatooError, match="effective batch of 96 rows does not divide among 5 processes"):
        resolve_plan("deberta", hardware=Hardware(cuda=False, processes=5))
    code, _, err = run_cli(["plan", "-m", "modernbert", "--gpu-memory-gib", "24", "--gpus", "5"], capsys,
                           monkeypatch)
    assert code == 2 and "does not divide among 5 processes" in error_line(err)
    pinned = resolve_plan("deberta", {"batch_size": 24}, Hardware(cuda=False, processes=5))
    split = (pinned.batch_size, pinned.gradient_accumulation_steps, pinned.effective_batch_size)
    assert split == (24, 1, 120)
    assert any("cannot share evenly; kept because the split is pinned" in n for n in pinned.adjustments)


def test_the_plan_for_several_cards_prints_each_process_split_and_the_whole_step(capsys, monkeypatch):
    code, out, _ = run_cli(["plan", "-m", "deberta", "--gpu-memory-gib", "80", "--gpus", "8"], capsys,
                           monkeypatch)
    rows = dict(line.split(None, 1) for line in out.strip().splitlines() if not line.startswith("adjustment"))
    assert code == 0
    assert (rows["batch_size"], rows["gradient_accumulation_steps"], rows["processes"]) == ("12", "1", "8")
    assert rows["effective_batch_size"] == "96"
    one = dict(line.split(None, 1) for line in run_cli(["plan", "-m", "deberta", "--gpu-memory-gib", "80"],
                                                         capsys, monkeypatch)[1].strip().splitlines()
               if not line.startswith("adjustment"))
    assert (one["batch_size"], one["processes"], one["effective_batch_size"]) == ("96", "1", "96")


def test_training_refuses_a_plan_made_for_another_count_of_processes(tiny_models, small_data, tmp_path):

    plan = resolve_plan("deberta", {**FAST, "base_model": str(tiny_models["deberta"])},
                        Hardware(cuda=False, processes=2))
    tokenize(small_data, plan, tmp_path / "tok", cache_root=str(tmp_path / "cache"))
    with pytest.raises(CockatooError, match="among 2 processes, but this training runs in 1"):
        train(tmp_path / "tok", plan, tmp_path / "model")
    assert not (tmp_path / "model").exists()


SETTLE = """
import os, sys
import torch.distributed as dist
from cockatoo_lib.plan.catalogue import resolve_plan
from cockatoo_lib.training.distributed import settle_micro_batch
plan = resolve_plan("deberta", {"batch_size": 48, "gradient_accumulation_steps": 1}).model_copy(
    update={"processes": 2})
# Process 1's card runs out of memory above 16 rows; process 0's holds all 48.
limit = 16 if os.environ["RANK"] == "1" else 48
settled = settle_micro_batch(plan, lambda micro: micro <= limit)
with open(sys.argv[1] + "-" + os.environ["RANK"], "w") as out:
    out.write(f"{settled.batch_size} x {settled.gradient_accumulation_steps}")
dist.destroy_process_group()
"""


def test_processes_agree_on_the_split_the_smallest_card_holds(tmp_path):
    script = tmp_path / "settle.py"
    script.write_text(SETTLE)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(script), str(tmp_path / "settled")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    # 16 x 3 on both: 48 rows per process, the most process 1's card holds.
    assert [(tmp_path / f"settled-{rank}").read_text() for rank in (0, 1)] == ["16 x 3", "16 x 3"]


def test_each_process_probes_its_own_card(monkeypatch):
    import torch

    from cockatoo_lib.training import distributed

    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.own_card() == torch.device("cuda", 3) and chosen == [torch.device("cuda", 3)]
    monkeypatch.setenv("LOCAL_RANK", "4")
    with pytest.raises(CockatooError, match="process 4 on this machine has no GPU of its own: 4 GPU"):
        distributed.own_card()


def test_two_processes_train_one_model_at_the_same_effective_batch(data_parallel_run):
    """The suite's one two-process training (B9's, conftest.data_parallel_run): the plan's 16 x 2
    becomes 16 x 2 processes x 1."""
    _, work = data_parallel_run
    assert "training in 2 processes (gloo backend)" in (work / "log-2-0.txt").read_text()
    # Checkpoints: both processes' RNG states in the one checkpoint process 0 published.
    (published,) = (work / "ck-2-0" / "checkpoints").glob("*/data-*")
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt"} <= {p.name for p in published.iterdir()}
    # Process 0 alone wrote: one model folder, nothing beside it, and a valid model.
    assert [p.name for p in work.iterdir() if "model-2-0" in p.name] == ["model-2-0"]
    single, double = read_model_manifest(work / "model-1-0"), read_model_manifest(work / "model-2-0")
    assert double["processes"] == 2 and single["processes"] == 1
    # The same 32 rows a step, 16 from each process: about as many optimizer steps as one process.
    assert abs(double["optimizer_steps"] - single["optimizer_steps"]) <= 1
    assert double["batch_split"]["effective_batch"] == single["batch_split"]["effective_batch"] == 32
    split = double["batch_split"]
    assert (split["micro_batch"], split["gradient_accumulation_steps"]) == (16, 1)
    saved = {p.name for p in (work / "model-2-0").iterdir()}
    assert {"model.safetensors", "tokenizer.json", MODEL_MANIFEST} <= saved
    assert double["labels"] == single["labels"]


LAUNCH_ONLY = """
import sys
from cockatoo_lib.training import distributed
distributed.launch = lambda processes, argv: print("launched", processes) or 0
from cockatoo_lib import cli
sys.argv = ["cockatoo", *sys.argv[1:]]
try:
    cli.main()
except SystemExit:
    pass
print("trainer imported" if "cockatoo_lib.training.trainer" in sys.modules else "trainer not imported")
"""


def test_the_launching_process_does_not_load_the_trainer(tmp_path):
    """The process that starts the training processes only waits for them: loading the trainer
    there (transformers, sklearn: seconds of each start) buys nothing."""
    done = subprocess.run([sys.executable, "-c", LAUNCH_ONLY, "train", "--tokenized", str(tmp_path / "tok"),
                           "--output", str(tmp_path / "out"), "--processes", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.split("\n")[:2] == ["launched 2", "trainer not imported"], done.stderr[-2000:]
