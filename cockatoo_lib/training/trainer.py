"""Training with the Hugging Face Trainer. We override only the loss and the optimizer."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import EarlyStoppingCallback, EvalPrediction, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from cockatoo_lib.errors import CockatooError
from cockatoo_lib.evaluation.metrics import (
    macro_f1,
    mean_average_precision,
    sigmoid,
    spillover,
    sweep_thresholds,
)
from cockatoo_lib.plan.catalogue import Plan
from cockatoo_lib.storage.fileio import atomic_output_dir, check_output, write_json
from cockatoo_lib.tokenize import load_processors, load_tokenized
from cockatoo_lib.training import distributed
from cockatoo_lib.training.checkpoints import DurableCheckpoints, checkpoint_key, checkpoint_step, stopped
from cockatoo_lib.training.collate import COMPILE_WIDTH_MULTIPLE, PaddingCollator
from cockatoo_lib.training.losses import asymmetric_loss, masked_bce, training_mask
from cockatoo_lib.training.model_folder import MODEL_MANIFEST, check_same_data
from cockatoo_lib.training.models import add_tokens, init_head_bias, load_base_model
from cockatoo_lib.training.optim import build_optimizer
from cockatoo_lib.training.sampling import LengthGroupedShuffle

log = logging.getLogger(__name__)


class CockatooTrainer(Trainer):
    # The loss is divided by the annotated rows of the whole optimizer step (counted below), not
    # by the Trainer's accumulation steps: one step's gradient is the same at any micro-batch
    # and accumulation that make up the same rows.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, plan: Plan, pos_weight: torch.Tensor | None = None,
                 loss_weights: torch.Tensor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan = plan
        self.pos_weight = pos_weight
        self.loss_weights = loss_weights

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        """Rows with a label the loss counts in one optimizer step, over every micro-batch and process."""
        weight = self.plan.unannotated_weight
        rows = sum((training_mask(b["label_mask"], weight).sum(dim=1) > 0).sum() for b in batch_samples)
        rows = torch.as_tensor(rows, device=device)
        if self.args.world_size > 1:
            rows = self.accelerator.gather(rows).sum()
        return rows

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        mask = training_mask(inputs.pop("label_mask"), self.plan.unannotated_weight)
        outputs = model(**inputs)
        # Training: this micro-batch's share of the step's mean; evaluation: the batch mean,
        # which the Trainer averages over batches.
        rows = num_items_in_batch
        if self.plan.loss == "asl":
            loss = asymmetric_loss(outputs.logits, labels, mask, self.plan.asl_gamma_neg,
                                   self.plan.asl_gamma_pos, self.plan.asl_clip, weights=self.loss_weights,
                                   rows=rows)
        else:
            pos_weight = self.pos_weight.to(outputs.logits.device) if self.pos_weight is not None else None
            loss = masked_bce(outputs.logits, labels, mask, pos_weight, weights=self.loss_weights, rows=rows)
        if rows is not None and self.args.world_size > 1:
            loss = loss * self.args.world_size  # the processes' gradients are averaged, not summed
        return (loss, outputs) if return_outputs else loss

    def _get_train_sampler(self, train_dataset=None):
        """Length grouping that keeps padding at the sorted bound at any data size
        (cockatoo_lib/training/sampling.py), in place of transformers' megabatches."""
        data = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or "length" not in data.column_names:
            return super()._get_train_sampler(train_dataset)
        return LengthGroupedShuffle(data["length"], self.args.per_device_train_batch_size, self.args.seed)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = build_optimizer(model or self.model, self.plan)
        return self.optimizer


def _compute_metrics(pred: EvalPrediction, unannotated_flag_cost: float = 0.0) -> dict[str, float]:
    """Validation metrics per epoch. `f1` is macro-F1 at thresholds tuned on these very
    predictions, as the saved model's are; `f1_at_0_5` is logged only for comparison."""
    labels, mask = pred.label_ids
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    probs = sigmoid(logits)
    thresholds, _ = sweep_thresholds(probs, labels, mask, unannotated_flag_cost=unannotated_flag_cost)
    return {"f1": macro_f1(probs, labels, mask, thresholds),
            "map": mean_average_precision(probs, labels, mask),
            "f1_at_0_5": macro_f1(probs, labels, mask, 0.5)}


