"""Data-parallel training: `cockatoo train --processes 2` on CPU (torchrun, gloo)."""

import json
import subprocess
import sys

import pytest

from cockatoo_lib.batch_split import split_for_processes
from cockatoo_lib.registry import resolve_plan
from cockatoo_lib.tokenize import tokenize
from cockatoo_lib.train import MODEL_MANIFEST, read_model_manifest

FAST = {"num_epochs": 1, "batch_size": 16, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
        "dataloader_num_workers": 0}


@pytest.mark.parametrize("micro, accumulation, processes, expected, kept", [
    (24, 4, 2, 2, True),   # deberta's 24 x 4 on 2 GPUs: 24 x 2 x 2 = 96
    (24, 4, 4, 1, True),   # on 4: 24 x 4 x 1
    (24, 4, 3, 1, False),  # on 3: 96 cannot be split evenly; 24 x 3 x 1 = 72
    (8, 12, 8, 2, False),  # modernbert's 8 x 12 on 8: 8 x 8 x 2 = 128, nearest to 96
    (16, 1, 2, 1, False),  # nothing to lower: the effective batch doubles
    (24, 4, 1, 4, True),   # one process: unchanged
])
def test_data_parallel_keeps_the_effective_batch_where_it_divides(micro, accumulation, processes, expected,
                                                                   kept):
    plan = resolve_plan("deberta", {"batch_size": micro, "gradient_accumulation_steps": accumulation})
    split = split_for_processes(plan, processes)
    assert split.batch_size == micro and split.gradient_accumulation_steps == expected
    if processes > 1:
        note = split.adjustments[-1]
        assert f"{micro} x {processes} processes x accumulation {expected} = " \
               f"{micro * processes * expected} rows per step" in note
        assert ("cannot split evenly" not in note) is kept


def _train(tok, out, base, processes, *extra):
    sets = [f"--set={k}={v}" for k, v in {**FAST, "base_model": base}.items()]
    return subprocess.run([sys.executable, "-m", "cockatoo_lib.cli", "train", "--tokenized", str(tok),
                           "--output", str(out), "--model-type", "deberta", *sets,
                           "--processes", str(processes), *extra],
                          capture_output=True, text=True, timeout=300)


def test_two_processes_train_one_model_in_half_the_steps(tiny_models, small_data, tmp_path):
    base = str(tiny_models["deberta"])
    tokenize(small_data, resolve_plan("deberta", {**FAST, "base_model": base}), tmp_path / "tok",
             cache_root=str(tmp_path / "cache"))
    one = _train(tmp_path / "tok", tmp_path / "out" / "one", base, 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _train(tmp_path / "tok", tmp_path / "out" / "two", base, 2,
                 "--checkpoint-root", str(tmp_path / "ck"), "--keep-checkpoints", "1")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "training in 2 processes (gloo backend)" in two.stderr
    # Checkpoints: both processes' RNG states in the one checkpoint process 0 published.
    (published,) = (tmp_path / "ck" / "checkpoints").glob("*/data-*")
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt"} <= {p.name for p in published.iterdir()}
    # Process 0 alone wrote: one model folder, nothing else beside it, and a valid model.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["one", "two"]
    single = read_model_manifest(tmp_path / "out" / "one")
    double = read_model_manifest(tmp_path / "out" / "two")
    assert double["processes"] == 2 and single["processes"] == 1
    assert double["optimizer_steps"] == -(-single["optimizer_steps"] // 2)
    assert double["batch_split"]["effective_batch"] == 32
    saved = {p.name for p in (tmp_path / "out" / "two").iterdir()}
    assert {"model.safetensors", "tokenizer.json", MODEL_MANIFEST} <= saved
    assert json.loads((tmp_path / "out" / "two" / MODEL_MANIFEST).read_text())["labels"] == single["labels"]
