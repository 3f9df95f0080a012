"""Durable checkpoints: a train step killed on a preempted node, retried by KFP, or simply run
again, resumes from its newest complete checkpoint instead of starting over.

- Where: `<checkpoint_root>/checkpoints/<key>/` (a folder, gs:// or s3://). The key is a hash
  of what makes the training what it is (the tokenized data's cache key, the plan with its seed,
  the number of processes), so a retried step, or the same command again, finds them.
- How: the Trainer saves each checkpoint (model, optimizer with its 8-bit state, scheduler,
  RNG states, trainer state) to a local folder; process 0 then publishes it as generation
  <global step> under the key, by the contract of cockatoo_lib.publish: uploaded to a folder
  of its own, then one create-only marker listing every file with its size. A checkpoint
  killed mid-write has no marker, or fails its marker's check, and is never read.
- Resume: the newest checkpoint that verifies is downloaded (with the best epoch's, which the
  Trainer restores at the end) and the Trainer resumes from it: weights, optimizer, scheduler,
  RNG and the sampler's epoch.
- Cleanup: once the model is written, all but the newest `keep` checkpoints are unpublished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path

from transformers import TrainerCallback

from cockatoo_lib import distributed, remote
from cockatoo_lib.publish import (
    clean_abandoned,
    fetch,
    generations,
    publish,
    read_generation,
    remove_generation,
)

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
KEY_VERSION = 1


def checkpoint_key(tokenized_cache_key: str, plan: dict, processes: int) -> str:
    body = json.dumps({"tokenized": tokenized_cache_key, "plan": plan, "processes": processes,
                       "version": KEY_VERSION}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:32]


class DurableCheckpoints(TrainerCallback):
    """Publishes each checkpoint the Trainer saves under the run's key, and mirrors the Trainer's
    rotation (the newest and the best stay) there."""

    def __init__(self, checkpoint_root: str, key: str, save_steps: int = 0):
        self.uri = f"{checkpoint_root.rstrip('/')}/checkpoints/{key}"
        self.fs, self.root = remote.url_to_fs(self.uri)
        self.save_steps = save_steps
        self.steps_run = 0  # optimizer steps this process took (not those resumed past)

    def on_step_end(self, args, state, control, **kwargs):
        self.steps_run += 1
        # Every `save_steps` optimizer steps too, so that a long epoch is not lost whole. Not on
        # an epoch's last step: the epoch's own save follows, with its evaluation.
        at_epoch_end = abs(state.epoch - round(state.epoch)) < 1e-9
        if self.save_steps and state.global_step % self.save_steps == 0 and not at_epoch_end:
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        distributed.barrier()  # every process has written its part (its RNG state)
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            best = state.best_model_checkpoint
            meta = {"step": state.global_step, "epoch": state.epoch,
                    "best_step": checkpoint_step(best) if best else None}
            entry = publish(self.fs, self.root, folder, meta, state.global_step)
            log.info("checkpoint of step %d (epoch %.2f) published: %s", state.global_step, state.epoch,
                     entry.uri)
            kept = {checkpoint_step(p.name) for p in Path(args.output_dir).glob("checkpoint-*")}
            for step in generations(self.fs, self.root):
                if step not in kept:  # the Trainer rotated it out
                    remove_generation(self.fs, self.root, step)
        distributed.barrier()
        return control

    def resume_point(self, work: Path) -> Path | None:
        """Download the newest checkpoint that verifies, with the best one it names (the Trainer
        restores that at the end), into `work`; its local folder, or None when there is none."""
        clean_abandoned(self.fs, self.root)
        for step in generations(self.fs, self.root):
            entry, problem = read_generation(self.fs, self.root, step)
            if entry is None:
                log.warning("checkpoint of step %d cannot be used: %s", step, problem)
                continue
            best_step = entry.meta.get("best_step")
            best = None
            if best_step is not None and best_step != step:
                best, problem = read_generation(self.fs, self.root, best_step)
                if best is None:  # resuming without it would end on the last weights, not the best
                    log.warning("checkpoint of step %d cannot be used: its best checkpoint (step %d) "
                                "cannot: %s", step, best_step, problem)
                    continue
            folder = fetch(self.fs, entry.uri, work / f"checkpoint-{step}")
            if best is not None:
                fetch(self.fs, best.uri, work / f"checkpoint-{best_step}")
            self._localize(folder, work)
            return folder
        return None

    @staticmethod
    def _localize(folder: Path, work: Path) -> None:
        """The trainer state names the best checkpoint by the earlier run's local path: point it
        at the copy here."""
        state_file = folder / TRAINER_STATE
        state = json.loads(state_file.read_text())
        if state.get("best_model_checkpoint"):
            state["best_model_checkpoint"] = str(work / Path(state["best_model_checkpoint"]).name)
            state_file.write_text(json.dumps(state, indent=2))

    def clean_up(self, keep: int) -> None:
        """After the model is written: unpublish all but the newest `keep` checkpoints (and the
        best one the newest names, without which it cannot be resumed)."""
        steps = generations(self.fs, self.root)
        kept = set(steps[:keep])
        if steps and keep:
            entry, _ = read_generation(self.fs, self.root, steps[0])
            if entry is not None and entry.meta.get("best_step") is not None:
                kept.add(entry.meta["best_step"])
        for step in steps:
            if step not in kept:
                remove_generation(self.fs, self.root, step)
        if not kept and "file" in self.fs.protocol:  # no empty folder per training left locally
            with contextlib.suppress(OSError):  # not empty: another run's upload in progress
                Path(self.root).rmdir()
        log.info("checkpoints under %s: %d kept, %d removed", self.uri, len(kept & set(steps)),
                 len(set(steps) - kept))


def checkpoint_step(folder: str | Path) -> int:
    """The global step of a Trainer checkpoint folder, `checkpoint-<step>`."""
    return int(Path(folder).name.rsplit("-", 1)[1])
