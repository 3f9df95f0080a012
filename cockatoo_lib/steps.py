"""One function per pipeline step, as the KFP components call them: plain values and paths in,
the metadata a user should see in the KFP UI out. Knows nothing of KFP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cockatoo_lib.errors import CockatooError
from cockatoo_lib.plan.catalogue import Plan, detect_hardware, resolve_plan

# The pipeline's steps, in order: the one list. The components (components.COMPONENTS), the
# pipeline's per-step resources, the run command's help and the tests derive from it.
STEPS = ("prepare", "tokenize", "train", "evaluate", "promote")


def step_plan(model_type: str, overrides: dict[str, Any], base_model: str = "",
              detect: bool = False) -> Plan:
    """The run's plan; `base_model`, when given, replaces the registry's model id or path."""
    overrides = dict(overrides or {})
    if base_model:
        overrides["base_model"] = base_model
    return resolve_plan(model_type, overrides, detect_hardware() if detect else None)


def prepare_step(data_config: str, labels: list[str], seed: int, max_samples: int,
                 model_type: str, overrides: dict, base_model: str, output: str) -> dict:
    from cockatoo_lib.data.prepare import load_data_config, prepare

    step_plan(model_type, overrides, base_model)  # a bad model type or override fails here, first
    manifest = prepare(load_data_config(data_config, labels), output, seed=seed,
                       max_samples=max_samples)
    meta = {f"{split}_rows": v["rows"] for split, v in manifest["splits"].items()}
    return {**meta, "fingerprint": manifest["fingerprint"], "labels": manifest["labels"],
            "warnings": manifest["warnings"]}


def tokenize_step(data_dir: str, model_type: str, overrides: dict, base_model: str,
                  cache_root: str, output: str, output_uri: str) -> dict:
    from cockatoo_lib.tokenize import DEFAULT_CACHE_ROOT, diagnostic_warnings, tokenize

    cache_root = cache_root or DEFAULT_CACHE_ROOT
    if "://" in output_uri and "://" not in cache_root:
        # Steps on a cluster run in separate pods: a local cache folder would die with this one.
        raise CockatooError(f"tokenized_cache_root {cache_root!r} is a local folder, but this step runs "
                            f"on a cluster (its output is {output_uri}); set it to a bucket URI "
                            "such as gs://BUCKET/cockatoo-cache or s3://BUCKET/cockatoo-cache")
    info = tokenize(data_dir, step_plan(model_type, overrides, base_model), output, cache_root)
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


def train_step(tokenized_dir: str, model_type: str, overrides: dict, base_model: str, seed: int,
               output: str, gpus: int = 1, checkpoint_root: str = "", output_uri: str = "",
               nodes: int = 1, tokenized_uri: str = "", placement: dict | None = None) -> dict:
    """The run's seed (the run form's `seed`) is the plan's, unless the overrides set one. With
    more than one GPU, one process per GPU (cockatoo_lib.training.distributed); with more than one node,
    a Kubeflow Trainer TrainJob does the training (cockatoo_lib.training.trainjob)."""
    from cockatoo_lib.training import distributed
    from cockatoo_lib.training.trainer import read_model_manifest, train

    if "://" in output_uri and checkpoint_root and "://" not in checkpoint_root:
        # A retry runs in a new pod: checkpoints in this one's folder would be gone.
        raise CockatooError(f"checkpoint_root {checkpoint_root!r} is a local folder, but this step runs on a "
                            f"cluster (its output is {output_uri}); set it to a bucket URI such as "
                            "gs://BUCKET/cockatoo-checkpoints, or leave it empty")
    settings = {"seed": seed, **(overrides or {}), **({"base_model": base_model} if base_model else {})}
    plan = step_plan(model_type, settings, detect=nodes == 1)
    if nodes > 1:
        info = _train_on_nodes(tokenized_uri, model_type, settings, output, output_uri or output, gpus, nodes,
                               checkpoint_root, placement or {})
    elif gpus > 1 and not distributed.launched():
        code = distributed.launch(gpus, train_argv(local_path(tokenized_dir), output, model_type, settings,
                                                   checkpoint_root))
        if code:
            raise CockatooError(f"training in {gpus} processes failed (exit code {code}); the failing "
                                "process's error is in the log above")
        info = read_model_manifest(output)
    else:
        info = train(local_path(tokenized_dir), plan, output, checkpoint_root=checkpoint_root or None)
    return {"model_type": info["model_type"], "base_model": info["base_model"],
            "selection_metric": info["selection_metric"],
            "best_validation_metric": info["best_validation_metric"], "best_epoch": info["best_epoch"],
            "epochs": info["epochs"], "seed": info["seed"], "batch_split": info["batch_split"],
            "labels": info["labels"], "thresholds": info["thresholds"]}


def train_pod_gpus(gpus: int, nodes: int) -> int:
    """GPUs the train step's pod holds: with nodes > 1 the TrainJob's nodes train, the pod waits."""
    return gpus if nodes == 1 else 0


def train_argv(tokenized: str, output: str, model_type: str, settings: dict,
               checkpoint_root: str) -> list[str]:
    """`cockatoo train` with the step's settings, as each process of a multi-process training runs it."""
    import json

    return ["train", "--tokenized", tokenized, "--output", output, "--model-type", model_type,
            *[f"--set={key}={json.dumps(value)}" for key, value in settings.items()],
            *(["--checkpoint-root", checkpoint_root] if checkpoint_root else [])]


