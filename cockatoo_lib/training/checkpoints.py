"""Durable checkpoints: a train step killed on a preempted node, retried by KFP, or simply run
again, resumes from its newest complete checkpoint instead of starting over.

- Where: `<checkpoint_root>/checkpoints/<key>/` (a folder, gs:// or s3://). The key is a hash
  of what makes the training what it is (the tokenized data's cache key, the plan with its seed,
  the number of processes), so a retried step, or the same command again, finds them.
- How: the Trainer saves each checkpoint (model, optimizer with its 8-bit state, scheduler,
  RNG states, trainer state) to a local folder; process 0 then publishes it as generation
  <global step> under the key, by the contract of cockatoo_lib.storage.publish: uploaded to a folder
  of its own, then one create-only marker listing every file with its size. A checkpoint
  killed mid-write has no marker, or fails its marker's check, and is never read.
- Resume: the newest checkpoint that verifies is downloaded (with the best epoch's, which the
  Trainer restores at the end) and the Trainer resumes from it: weights, optimizer, scheduler,
  RNG and the sampler's epoch.
- Cleanup: once the model is written, all but the newest `keep` checkpoints are unpublished; in
  a pipeline, once the next step has the model (`release_checkpoints`): KFP uploads a step's
  output after the step returns, and a retry then must still find them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from pathlib import Path

from transformers import TrainerCallback

from cockatoo_lib.plan.catalogue import Plan
from cockatoo_lib.storage import remote
from cockatoo_lib.storage.publish import (
    Entry,
    clean_abandoned,
    fetch_verified,
    generations,
    marker_location,
    publish_new,
    read_generation,
    remove_generation,
)
from cockatoo_lib.training import distributed

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
KEY_VERSION = 2
# Plan settings that fit the training to the hardware it lands on, not what it learns: a retry on
# another card (a spot node of another type), or on another count of GPUs, finds the same
# checkpoints. The effective batch, which these make up, is keyed instead.
HARDWARE_SETTINGS = ("batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "processes",
                     "fp16", "bf16", "tf32", "torch_compile", "batch_split", "dataloader_num_workers",
                     "save_steps", "save_total_limit", "adjustments")


def checkpoint_key(tokenized_cache_key: str, plan: Plan) -> str:
    """What defines the training: the tokenized data, the recipe with its seed, the effective batch."""
    recipe = {k: v for k, v in plan.model_dump(mode="json").items() if k not in HARDWARE_SETTINGS}
    body = json.dumps({"tokenized": tokenized_cache_key, "recipe": recipe,
                       "effective_batch": plan.effective_batch_size, "version": KEY_VERSION}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:32]


class DurableCheckpoints(TrainerCallback):
    """Publishes each checkpoint the Trainer saves under the training's key, as a generation of
    its own, and mirrors the Trainer's rotation (the newest and the best stay) on what this run
    published, or took over by resuming from it. Another run with the same key (a manual rerun
    beside the scheduled one) publishes its own generations, and neither removes the other's."""

    def __init__(self, checkpoint_root: str, key: str, plan: Plan):
        self.uri = f"{checkpoint_root.rstrip('/')}/checkpoints/{key}"
        self.fs, self.root = remote.url_to_fs(self.uri)
        self.plan = plan
        self.steps_run = 0  # optimizer steps this process took (not those resumed past)
        self.owned: dict[int, int] = {}  # step -> generation, of what this run published or took over

    def on_step_end(self, args, state, control, **kwargs):
        self.steps_run += 1
        # Every `save_steps` optimizer steps too, so that a long epoch is not lost whole. Not on
        # an epoch's last step: the epoch's own save follows, with its evaluation.
        at_epoch_end = abs(state.epoch - round(state.epoch)) < 1e-9
        save_steps = self.plan.save_steps
        if save_steps and state.global_step % save_steps == 0 and not at_epoch_end:
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        distributed.barrier()  # every process has written its part (its RNG state)
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            best = state.best_model_checkpoint
            meta = {"step": state.global_step, "epoch": state.epoch,
                    "best_step": checkpoint_step(best) if best else None,
                    "micro_batch": self.plan.batch_size,
                    "gradient_accumulation_steps": self.plan.gradient_accumulation_steps,
                    "processes": self.plan.processes}
            entry = publish_new(self.fs, self.root, folder, meta)
            self.owned[state.global_step] = entry.generation
            log.info("checkpoint of step %d (epoch %.2f) published: %s", state.global_step, state.epoch,
                     entry.uri)
            kept = {checkpoint_step(p.name) for p in Path(args.output_dir).glob("checkpoint-*")}
            for step in [s for s in self.owned if s not in kept]:  # the Trainer rotated it out
                remove_generation(self.fs, self.root, self.owned.pop(step))
        distributed.barrier()
        return control

    def _verified(self) -> list[Entry]:
        """Every checkpoint under the key that verifies, furthest first (then newest)."""
        entries = []
        for generation in generations(self.fs, self.root):
            entry, problem = read_generation(self.fs, self.root, generation)
            if entry is None:
                log.warning("checkpoint generation %d cannot be used: %s", generation, problem)
            elif isinstance(entry.meta.get("step"), int):
                entries.append(entry)
        return sorted(entries, key=lambda e: (e.meta["step"], e.generation), reverse=True)

    def resume_point(self, work: Path) -> Path | None:
        """Download the furthest checkpoint that verifies, with the best one it names (the Trainer
        restores that at the end), into `work`; its local folder, or None when there is none. A
        checkpoint that another run unpublishes while it is being copied is passed over."""
        clean_abandoned(self.fs, self.root)
        entries = self._verified()
        for entry in entries:
            step, best_step = entry.meta["step"], entry.meta.get("best_step")
            best = None
            if best_step is not None and best_step != step:
                best = next((e for e in entries if e.meta["step"] == best_step), None)
                if best is None:  # resuming without it would end on the last weights, not the best
                    log.warning("checkpoint of step %d cannot be used: its best checkpoint (step %d) is "
                                "not published, or does not verify", step, best_step)
                    continue
            try:
                folder = fetch_verified(self.fs, entry, work / f"checkpoint-{step}")
                if best is not None:
                    fetch_verified(self.fs, best, work / f"checkpoint-{best_step}")
            except OSError as exc:
                shutil.rmtree(work / f"checkpoint-{step}", ignore_errors=True)
                log.warning("checkpoint of step %d cannot be used: %s", step, exc)
                continue
            self._localize(folder, work)
            self._take_over(entry, best)
            return folder
        return None

    def _take_over(self, entry: Entry, best: Entry | None) -> None:
        """This run continues the training these were saved by: they are its to rotate and clean up."""
        for taken in (entry, best):
            if taken is not None:
                self.owned[taken.meta["step"]] = taken.generation
        saved = (entry.meta.get("micro_batch"), entry.meta.get("gradient_accumulation_steps"),
                 entry.meta.get("processes"))
        now = (self.plan.batch_size, self.plan.gradient_accumulation_steps, self.plan.processes)
        if None not in saved and saved != now:
            log.warning("resuming from a checkpoint trained at micro-batch %d x %d x %d processes; this run "
                        "trains %d x %d x %d processes: the same %d rows a step, but not the same batches "
                        "as an uninterrupted run", *saved, *now, self.plan.effective_batch_size)

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
        """After the model is safe: unpublish all but the newest `keep` of this run's checkpoints
        (and the best one the newest names, without which it cannot be resumed). Checkpoints
        another run published under the same key are left to it."""
        steps = sorted(self.owned, reverse=True)
        kept = set(steps[:keep])
        if steps and keep:
            entry, _ = read_generation(self.fs, self.root, self.owned[steps[0]])
            if entry is not None and entry.meta.get("best_step") in self.owned:
                kept.add(entry.meta["best_step"])
        _unpublish(self.fs, self.root, [(self.owned.pop(step), None) for step in steps if step not in kept])
        log.info("checkpoints under %s: %d kept, %d removed", self.uri, len(kept), len(steps) - len(kept))


    def published(self) -> dict:
        """Where this run's checkpoints are, for `release_checkpoints`."""
        return {"uri": self.uri, "generations": {str(g): marker_location(self.fs, self.root, g)
                                                 for g in sorted(self.owned.values())}}


