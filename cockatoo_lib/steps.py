"""One function per pipeline step, as the KFP components call them: plain values and paths in,
the metadata a user should see in the KFP UI out. Knows nothing of KFP."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Self

from cockatoo_lib.errors import CockatooError
from cockatoo_lib.plan.catalogue import Plan, detect_hardware, resolve_plan

# The pipeline's steps, in order: the one list. The components (components.COMPONENTS), the
# pipeline's per-step resources, the run command's help and the tests derive from it.
STEPS = ("prepare", "tokenize", "train", "evaluate", "promote")


# Each step takes one object: its run parameters under the names the component's parameters
# have, and the paths of its artifacts. A new run parameter is a field here, a parameter of the
# component and a line of the pipeline; StepArgs.of carries it from one to the other.


@dataclass(frozen=True, kw_only=True)
class StepArgs:
    @classmethod
    def of(cls, inputs: dict[str, Any], **paths: Any) -> Self:
        """A component's arguments: its run parameters by name from `inputs` (the component's
        `locals()`; what is not a field, such as an artifact, is left out) and its artifacts'
        paths and URIs, given by keyword."""
        from cockatoo_lib.storage.secrets import step_environment

        step_environment()  # every step builds its arguments here first: secrets and a team's CA apply to all
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in inputs.items() if k in names}, **paths})


@dataclass(frozen=True, kw_only=True)
class PlanArgs(StepArgs):
    """The run parameters that choose the plan (cockatoo_lib.plan.catalogue)."""
    model_type: str
    overrides: dict[str, Any] = field(default_factory=dict)
    base_model: str = ""  # a model id or path in place of the catalogue's

    def settings(self, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
        """The plan's settings: `defaults` under the overrides, and base_model over both."""
        return {**(defaults or {}), **(self.overrides or {}),
                **({"base_model": self.base_model} if self.base_model else {})}

    def plan(self, defaults: dict[str, Any] | None = None, detect: bool = False) -> Plan:
        """The run's plan; `detect` applies this machine's hardware."""
        return resolve_plan(self.model_type, self.settings(defaults), detect_hardware() if detect else None)


@dataclass(frozen=True, kw_only=True)
class PrepareArgs(PlanArgs):
    data_config: str
    labels: list[str] = field(default_factory=list)
    seed: int = 42
    max_samples: int = 0
    output: str


@dataclass(frozen=True, kw_only=True)
class TokenizeArgs(PlanArgs):
    data_dir: str
    cache_root: str = ""
    output: str
    output_uri: str = ""


