"""Resume after preemption: checkpoints published under a checkpoint root, a training killed
with SIGKILL resumed by the same command, half-written checkpoints never read, cleanup."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cockatoo_lib.checkpoints import DurableCheckpoints
from cockatoo_lib.publish import generations, publish
from cockatoo_lib.registry import resolve_plan
from cockatoo_lib.tokenize import tokenize
from cockatoo_lib.train import read_model_manifest

SETTINGS = {"num_epochs": 2, "batch_size": 16, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
            "dataloader_num_workers": 0, "early_stopping_patience": 0}

# The same `cockatoo train`, but the first published checkpoint holds the process still until
# the test kills it: a preemption at a known point.
PAUSE_AFTER_FIRST_CHECKPOINT = """
import sys, time
from cockatoo_lib import checkpoints, cli
original = checkpoints.DurableCheckpoints.on_save
def on_save(self, args, state, control, **kwargs):
    control = original(self, args, state, control, **kwargs)
    print("published step", state.global_step, file=sys.stderr, flush=True)
    time.sleep(600)
checkpoints.DurableCheckpoints.on_save = on_save
sys.argv = ["cockatoo", *sys.argv[1:]]
cli.main()
"""


def _command(tok, out, base, extra=(), **settings):
    sets = [f"--set={k}={v}" for k, v in {**SETTINGS, **settings, "base_model": base}.items()]
    return ["train", "--tokenized", str(tok), "--output", str(out), "--model-type", "deberta", *sets, *extra]


def _run(argv):
    return subprocess.run([sys.executable, "-m", "cockatoo_lib.cli", *argv], capture_output=True, text=True,
                          timeout=300)


def _kill_after_first_checkpoint(argv, root: Path) -> None:
    process = subprocess.Popen([sys.executable, "-c", PAUSE_AFTER_FIRST_CHECKPOINT, *argv],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while not list(root.glob("checkpoints/*/entry-*.json")):
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint was published in time"
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def tokenized(tiny_models, small_data, tmp_path_factory):
    base = str(tiny_models["deberta"])
    folder = tmp_path_factory.mktemp("checkpoints") / "tok"
    tokenize(small_data, resolve_plan("deberta", {**SETTINGS, "base_model": base}), folder,
             cache_root=str(folder.parent / "cache"))
    return folder, base


@pytest.mark.parametrize("save_steps", [0, 3], ids=["at-epoch-end", "mid-epoch"])
def test_a_killed_training_resumes_and_ends_with_the_uninterrupted_weights(tokenized, tmp_path, save_steps):
    tok, base = tokenized
    whole = _run(_command(tok, tmp_path / "whole", base, save_steps=save_steps))
    assert whole.returncode == 0, whole.stderr[-3000:]

    root = tmp_path / "durable"
    argv = _command(tok, tmp_path / "resumed", base, ["--checkpoint-root", str(root)], save_steps=save_steps)
    _kill_after_first_checkpoint(argv, root)
    assert not (tmp_path / "resumed").exists()  # killed before any model was written

    again = _run(argv)
    assert again.returncode == 0, again.stderr[-3000:]
    first = 3 if save_steps else read_model_manifest(tmp_path / "whole")["optimizer_steps"] // 2
    assert f"resumed from step {first}:" in again.stderr
    resumed = read_model_manifest(tmp_path / "resumed")
    assert resumed["resumed_from_step"] == first
    uninterrupted = read_model_manifest(tmp_path / "whole")
    total = uninterrupted["optimizer_steps"]
    assert f"this run trained {total - first} of {total} optimizer steps" in again.stderr
    assert resumed["optimizer_steps"] == uninterrupted["optimizer_steps"]
    assert resumed["validation_by_epoch"] == uninterrupted["validation_by_epoch"]
    assert resumed["thresholds"] == uninterrupted["thresholds"]
    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(bool((a[k] == b[k]).all()) for k in a), "the resumed run's weights differ"
    # The model is written: its checkpoints are gone (the default keeps none), folder and all.
    assert not list((root / "checkpoints").iterdir())


def _checkpoint(folder: Path, step: int, best: int | None) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(os.urandom(64))
    state = {"global_step": step,
             "best_model_checkpoint": f"/gone/pod/tmp/checkpoint-{best}" if best else None}
    (path / "trainer_state.json").write_text(json.dumps(state))
    return path


def _publish(durable: DurableCheckpoints, local: Path, step: int, best: int) -> None:
    publish(durable.fs, durable.root, _checkpoint(local, step, best), {"step": step, "best_step": best}, step)


def _durable(tmp_path) -> DurableCheckpoints:
    return DurableCheckpoints(str(tmp_path / "root"), "key")


def test_a_checkpoint_killed_mid_write_is_never_read(tmp_path, monkeypatch):
    durable = _durable(tmp_path)
    local = tmp_path / "local"
    publish(durable.fs, durable.root, _checkpoint(local, 4, 4), {"step": 4, "best_step": 4}, 4)
    # Step 8: the writer died between its upload and its marker (the marker is written last).
    import cockatoo_lib.publish as publishing

    def die(location):
        raise KeyboardInterrupt

    monkeypatch.setattr(publishing, "_before_marker", die)
    with pytest.raises(KeyboardInterrupt):
        publish(durable.fs, durable.root, _checkpoint(local, 8, 8), {"step": 8, "best_step": 8}, 8)
    monkeypatch.undo()
    # Step 12: its marker lists a file a lifecycle rule or a stopped copy has since taken.
    publish(durable.fs, durable.root, _checkpoint(local, 12, 12), {"step": 12, "best_step": 12}, 12)
    (data,) = [p for p in Path(durable.root).glob("data-*")
               if json.loads((Path(durable.root) / "entry-000012.json").read_text())["location"] == p.name]
    (data / "model.safetensors").unlink()

    work = tmp_path / "work"
    assert durable.resume_point(work) == work / "checkpoint-4"
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint-4"]
    state = json.loads((work / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(work / "checkpoint-4")  # the copy here, not the dead pod's


def test_the_best_checkpoint_comes_with_the_newest_or_the_newest_is_not_used(tmp_path):
    durable = _durable(tmp_path)
    local = tmp_path / "local"
    for step, best in ((4, 4), (8, 4), (12, 8)):
        _publish(durable, local, step, best)
    work = tmp_path / "work"
    assert durable.resume_point(work) == work / "checkpoint-12"
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint-12", "checkpoint-8"]
    # Without its best checkpoint, step 12 would end on its last weights: the one before is used.
    from cockatoo_lib.publish import remove_generation

    remove_generation(durable.fs, durable.root, 8)
    work = tmp_path / "work2"
    assert durable.resume_point(work) == work / "checkpoint-4"


@pytest.mark.parametrize("keep, left", [(0, []), (1, [12, 8]), (2, [12, 8])])
def test_clean_up_keeps_the_newest_and_the_best_it_names(tmp_path, keep, left):
    durable = _durable(tmp_path)
    local = tmp_path / "local"
    for step, best in ((4, 4), (8, 8), (12, 8)):
        _publish(durable, local, step, best)
    durable.clean_up(keep)
    assert generations(durable.fs, durable.root) == left
    named = {json.loads(p.read_text())["location"] for p in Path(durable.root).glob("entry-*.json")}
    assert {p.name for p in Path(durable.root).glob("data-*")} == named  # no data left unnamed
