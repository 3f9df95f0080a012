"""Each step, failing while it writes its output (a write that raises, a process killed with
SIGKILL), leaves no output, nothing of its own beside it once the step runs again, its inputs
and the tokenized cache unchanged, and a rerun that succeeds."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import pytest
from helpers import cli_main, forked, run_cli

from cockatoo_lib.plan.catalogue import resolve_plan
from cockatoo_lib.tokenize import tokenize
from cockatoo_lib.training.trainer import train

# Trains, runs pipelines or starts servers: `make test` runs these, `make test-fast` not.
pytestmark = pytest.mark.slow

FAST = ["num_epochs=1", "batch_size=16", "gradient_accumulation_steps=1", "dataloader_num_workers=0"]

def _stop_at_publish(flag: Path, args: list[str]) -> None:
    """The command line, with os.replace stopped where a step publishes its output folder: the
    folder is fully written beside the output, not yet moved; the process waits to be killed."""
    real_replace = os.replace

    def replace(src, dst, *rest, **kwargs):
        if ".tmp-" in Path(src).name and Path(src).is_dir():
            flag.with_suffix(".partial").write_text(str(src))
            real_replace(flag.with_suffix(".partial"), flag)  # whole when the test sees it
            time.sleep(600)
        return real_replace(src, dst, *rest, **kwargs)

    os.replace = replace
    cli_main(args)


def _tree_digest(*roots: Path) -> str:
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            digest.update(str(path).encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def inputs(tiny_models, small_data, tmp_path_factory):
    """Every step's inputs: prepared data, tokenized data (through a cache), a trained model."""
    root = tmp_path_factory.mktemp("inputs")
    overrides = {"base_model": str(tiny_models["deberta"]), "num_epochs": 1, "batch_size": 16,
                 "gradient_accumulation_steps": 1, "dataloader_num_workers": 0}
    plan = resolve_plan("deberta", overrides)
    tokenize(small_data, plan, root / "tok", cache_root=str(root / "cache"))
    train(root / "tok", plan, root / "model", data_dir=small_data)
    base = f"base_model={tiny_models['deberta']}"
    steps = {
        "prepare": ["prepare", "-c", "sample", "--max-samples", "200"],
        "tokenize": ["tokenize", "-d", small_data, "-m", "deberta", "--set", base,
                     "--cache-root", root / "cache"],
        "train": ["train", "-d", small_data, "-t", root / "tok", "-m", "deberta", "--set", base,
                  *[x for setting in FAST for x in ("--set", setting)]],
        "evaluate": ["evaluate", "--model", root / "model", "-t", root / "tok", "-d", small_data],
    }
    return steps, [small_data, root / "tok", root / "model", root / "cache"]


def _leftovers(output: Path) -> list[str]:
    return sorted(p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}."))


@pytest.mark.parametrize("step", ["prepare", "tokenize", "train", "evaluate"])
@pytest.mark.parametrize("failure", ["kill", "raise"])
def test_a_step_that_fails_while_writing_leaves_nothing_and_reruns(step, failure, inputs, tmp_path,
                                                                    capsys, monkeypatch):
    commands, input_dirs = inputs
    output, flag = tmp_path / "out", tmp_path / "flag"
    args = [str(a) for a in [*commands[step], "-o", output]]
    before = _tree_digest(*input_dirs)
    if failure == "kill":
        proc = forked(_stop_at_publish, flag, args)
        deadline = time.monotonic() + 180
        while not flag.exists() and proc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert flag.exists(), f"the step exited with {proc.exitcode} before its output"  # log: stderr
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=60)
        assert not output.exists()
        # A killed process cannot clean up: its temporary folder waits for the next run.
        assert _leftovers(output) == [Path(flag.read_text()).name]
    else:
        real_replace = os.replace

        def disk_full(src, dst, *rest, **kwargs):
            if ".tmp-" in Path(src).name and Path(src).is_dir():
                raise OSError(28, "No space left on device")
            return real_replace(src, dst, *rest, **kwargs)

        with monkeypatch.context() as patched:
            patched.setattr(os, "replace", disk_full)
            with pytest.raises(OSError, match="No space left"):
                run_cli(args, capsys, monkeypatch)
        assert not output.exists() and _leftovers(output) == []
    assert _tree_digest(*input_dirs) == before  # inputs and the tokenized cache
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err[-2000:]
    assert output.is_dir() and any(output.iterdir())
    assert _leftovers(output) == []