def seed_everything(plan: Plan) -> None:
    """Seed Python, numpy and torch (every device) before anything draws randomness: the new
    head's initialisation comes before the Trainer seeds. `deterministic` also makes CUDA pick
    deterministic kernels."""
    from transformers import enable_full_determinism, set_seed

    if plan.deterministic:
        enable_full_determinism(plan.seed)
    else:
        set_seed(plan.seed)


def label_priors(dataset) -> np.ndarray:
    """Each label's share of positives among the train rows that annotate it."""
    y = np.asarray(dataset["labels"], dtype=np.float64)
    m = np.asarray(dataset["label_mask"], dtype=np.float64)
    return (y * m).sum(axis=0) / np.maximum(m.sum(axis=0), 1)


def pad_multiple(plan: Plan, cuda: bool) -> int:
    """What padded widths are rounded up to: 64 for a compiled model (few shapes, few
    recompiles), 8 on CUDA (tensor cores), 1 on CPU."""
    if not cuda:
        return 1
    return COMPILE_WIDTH_MULTIPLE if plan.torch_compile else 8


_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def training_arguments(plan: Plan, output_dir: str, cuda: bool, resumable: bool = False) -> TrainingArguments:
    """`resumable`: checkpoints hold what resuming needs (optimizer, scheduler, RNG, callbacks'
    state), not the weights alone."""
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=plan.batch_size,
        per_device_eval_batch_size=plan.batch_size * 2,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        learning_rate=plan.learning_rate,
        weight_decay=plan.weight_decay,
        warmup_steps=plan.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        lr_scheduler_type=_SCHEDULERS[plan.lr_scheduler],
        num_train_epochs=plan.num_epochs,
        fp16=plan.fp16,
        bf16=plan.bf16,
        tf32=plan.tf32 if cuda else None,
        activation_checkpointing=plan.gradient_checkpointing,
        eval_strategy=plan.eval_strategy,
        save_strategy=plan.eval_strategy,
        logging_strategy=plan.eval_strategy,
        load_best_model_at_end=True,
        metric_for_best_model=plan.metric_for_best_model,
        greater_is_better=True,
        save_total_limit=plan.save_total_limit,
        save_only_model=not resumable,
        restore_callback_states_from_checkpoint=resumable,  # early stopping's patience
        full_determinism=plan.deterministic,
        dataloader_num_workers=plan.dataloader_num_workers,
        train_sampling_strategy=plan.train_sampling_strategy,
        length_column_name="length",
        remove_unused_columns=False,  # label_mask is not a model input but the loss needs it
        label_names=["labels", "label_mask"],
        report_to="none",
        seed=plan.seed,
        use_cpu=not cuda,
        ddp_backend=("nccl" if cuda else "gloo") if distributed.world_size() > 1 else None,
        torch_compile=plan.torch_compile and cuda,
        # Batches go to the card from pinned memory without blocking the host.
        dataloader_pin_memory=cuda,
        accelerator_config={"non_blocking": cuda},
    )


def batch_split_record(plan: Plan, cuda: bool) -> dict:
    """How each optimizer step is split, and why: the manifest's, the log's and the UI's."""
    why = [n for n in plan.adjustments
           if n.startswith(("batch split", "micro-batch", "data parallel")) or "bf16" in n]
    if not why:
        why = ["the plan's values, pinned" if plan.batch_split == "seed" else "the plan's values"]
    return {"micro_batch": plan.batch_size,
            "gradient_accumulation_steps": plan.gradient_accumulation_steps,
            "processes": plan.processes,
            "effective_batch": plan.effective_batch_size,
            "gradient_checkpointing": plan.gradient_checkpointing,
            "precision": "bf16" if plan.bf16 else "fp16" if plan.fp16 else "fp32",
            "torch_compile": plan.torch_compile and cuda,
            "how": plan.batch_split, "why": why}