def _train_on_nodes(tokenized_uri: str, model_type: str, settings: dict, output: str, output_uri: str,
                    gpus: int, nodes: int, checkpoint_root: str, placement: dict) -> dict:
    import os

    from cockatoo_lib.storage import remote
    from cockatoo_lib.storage.fileio import atomic_output_dir
    from cockatoo_lib.storage.publish import fetch, read_published
    from cockatoo_lib.training import trainjob
    from cockatoo_lib.training.trainer import read_model_manifest

    for name, value in (("checkpoint_root", checkpoint_root), ("the tokenized data", tokenized_uri)):
        if "://" not in value:
            raise CockatooError(f"nodes={nodes} needs {name} in a bucket the nodes share (gs://, s3://), "
                                f"not {value!r}")
    image = os.environ.get(trainjob.IMAGE_ENV)
    if not image:
        raise CockatooError(f"nodes={nodes}: {trainjob.IMAGE_ENV} (the image the nodes run) is not set on "
                            "this step; compile the pipeline with cockatoo compile")

    accelerator = os.environ.get(trainjob.ACCELERATOR_ENV) or "nvidia.com/gpu"

    def request(name: str) -> trainjob.JobRequest:
        command = trainjob.train_command(train_argv(tokenized_uri, trainjob.model_uri(checkpoint_root, name),
                                                    model_type, settings, checkpoint_root))
        return trainjob.JobRequest(image=image, nodes=nodes, gpus_per_node=max(gpus, 1), command=command,
                                   placement=placement, accelerator=accelerator)

    trainjob.remove_stale_models(checkpoint_root)
    name = trainjob.run(trainjob.trainer_client(), trainjob.job_base_name(output_uri), request)
    uri = trainjob.model_uri(checkpoint_root, name)
    fs, root = remote.url_to_fs(uri)
    published = read_published(fs, root)
    if published.entry is None:
        raise CockatooError(f"TrainJob {name} completed but left no model at {uri}: "
                            f"{published.problem or 'nothing published'}")
    # The published model stays: KFP uploads this step's output only after the step returns, and a
    # retry before then takes the model again. remove_stale_models clears it a week on.
    with atomic_output_dir(output) as tmp:
        fetch(fs, published.entry.uri, tmp)
    return read_model_manifest(output)


def evaluate_step(model_dir: str, tokenized_dir: str, output: str) -> dict:
    from cockatoo_lib.evaluation.evaluate import evaluate

    return evaluate(model_dir, local_path(tokenized_dir), output)


def evaluation_files(evaluation_dir: str) -> dict[str, Path]:
    from cockatoo_lib.evaluation.evaluate import METRICS_FILE, REPORT_FILE
    from cockatoo_lib.evaluation.model_card import MODEL_CARD

    folder = Path(evaluation_dir)
    return {"metrics": folder / METRICS_FILE, "report": folder / REPORT_FILE,
            "model_card": folder / MODEL_CARD}


def promote_step(model_dir: str, data_dir: str, evaluation_dir: str, registry_uri: str, model_name: str,
                 run_id: str, min_improvement: float, max_label_drop: float, allow_label_change: bool,
                 output: str, output_uri: str, min_gain_over_baseline: float = 0.0,
                 allow_below_baseline: bool = False) -> dict:
    """Register the model and run the champion/challenger gate (cockatoo_lib.release.gate)."""
    from cockatoo_lib.release.gate import GateRules, promote
    from cockatoo_lib.release.model_registry import open_registry

    if not registry_uri and "://" in output_uri:
        raise CockatooError(f"registry_uri is empty, but this step runs on a cluster (its output is "
                            f"{output_uri}); set it to the MLflow tracking server, e.g. "
                            "http://mlflow.mlflow:5000")
    from cockatoo_lib.plan.limits import check_range

    check_range("min_improvement", min_improvement)
    check_range("max_label_drop", max_label_drop)
    check_range("min_gain_over_baseline", min_gain_over_baseline)
    rules = GateRules(min_improvement=min_improvement, max_label_drop=max_label_drop,
                      allow_label_change=allow_label_change, min_gain_over_baseline=min_gain_over_baseline,
                      allow_below_baseline=allow_below_baseline)
    decision = promote(open_registry(registry_uri), model_name, model_dir, data_dir, evaluation_dir, output,
                       run_id, rules)
    return {"model_name": model_name, "version": decision["challenger"], "promoted": decision["promoted"],
            "champion_before": decision["champion"], "reasons": decision["reasons"],
            "blocked_by": decision["blocked_by"],
            "below_baseline_override": decision["baseline"]["overridden"],
            "model_uri": f"models:/{model_name}/{decision['challenger']}"}