@dataclass(frozen=True, kw_only=True)
class TrainArgs(PlanArgs):
    tokenized_dir: str
    tokenized_uri: str = ""
    seed: int = 42
    gpus: int = 1
    nodes: int = 1
    checkpoint_root: str = ""
    placement: dict[str, Any] = field(default_factory=dict)  # the step's pod settings, for the nodes
    output: str
    output_uri: str = ""

    def settings(self, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
        """The run's seed (the run form's `seed`) under the overrides: theirs wins if they set one."""
        return super().settings({"seed": self.seed, **(defaults or {})})


@dataclass(frozen=True, kw_only=True)
class EvaluateArgs(StepArgs):
    model_dir: str
    tokenized_dir: str
    output: str


@dataclass(frozen=True, kw_only=True)
class PromoteArgs(StepArgs):
    model_dir: str
    data_dir: str
    evaluation_dir: str
    registry_uri: str = ""
    model_name: str = "cockatoo-moderation"
    run_id: str = ""
    min_improvement: float = 0.0
    max_label_drop: float = 0.02
    allow_label_change: bool = False
    min_gain_over_baseline: float = 0.0
    allow_below_baseline: bool = False
    output: str
    output_uri: str = ""


def prepare_step(args: PrepareArgs) -> dict:
    from cockatoo_lib.data.prepare import load_data_config, prepare

    args.plan()  # a bad model type or override fails here, first
    manifest = prepare(load_data_config(args.data_config, args.labels), args.output, seed=args.seed,
                       max_samples=args.max_samples)
    meta = {f"{split}_rows": v["rows"] for split, v in manifest["splits"].items()}
    return {**meta, "fingerprint": manifest["fingerprint"], "labels": manifest["labels"],
            "warnings": manifest["warnings"]}


def tokenize_step(args: TokenizeArgs) -> dict:
    from cockatoo_lib.tokenize import DEFAULT_CACHE_ROOT, diagnostic_warnings, tokenize

    cache_root = args.cache_root or DEFAULT_CACHE_ROOT
    if "://" in args.output_uri and "://" not in cache_root:
        # Steps on a cluster run in separate pods: a local cache folder would die with this one.
        raise CockatooError(f"tokenized_cache_root {cache_root!r} is a local folder, but this step runs "
                            f"on a cluster (its output is {args.output_uri}); set it to a bucket URI "
                            "such as gs://BUCKET/cockatoo-cache or s3://BUCKET/cockatoo-cache")
    info = tokenize(args.data_dir, args.plan(), args.output, cache_root)
    diagnostics = info["diagnostics"]
    return {"cache_hit": info["cache_hit"], "cache_key": info["cache_key"],
            "cache_uri": local_path(info["cache_uri"]), "rows": info["rows"], "truncated": info["truncated"],
            "tokenizer": info["tokenizer"], "max_length": info["max_length"],
            "unknown_token_share": diagnostics["overall"]["unknown_token_share"],
            "truncated_share": diagnostics["overall"]["truncated_share"],
            "diagnostics_by_source": diagnostics["sources"], "warnings": diagnostic_warnings(diagnostics)}


def local_path(uri: str) -> str:
    """A local path for a file:// URI, or the path as it is."""
    return uri.removeprefix("file://")


def train_step(args: TrainArgs) -> dict:
    """The run's seed (the run form's `seed`) is the plan's, unless the overrides set one. With
    more than one GPU, one process per GPU (cockatoo_lib.training.distributed); with more than one node,
    a Kubeflow Trainer TrainJob (cockatoo_lib.training.trainjob) or, on Vertex AI, a custom job
    (cockatoo_lib.training.vertex_job) does the training."""
    from cockatoo_lib.training import distributed
    from cockatoo_lib.training.model_folder import read_model_manifest
    from cockatoo_lib.training.trainer import train

    if "://" in args.output_uri and args.checkpoint_root and "://" not in args.checkpoint_root:
        # A retry runs in a new pod: checkpoints in this one's folder would be gone.
        raise CockatooError(f"checkpoint_root {args.checkpoint_root!r} is a local folder, but this step runs "
                            f"on a cluster (its output is {args.output_uri}); set it to a bucket URI such as "
                            "gs://BUCKET/cockatoo-checkpoints, or leave it empty")
    settings = args.settings()
    plan = args.plan(detect=args.nodes == 1)
    if args.nodes > 1:
        info = _train_on_nodes(args, settings)
    elif args.gpus > 1 and not distributed.launched():
        code = distributed.launch(args.gpus, train_argv(local_path(args.tokenized_dir), args.output,
                                                        args.model_type, settings, args.checkpoint_root,
                                                        leave_checkpoints=True))
        if code:
            raise CockatooError(f"training in {args.gpus} processes failed (exit code {code}); the failing "
                                "process's error is in the log above")
        info = read_model_manifest(args.output)
    else:
        # KFP uploads the model after this returns: the evaluate step removes the checkpoints.
        info = train(local_path(args.tokenized_dir), plan, args.output,
                     checkpoint_root=args.checkpoint_root or None, leave_checkpoints=True)
    return {"model_type": info["model_type"], "base_model": info["base_model"],
            "selection_metric": info["selection_metric"],
            "best_validation_metric": info["best_validation_metric"], "best_epoch": info["best_epoch"],
            "epochs": info["epochs"], "seed": info["seed"], "batch_split": info["batch_split"],
            "labels": info["labels"], "thresholds": info["thresholds"]}


def train_pod_gpus(gpus: int, nodes: int) -> int:
    """GPUs the train step's pod holds: with nodes > 1 the TrainJob's nodes train, the pod waits."""
    return gpus if nodes == 1 else 0


def train_argv(tokenized: str, output: str, model_type: str, settings: dict,
               checkpoint_root: str, leave_checkpoints: bool = False) -> list[str]:
    """`cockatoo train` with the step's settings, as each process of a multi-process training runs it."""
    import json

    return ["train", "--tokenized", tokenized, "--output", output, "--model-type", model_type,
            *[f"--set={key}={json.dumps(value)}" for key, value in settings.items()],
            *(["--checkpoint-root", checkpoint_root] if checkpoint_root else []),
            *(["--leave-checkpoints"] if checkpoint_root and leave_checkpoints else [])]


def _train_on_nodes(args: TrainArgs, settings: dict) -> dict:
    import json
    import os

    from cockatoo_lib.storage import remote
    from cockatoo_lib.storage.fileio import atomic_output_dir
    from cockatoo_lib.storage.publish import fetch, read_published
    from cockatoo_lib.tokenize import INFO
    from cockatoo_lib.training import trainjob
    from cockatoo_lib.training.model_folder import read_model_manifest

    nodes, checkpoint_root = args.nodes, args.checkpoint_root
    for name, value in (("checkpoint_root", checkpoint_root), ("the tokenized data", args.tokenized_uri)):
        if "://" not in value:
            raise CockatooError(f"nodes={nodes} needs {name} in a bucket the nodes share (gs://, s3://), "
                                f"not {value!r}")
    image = os.environ.get(trainjob.IMAGE_ENV)
    if not image:
        raise CockatooError(f"nodes={nodes}: {trainjob.IMAGE_ENV} (the image the nodes run) is not set on "
                            "this step; compile the pipeline with cockatoo compile")

    accelerator = os.environ.get(trainjob.ACCELERATOR_ENV) or "nvidia.com/gpu"
    fs, root = remote.url_to_fs(args.tokenized_uri)
    train_rows = json.loads(fs.cat_file(f"{root.rstrip('/')}/{INFO}"))["rows"]["train"]
    deadline = trainjob.deadline_s(train_rows, args.plan(detect=False).num_epochs, nodes * max(args.gpus, 1))

    base_name = trainjob.job_base_name(args.output_uri or args.output)
    on_vertex = os.environ.get(trainjob.NODES_ON_ENV) == "vertex"
    if on_vertex:
        from cockatoo_lib.training import vertex_job

        jobs = vertex_job.CustomJobs(base_name, vertex_job.machine_type(accelerator, max(args.gpus, 1)))
    else:
        client = trainjob.trainer_client()
        trainjob.remove_finished_jobs(client)
        jobs = trainjob.TrainJobs(client)

    def request(name: str) -> trainjob.JobRequest:
        model_uri = trainjob.model_uri(checkpoint_root, name)
        command = trainjob.train_command(train_argv(args.tokenized_uri, model_uri, args.model_type, settings,
                                                    checkpoint_root))
        if on_vertex:
            command = vertex_job.node_command(command)
        return trainjob.JobRequest(image=image, nodes=nodes, gpus_per_node=max(args.gpus, 1), command=command,
                                   placement=args.placement, accelerator=accelerator, deadline_s=deadline)

    trainjob.remove_stale_models(checkpoint_root)
    name = trainjob.run(jobs, base_name, request)
    uri = trainjob.model_uri(checkpoint_root, name)
    fs, root = remote.url_to_fs(uri)
    published = read_published(fs, root)
    if published.entry is None:
        raise CockatooError(f"{jobs.kind} {name} completed but left no model at {uri}: "
                            f"{published.problem or 'nothing published'}")
    # The published model stays: KFP uploads this step's output only after the step returns, and a
    # retry before then takes the model again. remove_stale_models clears it a week on.
    with atomic_output_dir(args.output) as tmp:
        fetch(fs, published.entry.uri, tmp)
    return read_model_manifest(args.output)


def evaluate_step(args: EvaluateArgs) -> dict:
    from cockatoo_lib.evaluation.evaluate import evaluate
    from cockatoo_lib.training.checkpoints import release_checkpoints
    from cockatoo_lib.training.model_folder import read_model_manifest

    results = evaluate(args.model_dir, local_path(args.tokenized_dir), args.output)
    release_checkpoints(read_model_manifest(args.model_dir))  # the train step left them: the model is safe
    return results


def evaluation_files(evaluation_dir: str) -> dict[str, Path]:
    from cockatoo_lib.evaluation.evaluate import METRICS_FILE, REPORT_FILE
    from cockatoo_lib.evaluation.model_card import MODEL_CARD

    folder = Path(evaluation_dir)
    return {"metrics": folder / METRICS_FILE, "report": folder / REPORT_FILE,
            "model_card": folder / MODEL_CARD}


def promote_step(args: PromoteArgs) -> dict:
    """Register the model and run the champion/challenger gate (cockatoo_lib.release.gate)."""
    from cockatoo_lib.plan.limits import check_range
    from cockatoo_lib.release.gate import GateRules, promote
    from cockatoo_lib.release.model_registry import open_registry

    if not args.registry_uri and "://" in args.output_uri:
        raise CockatooError(f"registry_uri is empty, but this step runs on a cluster (its output is "
                            f"{args.output_uri}); set it to the MLflow tracking server, e.g. "
                            "http://mlflow.mlflow:5000")
    for name in ("min_improvement", "max_label_drop", "min_gain_over_baseline"):
        check_range(name, getattr(args, name))
    rules = GateRules(min_improvement=args.min_improvement, max_label_drop=args.max_label_drop,
                      allow_label_change=args.allow_label_change,
                      min_gain_over_baseline=args.min_gain_over_baseline,
                      allow_below_baseline=args.allow_below_baseline)
    decision = promote(open_registry(args.registry_uri), model_name=args.model_name, model_dir=args.model_dir,
                       data_dir=args.data_dir, evaluation_dir=args.evaluation_dir, output=args.output,
                       run_id=args.run_id, rules=rules)
    model_name = args.model_name
    return {"model_name": model_name, "version": decision["challenger"], "promoted": decision["promoted"],
            "champion_before": decision["champion"], "reasons": decision["reasons"],
            "blocked_by": decision["blocked_by"],
            "below_baseline_override": decision["baseline"]["overridden"],
            "model_uri": f"models:/{model_name}/{decision['challenger']}"}