def widest_batch(plan: Plan, collator, dataset, rows: int) -> dict:
    """`rows` rows of the data, collated as the widest batch it may give: every row at max_length."""
    batch = [dict(dataset[i % len(dataset)]) for i in range(rows)]
    for row in batch:
        ids = list(row["input_ids"])
        row["input_ids"] = (ids * (plan.max_length // max(len(ids), 1) + 1))[:plan.max_length]
        for key in ("attention_mask", "token_type_ids"):
            if key in row:
                row[key] = [1 if key == "attention_mask" else 0] * plan.max_length
    return collator(batch)


SHARED_MEMORY = "/dev/shm"
PREFETCH_FACTOR = 2  # the DataLoader's default: batches each worker keeps ready


def shared_memory_free(path: str = SHARED_MEMORY) -> int | None:
    try:
        stat = os.statvfs(path)
    except OSError:  # no /dev/shm (macOS): workers share memory another way
        return None
    return stat.f_bavail * stat.f_frsize


def fit_loader_workers(plan: Plan, collator, dataset, free: int | None) -> Plan:
    """Data loader workers hand their batches over in shared memory: measured, 4 workers with the
    default prefetch hold 9 batches at once (workers x 2 + the one in use). Where /dev/shm cannot
    hold that at the widest evaluation batch (64 MB is Docker's default, and platforms without a
    shared-memory setting, such as Vertex AI's custom jobs, may keep it), fewer workers: a full
    /dev/shm kills a worker with a bus error mid-epoch, while fewer workers only load slower."""
    if plan.dataloader_num_workers == 0 or free is None:
        return plan
    batch = widest_batch(plan, collator, dataset, 2 * plan.batch_size)  # per_device_eval_batch_size
    size = sum(t.numel() * t.element_size() for t in batch.values())
    workers = min(plan.dataloader_num_workers, max(0, (free // size - 1) // PREFETCH_FACTOR))
    if workers == plan.dataloader_num_workers:
        return plan
    note = (f"data loader workers {plan.dataloader_num_workers} -> {workers}: {SHARED_MEMORY} has "
            f"{free / 2**20:.0f} MiB free and a batch takes up to {size / 2**20:.1f} MiB "
            f"(each worker holds {PREFETCH_FACTOR}); give the pod more shared memory to load faster")
    log.warning(note)
    return plan.model_copy(update={"dataloader_num_workers": workers,
                                   "adjustments": plan.adjustments + (note,)})


def check_split_on_card(model, plan: Plan, collator, dataset) -> Plan:
    """On CUDA, run one forward and backward pass of the plan's micro-batch at the worst-case
    width (every row max_length long) on this process's own card; step down on out-of-memory."""
    from cockatoo_lib.plan.batch_split import published_config

    if not torch.cuda.is_available() or plan.batch_split != "derived":
        return plan
    if published_config(plan.model_type) is None:  # no estimate was made: nothing to check
        return plan
    device, dtype = distributed.own_card(), torch.bfloat16 if plan.bf16 else torch.float16
    model.to(device)
    if plan.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    def fits(micro: int) -> bool:
        batch = {k: v.to(device) for k, v in widest_batch(plan, collator, dataset, micro).items()}
        batch.pop("labels"), batch.pop("label_mask")
        try:
            with torch.autocast("cuda", dtype=dtype):
                model(**batch).logits.float().sum().backward()
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    return distributed.settle_micro_batch(plan, fits)


def train(tokenized_dir: str | Path, plan: Plan, output: str | Path,
          data_dir: str | Path | None = None, checkpoint_root: str | None = None,
          keep_checkpoints: int = 0, leave_checkpoints: bool = False) -> dict:
    """Fine-tune, restore the best epoch, tune per-label thresholds on validation, save the model
    folder (weights, tokenizer, cockatoo.json). Returns the model manifest.

    With `checkpoint_root`, every checkpoint is published there (cockatoo_lib/training/checkpoints.py)
    and the same training started again resumes from the newest complete one; once the model
    is written, all but the newest `keep_checkpoints` are removed. With `leave_checkpoints` (a
    pipeline step, whose output KFP uploads only after it returns) the newest stays, with the
    best one it names: the manifest lists them, and the next step removes them
    (`release_checkpoints`) once the model is durable; until then a retry resumes from the last
    one and trains nothing.

    `tokenized_dir` and `output` may be bucket URIs (a TrainJob's nodes share no disk): the
    data is copied once per node, and the model published at `output` (cockatoo_lib.storage.publish)."""
    tokenized = (distributed.node_copy(str(tokenized_dir), "tokenized") if "://" in str(tokenized_dir)
                 else contextlib.nullcontext(Path(tokenized_dir)))
    with tokenized as local:
        if "://" in str(output):
            manifest, durable = _fit_to_bucket(local, plan, str(output), data_dir, checkpoint_root)
        else:
            manifest, durable = _fit(local, plan, output, data_dir, checkpoint_root, leave_checkpoints)
    if durable and distributed.rank() == 0:
        log.info("this run trained %d of %d optimizer steps", durable.steps_run, manifest["optimizer_steps"])
        if not leave_checkpoints:  # the model is safe where it belongs: its checkpoints have served
            durable.clean_up(keep_checkpoints)
    return manifest


def _fit(tokenized_dir: Path, plan: Plan, output: str | Path, data_dir, checkpoint_root: str | None,
         leave_checkpoints: bool = False):
    """Train into the local folder `output`; (the model manifest, the durable checkpoints or None)."""
    check_output(output)
    datasets, tok_info = load_tokenized(tokenized_dir)
    check_same_data(tok_info, tokenized_dir, data_dir)
    labels = tok_info["labels"]
    if tok_info["model_type"] != plan.model_type or tok_info["max_length"] != plan.max_length:
        raise CockatooError(
            f"tokenized data {tokenized_dir} is for {tok_info['model_type']} at max_length "
            f"{tok_info['max_length']}, not {plan.model_type} at {plan.max_length}; rerun tokenize")
    scale = tok_info["learning_rate_scale"]
    if scale != 1.0:  # the data's label weights are in a risky band (see cockatoo_lib.training.rebalance)
        note = f"learning rate × {scale:g} for the reweighted loss: {plan.learning_rate:g} -> " \
               f"{plan.learning_rate * scale:g}"
        log.warning(note)
        plan = plan.model_copy(update={"learning_rate": plan.learning_rate * scale,
                                       "adjustments": plan.adjustments + (note,)})
    cuda = torch.cuda.is_available()
    tokenizer, image_processor = load_processors(plan)
    seed_everything(plan)
    model = load_base_model(plan, labels)
    if "tokenizer_extension" in tok_info:  # saved with the model: predict and serve read the same
        add_tokens(model, tokenizer, tok_info["tokenizer_extension"]["added_tokens"])
    if plan.head_bias_init == "prior":
        init_head_bias(model, label_priors(datasets["train"]))
    collator = PaddingCollator(tokenizer.pad_token_id or 0, pad_multiple(plan, cuda), tok_info.get("images"),
                               plan.max_length)
    world = distributed.world_size()
    if plan.processes != world:
        raise CockatooError(f"the plan shares each step among {plan.processes} processes, but this training "
                            f"runs in {world}; resolve the plan with this hardware "
                            "(cockatoo_lib.plan.catalogue.detect_hardware)")
    plan = check_split_on_card(model, plan, collator, datasets["train"])
    plan = fit_loader_workers(plan, collator, datasets["train"], shared_memory_free())
    if world > 1:
        log.info("training in %d processes (%s backend); this is process %d", world,
                 "nccl" if cuda else "gloo", distributed.rank())
    split = batch_split_record(plan, cuda)
    log.info("batch split: %d x %d processes x %d = %d rows per step, checkpointing %s, %s; %s",
             split["micro_batch"], world, split["gradient_accumulation_steps"], split["effective_batch"],
             "on" if split["gradient_checkpointing"] else "off", split["precision"], "; ".join(split["why"]))
    pos_weight = torch.tensor([tok_info["class_weights"][x] for x in labels], dtype=torch.float32)
    loss_weights = torch.tensor([tok_info["loss_weights"][x] for x in labels])

    durable = None
    if checkpoint_root:
        durable = DurableCheckpoints(checkpoint_root, checkpoint_key(tok_info["cache_key"], plan), plan)

    # Process 0 alone writes the model; the others' saves are no-ops or go to a scratch folder.
    main = distributed.rank() == 0
    output_dir = atomic_output_dir(output) if main else tempfile.TemporaryDirectory()
    # Checkpoints go to a folder every process on this node shares.
    work_dir = (tempfile.TemporaryDirectory() if world == 1
                else contextlib.nullcontext(str(distributed.shared_work_dir())))
    with output_dir as tmp, work_dir as work:
        tmp = Path(tmp)
        trainer = CockatooTrainer(
            model=model,
            args=training_arguments(plan, work, cuda, resumable=durable is not None),
            data_collator=collator,
            train_dataset=datasets["train"],
            eval_dataset=datasets["validation"],
            processing_class=tokenizer,
            compute_metrics=functools.partial(_compute_metrics,
                                              unannotated_flag_cost=plan.unannotated_flag_cost),
            plan=plan,
            pos_weight=pos_weight,
            loss_weights=loss_weights,
            callbacks=[*([EarlyStoppingCallback(plan.early_stopping_patience)]
                         if plan.early_stopping_patience else []), *([durable] if durable else [])],
        )
        resumed = _resume_point(durable, Path(work)) if durable else None
        if resumed and stopped(resumed):
            # Early stopping (or the last step) ended the training there; the Trainer forgets that
            # on resuming and would train another epoch.
            log.info("the checkpoint of step %d ended its training: nothing more to train",
                     checkpoint_step(resumed))
            trainer.args.max_steps = checkpoint_step(resumed)
        result = trainer.train(resume_from_checkpoint=str(resumed) if resumed else None)
        if cuda and plan.torch_compile:
            from torch._dynamo.utils import counters

            log.info("torch.compile: %d graphs compiled for widths in multiples of %d",
                     counters["stats"]["unique_graphs"], COMPILE_WIDTH_MULTIPLE)
        best = trainer.state.best_metric
        by_epoch = [e for e in trainer.state.log_history if "eval_f1" in e]
        prediction = trainer.predict(datasets["validation"])
        val_labels, val_mask = prediction.label_ids
        val_probs = sigmoid(prediction.predictions)
        thresholds, tuned = sweep_thresholds(val_probs, val_labels, val_mask,
                                             unannotated_flag_cost=plan.unannotated_flag_cost)
        trainer.save_model(str(tmp))
        combination = None
        if plan.char_ngram_partner:
            combination, val_probs = _fit_partner(datasets, trainer, val_probs, val_labels, val_mask,
                                                  plan, tmp, labels)
            thresholds, tuned = combination.pop("thresholds"), combination.pop("thresholds_tuned")
        if image_processor is not None:  # whatever serves the model needs only this folder
            image_processor.save_pretrained(str(tmp))
        if durable and leave_checkpoints and distributed.rank() == 0:
            durable.clean_up(1)  # what a retry needs: the last checkpoint, and the best one it names
        model_manifest = {
            "format_version": 1,
            "model_type": plan.model_type,
            "architecture": plan.architecture,
            "base_model": plan.base_model,
            "labels": labels,
            "thresholds": dict(zip(labels, thresholds)),
            "thresholds_tuned": dict(zip(labels, tuned)),
            "max_length": plan.max_length,
            "inference_max_length": plan.inference_max_length,
            "plan": plan.model_dump(mode="json"),
            "batch_split": split,
            "processes": world,
            "data_fingerprint": tok_info["data_fingerprint"],
            "tokenized_cache_key": tok_info["cache_key"],
            "train_images": tok_info.get("images", {}).get("rows", {}).get("train", 0),
            "seed": plan.seed,
            "selection_metric": plan.metric_for_best_model,
            "best_validation_metric": float(best) if best is not None else None,
            "best_epoch": _best_epoch(by_epoch, plan.metric_for_best_model, best),
            "validation_by_epoch": [
                {"epoch": round(float(e["epoch"]), 3), **{k: round(float(e[f"eval_{k}"]), 6)
                                                          for k in ("f1", "map", "f1_at_0_5", "loss")}}
                for e in by_epoch],
            "validation_macro_f1_tuned": macro_f1(val_probs, val_labels, val_mask, thresholds),
            "validation_spillover": spillover(val_probs, val_mask, labels, thresholds),
            **({"combination": combination} if combination else {}),
            # Left for the next step to remove (train's leave_checkpoints): this run's, not another's.
            **({"checkpoints": durable.published()} if durable and leave_checkpoints else {}),
            "epochs": float(trainer.state.epoch or 0),
            "optimizer_steps": int(trainer.state.global_step),
            "resumed_from_step": checkpoint_step(resumed) if resumed else None,
            "train_seconds": round(float(result.metrics.get("train_runtime", 0.0)), 2),
            "train_samples_per_second": float(result.metrics.get("train_samples_per_second", 0.0)),
        }
        write_json(tmp / MODEL_MANIFEST, model_manifest)
    log.info("trained %s: best validation %s %.4f (epoch %s of %.1f); saved to %s", plan.model_type,
             plan.metric_for_best_model, model_manifest["best_validation_metric"] or 0.0,
             model_manifest["best_epoch"], model_manifest["epochs"], output)
    return model_manifest, durable


def _fit_partner(datasets, trainer: Trainer, val_probs, val_labels, val_mask, plan: Plan,
                 folder: Path, labels: list[str]) -> tuple[dict, np.ndarray]:
    """Fit the char n-gram partner on the train split (CPU, seconds), save it beside the model,
    and choose the combination on validation. Returns the combination and its validation
    probabilities."""
    from cockatoo_lib.evaluation.baseline import PARTNER_FILES, CharNgramModel, choose_combination, combine

    train, validation = datasets["train"], datasets["validation"]
    # The Trainer predicts validation in its length-grouped order (seeded, so it can be replayed).
    order = np.fromiter(trainer._get_eval_sampler(validation), dtype=np.int64)
    lined_up = len(order) == len(val_labels) and np.array_equal(np.asarray(validation["labels"])[order],
                                                                 val_labels)
    if not lined_up:
        raise CockatooError("char_ngram_partner: the validation predictions do not line up with the "
                            "split's rows")
    partner = CharNgramModel.fit(train["text"], np.asarray(train["labels"]), np.asarray(train["label_mask"]),
                                 seed=plan.seed)
    partner.save(folder, labels)
    partner_probs = partner.predict_proba([validation["text"][i] for i in order])
    combination = choose_combination(val_probs, partner_probs, val_labels, val_mask,
                                     plan.unannotated_flag_cost)
    log.info("char n-gram partner: transformer weight %.2f chosen on validation (macro-F1: transformer %.4f, "
             "partner %.4f, combination %.4f)", combination["transformer_weight"],
             *combination["validation_macro_f1"].values())
    combination["partner_files"] = list(PARTNER_FILES)
    combination["partner"] = partner.info
    return combination, combine(val_probs, partner_probs, combination["transformer_weight"])


def _fit_to_bucket(tokenized_dir: Path, plan: Plan, output: str, data_dir, checkpoint_root):
    """Train into a local folder, then publish it at `output` (process 0)."""
    from cockatoo_lib.storage import remote
    from cockatoo_lib.storage.publish import publish

    with tempfile.TemporaryDirectory(prefix="cockatoo-model-") as work:
        local = Path(work) / "model"
        manifest, durable = _fit(tokenized_dir, plan, local, data_dir, checkpoint_root)
        if distributed.rank() == 0:
            fs, root = remote.url_to_fs(output)
            entry = publish(fs, root, local, {"model_type": manifest["model_type"]}, 0)
            log.info("model published: %s", entry.uri)
    return manifest, durable


def _resume_point(durable: DurableCheckpoints, work: Path) -> Path | None:
    """The newest complete checkpoint of this training, fetched into the work folder by one
    process per node for all; None to start afresh."""
    if distributed.local_rank() == 0:
        durable.resume_point(work)
    distributed.barrier()
    last = get_last_checkpoint(str(work))
    if last and distributed.rank() == 0:
        log.info("resumed from step %d: %s", checkpoint_step(last), durable.uri)
    return Path(last) if last else None


def _best_epoch(by_epoch: list[dict], metric: str, best) -> float | None:
    for e in by_epoch:
        if best is not None and e[f"eval_{metric}"] == best:
            return round(float(e["epoch"]), 3)
    return None