def release_checkpoints(model_manifest: dict) -> None:
    """Unpublish the checkpoints a pipeline's train step left (its manifest's `checkpoints`), now
    that the model they made is durable: the step after it holds it."""
    left = model_manifest.get("checkpoints")
    if left:
        fs, root = remote.url_to_fs(left["uri"])
        # A generation whose marker names other data is another run's, published under a number
        # this run's left free (a cached train step's manifest names long-removed checkpoints).
        _unpublish(fs, root, [(int(g), location) for g, location in left["generations"].items()])
        log.info("checkpoints under %s: %d removed, the model being safe", left["uri"],
                 len(left["generations"]))


def _unpublish(fs, root: str, doomed: list[tuple[int, str | None]]) -> None:
    for generation, location in doomed:
        remove_generation(fs, root, generation, location)  # one already gone is passed over
    if not generations(fs, root) and "file" in fs.protocol:
        with contextlib.suppress(OSError):  # not empty: another run's upload in progress
            Path(root).rmdir()  # no empty folder per training left locally


def stopped(checkpoint: Path) -> bool:
    """Whether the training had ended when this checkpoint was saved: early stopping's verdict, or
    its last step. The Trainer clears that flag when it resumes, and would train on."""
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    control = state.get("stateful_callbacks", {}).get("TrainerControl", {})
    return bool(control.get("args", {}).get("should_training_stop"))


def checkpoint_step(folder: str | Path) -> int:
    """The global step of a Trainer checkpoint folder, `checkpoint-<step>`."""
    return int(Path(folder).name.rsplit("-", 1)[1])
