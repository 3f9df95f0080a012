"""Resume after preemption: checkpoints published under a checkpoint root, a training killed
with SIGKILL resumed by the same command, half-written checkpoints never read, cleanup."""

import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import cli_main, forked, run_cli
from safetensors.torch import load_file

from cockatoo_lib.plan.catalogue import Hardware, resolve_plan
from cockatoo_lib.storage.publish import generations, publish_new
from cockatoo_lib.tokenize import tokenize
from cockatoo_lib.training.checkpoints import DurableCheckpoints, checkpoint_key
from cockatoo_lib.training.model_folder import read_model_manifest

# Trains, runs pipelines or starts servers: `make test` runs these, `make test-fast` not.
pytestmark = pytest.mark.slow

SETTINGS = {"num_epochs": 2, "batch_size": 16, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
            "dataloader_num_workers": 0, "early_stopping_patience": 0}


def _pause_after_first_checkpoint(argv: list[str]) -> None:
    """The same `cockatoo train`, but the first published checkpoint holds the process still
    until the test kills it: a preemption at a known point."""
    original = DurableCheckpoints.on_save

    def on_save(self, args, state, control, **kwargs):
        control = original(self, args, state, control, **kwargs)
        time.sleep(600)

    DurableCheckpoints.on_save = on_save
    cli_main(argv)


def _command(tok, out, base, extra=(), **settings):
    sets = [f"--set={k}={v}" for k, v in {**SETTINGS, **settings, "base_model": base}.items()]
    return ["train", "--tokenized", str(tok), "--output", str(out), "--model-type", "deberta", *sets, *extra]


def _kill_after_first_checkpoint(argv, root: Path) -> None:
    process = forked(_pause_after_first_checkpoint, argv)
    deadline = time.monotonic() + 240
    try:
        while not list(root.glob("checkpoints/*/entry-*.json")):
            assert process.is_alive(), f"training exited with {process.exitcode}"  # its log: stderr
            assert time.monotonic() < deadline, "no checkpoint was published in time"
            time.sleep(0.2)
    finally:
        process.kill()
        process.join()


@pytest.fixture(scope="module")
def tokenized(tiny_models, small_data, tmp_path_factory):
    base = str(tiny_models["deberta"])
    folder = tmp_path_factory.mktemp("checkpoints") / "tok"
    tokenize(small_data, resolve_plan("deberta", {**SETTINGS, "base_model": base}), folder,
             cache_root=str(folder.parent / "cache"))
    return folder, base


@pytest.fixture(scope="module")
def whole(tokenized, tmp_path_factory) -> Path:
    """The same training, never interrupted, run here: save_steps only adds saves, which change
    nothing it learns, so one serves both kinds of resume."""
    from cockatoo_lib.cli import app

    tok, base = tokenized
    folder = tmp_path_factory.mktemp("uninterrupted") / "whole"
    app(_command(tok, folder, base), standalone_mode=False)
    return folder


@pytest.mark.parametrize("save_steps", [0, 3], ids=["at-epoch-end", "mid-epoch"])
def test_a_killed_training_resumes_and_ends_with_the_uninterrupted_weights(tokenized, whole, tmp_path,
                                                                           save_steps, capsys, monkeypatch,
                                                                           caplog):
    """Killed in a process of its own; run again by the same command (here, in this process)."""
    tok, base = tokenized
    root = tmp_path / "durable"
    argv = _command(tok, tmp_path / "resumed", base, ["--checkpoint-root", str(root)], save_steps=save_steps)
    _kill_after_first_checkpoint(argv, root)
    assert not (tmp_path / "resumed").exists()  # killed before any model was written

    caplog.set_level(logging.INFO, logger="cockatoo_lib")
    code, _, err = run_cli(argv, capsys, monkeypatch)
    assert code == 0, err[-3000:]
    first = 3 if save_steps else read_model_manifest(whole)["optimizer_steps"] // 2
    assert f"resumed from step {first}:" in caplog.text
    resumed = read_model_manifest(tmp_path / "resumed")
    assert resumed["resumed_from_step"] == first
    uninterrupted = read_model_manifest(whole)
    total = uninterrupted["optimizer_steps"]
    assert f"this run trained {total - first} of {total} optimizer steps" in caplog.text
    assert resumed["optimizer_steps"] == uninterrupted["optimizer_steps"]
    assert resumed["validation_by_epoch"] == uninterrupted["validation_by_epoch"]
    assert resumed["thresholds"] == uninterrupted["thresholds"]
    a = load_file(whole / "model.safetensors")
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


def _publish(durable: DurableCheckpoints, local: Path, step: int, best: int) -> int:
    """A checkpoint published under the key by some run; its generation."""
    return publish_new(durable.fs, durable.root, _checkpoint(local, step, best),
                       {"step": step, "best_step": best}).generation


PLAN = resolve_plan("deberta", SETTINGS)


def _durable(tmp_path, plan=PLAN) -> DurableCheckpoints:
    return DurableCheckpoints(str(tmp_path / "root"), "key", plan)


def _save(durable: DurableCheckpoints, work: Path, step: int, best: int | None = None) -> None:
    """What the Trainer does at a save: the checkpoint in its folder, then the callback."""
    _checkpoint(work, step, best)
    state = SimpleNamespace(global_step=step, epoch=step / 10, is_world_process_zero=True,
                            best_model_checkpoint=str(work / f"checkpoint-{best}") if best else None)
    durable.on_save(SimpleNamespace(output_dir=str(work)), state, None)


def _steps(durable: DurableCheckpoints) -> list[int]:
    return sorted(durable._verified()[i].meta["step"] for i in range(len(durable._verified())))


def test_a_checkpoint_killed_mid_write_is_never_read(tmp_path, monkeypatch):
    durable = _durable(tmp_path)
    local = tmp_path / "local"
    _publish(durable, local, 4, 4)
    # Step 8: the writer died between its upload and its marker (the marker is written last).
    import cockatoo_lib.storage.publish as publishing

    def die(location):
        raise KeyboardInterrupt

    monkeypatch.setattr(publishing, "_before_marker", die)
    with pytest.raises(KeyboardInterrupt):
        _publish(durable, local, 8, 8)
    monkeypatch.undo()
    # Step 12: its marker lists a file a lifecycle rule or a stopped copy has since taken.
    generation = _publish(durable, local, 12, 12)
    marker = json.loads((Path(durable.root) / f"entry-{generation:06d}.json").read_text())
    (Path(durable.root) / marker["location"] / "model.safetensors").unlink()

    work = tmp_path / "work"
    assert durable.resume_point(work) == work / "checkpoint-4"
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint-4"]
    state = json.loads((work / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(work / "checkpoint-4")  # the copy here, not the dead pod's


def test_a_damaged_checkpoint_is_superseded_when_training_reaches_its_step_again(tmp_path):
    """A retry that skipped a damaged checkpoint trains to that step again and publishes it anew,
    beside the damaged marker (which is never repaired), instead of failing on it every time."""
    first = _durable(tmp_path)
    generation = _publish(first, tmp_path / "local", 4, 4)
    marker = json.loads((Path(first.root) / f"entry-{generation:06d}.json").read_text())
    (Path(first.root) / marker["location"] / "model.safetensors").unlink()
    retry = _durable(tmp_path)
    assert retry.resume_point(tmp_path / "work") is None  # nothing usable: it starts over
    _save(retry, tmp_path / "retry", 4, 4)
    assert generations(retry.fs, retry.root) == [generation + 1, generation]
    assert _durable(tmp_path).resume_point(tmp_path / "again") == tmp_path / "again" / "checkpoint-4"


def test_the_best_checkpoint_comes_with_the_newest_or_the_newest_is_not_used(tmp_path):
    durable = _durable(tmp_path)
    local = tmp_path / "local"
    generation = {step: _publish(durable, local, step, best) for step, best in ((4, 4), (8, 4), (12, 8))}
    work = tmp_path / "work"
    assert durable.resume_point(work) == work / "checkpoint-12"
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint-12", "checkpoint-8"]
    # Without its best checkpoint, step 12 would end on its last weights: the one before is used.
    from cockatoo_lib.storage.publish import remove_generation

    remove_generation(durable.fs, durable.root, generation[8])
    work = tmp_path / "work2"
    assert _durable(tmp_path).resume_point(work) == work / "checkpoint-4"


def test_a_checkpoint_unpublished_while_it_is_copied_is_passed_over(tmp_path, monkeypatch):
    import cockatoo_lib.storage.publish as publishing
    from cockatoo_lib.storage.publish import remove_generation

    durable = _durable(tmp_path)
    local = tmp_path / "local"
    _publish(durable, local, 4, 4)
    newest = _publish(durable, local, 8, 8)
    real_fetch = publishing.fetch

    def fetch_while_another_run_cleans_up(fs, uri, dest):
        if dest.name == "checkpoint-8":  # the other run removes it between our look and our copy
            remove_generation(fs, durable.root, newest)
        return real_fetch(fs, uri, dest)

    monkeypatch.setattr(publishing, "fetch", fetch_while_another_run_cleans_up)
    work = tmp_path / "work"
    assert durable.resume_point(work) == work / "checkpoint-4"
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint-4"]  # no half copy of step 8 left


def test_two_runs_with_one_key_keep_each_others_checkpoints(tmp_path):
    """A manual rerun beside the scheduled run: same data, recipe and seed, so the same key."""
    scheduled, rerun = _durable(tmp_path), _durable(tmp_path)
    _save(scheduled, tmp_path / "a", 30, 30)
    _save(rerun, tmp_path / "b", 10, 10)  # its folder holds only step 10: it rotates only its own
    assert _steps(scheduled) == [10, 30]
    rerun.clean_up(0)
    assert _steps(scheduled) == [30]
    scheduled.clean_up(0)
    assert _steps(scheduled) == []


def test_a_resumed_run_takes_over_the_checkpoints_it_continues_and_cleans_them_up(tmp_path):
    first = _durable(tmp_path)
    _save(first, tmp_path / "a", 4, 4)
    _save(first, tmp_path / "a", 8, 4)  # killed here
    retry = _durable(tmp_path)
    assert retry.resume_point(tmp_path / "b") == tmp_path / "b" / "checkpoint-8"
    retry.clean_up(0)
    assert _steps(retry) == []


@pytest.mark.parametrize("keep, left", [(0, []), (1, [8, 12]), (2, [8, 12])])
def test_clean_up_keeps_the_newest_and_the_best_it_names(tmp_path, keep, left):
    durable = _durable(tmp_path)
    for step, best in ((4, 4), (8, 8), (12, 8)):
        _save(durable, tmp_path / "local", step, best)
    durable.clean_up(keep)
    assert _steps(durable) == left
    named = {json.loads(p.read_text())["location"] for p in Path(durable.root).glob("entry-*.json")}
    assert {p.name for p in Path(durable.root).glob("data-*")} == named  # no data left unnamed


def test_the_key_is_the_training_not_the_hardware_it_lands_on():
    one_card = resolve_plan("deberta", hardware=Hardware(cuda=True, bf16_supported=True, memory_gib=80))
    other_card = resolve_plan("deberta", hardware=Hardware(cuda=True, bf16_supported=False, memory_gib=16))
    two_cards = resolve_plan("deberta", hardware=Hardware(cuda=True, bf16_supported=True, memory_gib=80,
                                                          processes=2))
    assert (one_card.batch_size, other_card.batch_size, two_cards.batch_size) == (96, 48, 48)
    plans = (one_card, other_card, two_cards, resolve_plan("deberta"))
    keys = {checkpoint_key("data", plan) for plan in plans}
    assert len(keys) == 1
    for changed in ({"seed": 7}, {"learning_rate": 3e-5}, {"gradient_accumulation_steps": 2}):
        assert checkpoint_key("data", resolve_plan("deberta", changed)) not in keys
    assert checkpoint_key("other data", one_card) not in keys


def test_a_resume_on_another_split_says_so(tmp_path, caplog):
    first = _durable(tmp_path, PLAN.model_copy(update={"batch_size": 16, "gradient_accumulation_steps": 1}))
    _save(first, tmp_path / "a", 4, 4)
    halves = PLAN.model_copy(update={"batch_size": 8, "gradient_accumulation_steps": 2})
    _durable(tmp_path, halves).resume_point(tmp_path / "b")
    assert "trained at micro-batch 16 x 1 x 1 processes; this run trains 8 x 2 x 1 processes" in caplog.text


def test_a_training_that_stopped_early_is_not_trained_further_when_run_again(tokenized, tmp_path, capsys,
                                                                           monkeypatch, caplog):
    """Early stopping ends the training at epoch 2 of 4; its last checkpoint is kept. Run again
    (the model lost, say), it resumes there and trains nothing: the Trainer itself would forget
    the stop on resuming and train another epoch. Both runs in this process: nothing is killed."""
    import shutil

    tok, base = tokenized
    root = tmp_path / "durable"
    keep = ["--checkpoint-root", str(root), "--keep-checkpoints", "9"]
    argv = _command(tok, tmp_path / "model", base, keep, num_epochs=4, early_stopping_patience=1,
                    learning_rate=1e-12)
    caplog.set_level(logging.INFO, logger="cockatoo_lib")
    code, _, err = run_cli(argv, capsys, monkeypatch)
    assert code == 0, err[-3000:]
    stopped = read_model_manifest(tmp_path / "model")
    assert stopped["epochs"] == 2  # a learning rate this small never improves on epoch 1
    shutil.rmtree(tmp_path / "model")
    caplog.clear()
    code, _, err = run_cli(argv, capsys, monkeypatch)
    assert code == 0, err[-3000:]
    assert "ended its training: nothing more to train" in caplog.text
    resumed = read_model_manifest(tmp_path / "model")
    assert (resumed["epochs"], resumed["optimizer_steps"]) == (stopped["epochs"], stopped["optimizer_steps"])
    assert f"this run trained 0 of {stopped['optimizer_steps']} optimizer steps" in caplog.text
    assert resumed["thresholds"] == stopped["thresholds"]


def test_a_pipelines_checkpoints_stay_until_the_next_step_holds_the_model(tokenized, tmp_path, caplog):
    """KFP uploads the train step's output after the step returns: a pod lost during that upload
    is retried, and the retry must find the checkpoints and train nothing. The evaluate step,
    which holds the model, removes them; a stale list (a cached train step's) removes nothing
    another run published since under a freed number."""
    import shutil

    from cockatoo_lib.steps import EvaluateArgs, TrainArgs, evaluate_step, train_step
    from cockatoo_lib.training.checkpoints import release_checkpoints

    tok, base = tokenized
    root = tmp_path / "durable"
    args = TrainArgs(model_type="deberta", overrides={**SETTINGS, "num_epochs": 3, "base_model": base},
                     tokenized_dir=str(tok), checkpoint_root=str(root), output=str(tmp_path / "model"))
    caplog.set_level(logging.INFO, logger="cockatoo_lib")
    train_step(args)
    manifest = read_model_manifest(tmp_path / "model")
    left = manifest["checkpoints"]
    folder = Path(left["uri"])
    # Of three epochs' checkpoints, the last one and the best one it names stay.
    kept = 1 if manifest["best_epoch"] == manifest["epochs"] else 2
    assert len(left["generations"]) == kept and sorted(generations(_fs(), str(folder))) == \
        sorted(int(g) for g in left["generations"])
    shutil.rmtree(tmp_path / "model")  # the upload was lost with the pod; KFP retries the step
    caplog.clear()
    train_step(args)
    trained = read_model_manifest(tmp_path / "model")
    assert f"this run trained 0 of {trained['optimizer_steps']} optimizer steps" in caplog.text
    evaluate_step(EvaluateArgs(model_dir=str(tmp_path / "model"), tokenized_dir=str(tok),
                               output=str(tmp_path / "eval")))
    assert (tmp_path / "eval" / "metrics.json").is_file() and not folder.exists()
    # Another run of the same training publishes under the numbers now free; the old list is stale.
    other = tmp_path / "other-checkpoint"
    other.mkdir()
    (other / "trainer_state.json").write_text("{}")
    fresh = [publish_new(_fs(), str(folder), other, {"step": 1}).generation for _ in left["generations"]]
    fresh += [publish_new(_fs(), str(folder), other, {"step": 1}).generation]
    assert set(left["generations"]) <= {str(g) for g in fresh}
    release_checkpoints({"checkpoints": left})
    assert sorted(generations(_fs(), str(folder))) == fresh


def _fs():
    import fsspec

    return fsspec.filesystem("file")
