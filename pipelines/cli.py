"""The full `cockatoo` command line: the library's step commands plus the pipeline commands
(run locally, compile, submit, schedule) and deploy. Lives here because those need kfp or the
images' names."""

import sys
from pathlib import Path

import typer

from cockatoo_lib.cli import REGISTRY_URI, SET, app, option_group, with_serve_settings
from cockatoo_lib.cli import main as _library_main
from cockatoo_lib.plan.catalogue import CATALOGUE
from cockatoo_lib.steps import STEPS

# The run parameter model_type (default the pipeline's); the names from the one catalogue.
PIPELINE_MODEL_TYPE = typer.Option(None, "--model-type", "-m", help=", ".join(CATALOGUE))
PARAM = typer.Option(None, "--param", "-p", help="pipeline parameter name=value (repeatable)")
IMAGE_REGISTRY = typer.Option(None, "--image-registry", help="registry of the cockatoo-cpu/-cuda images")
TAG = typer.Option(None, "--image-tag", help="tag of the images")


PIPELINE = typer.Option("cockatoo-train", "--pipeline",
                        help="cockatoo-train, or cockatoo-score (score a backlog with a registered model)")

# The options that say where and how the steps run, taken alike by compile, submit and schedule.
CLUSTER_OPTIONS: dict[str, tuple[type, typer.models.OptionInfo]] = {
    "image_registry": (str, IMAGE_REGISTRY),
    "image_tag": (str, TAG),
    "accelerator_type": (str, typer.Option("nvidia.com/gpu", "--accelerator-type")),
    "gpus": (int, typer.Option(1, "--gpus", help="default of the gpus run parameter")),
    "node_selector": (list[str], typer.Option(None, "--node-selector",
                                              help="label=value, on every step (repeatable)")),
    "toleration": (list[str], typer.Option(None, "--toleration",
                                           help="key=value, NoSchedule, on every step (repeatable)")),
    "cache_root": (str, typer.Option("", "--cache-root",
                                     help="default tokenized_cache_root, e.g. gs://bucket/cache")),
    "scratch_size": (str, typer.Option("", "--scratch-size",
                                       help="a volume for prepare's and tokenize's temporary files, "
                                            "e.g. 100Gi (image data sets)")),
    "registry_uri": (str, typer.Option("", "--registry-uri",
                                       help="default registry_uri: the MLflow tracking server")),
    "checkpoint_root": (str, typer.Option("", "--checkpoint-root",
                                          help="default checkpoint_root, e.g. gs://bucket/checkpoints")),
    "retries": (int, typer.Option(2, "--retries", help="retries of a failed train step, with backoff")),
    "ca_secret": (str, typer.Option("", "--ca-secret",
                                    help="a secret with the team's CA certificate (key ca.crt; on Vertex "
                                         "AI a Secret Manager secret), trusted by every step beside the "
                                         "public CAs")),
    "score_gpus": (int, typer.Option(0, "--score-gpus",
                                     help="cockatoo-score: GPUs per shard (0: the CPU image)")),
    "score_parallelism": (int, typer.Option(8, "--score-parallelism",
                                            help="cockatoo-score: shards scored at once (0: all)")),
    "target": (str, typer.Option("kubeflow", "--target",
                                 help="kubeflow (a KFP cluster) or vertex (Vertex AI Pipelines: no "
                                      "Kubernetes settings, --accelerator-type by Vertex's name)")),
    "machine_type": (str, typer.Option("", "--machine-type",
                                       help="Vertex AI: the machine type of a multi-node run's nodes "
                                            "(default: from the accelerator and the run's gpus)")),
}

# Where a run goes on Vertex AI (submit and schedule with --target vertex).
VERTEX_OPTIONS: dict[str, tuple[type, typer.models.OptionInfo]] = {
    "project": (str, typer.Option("", "--project", help="Vertex AI: the Google Cloud project")),
    "region": (str, typer.Option("", "--region", help="Vertex AI: the region, e.g. europe-west4")),
    "pipeline_root": (str, typer.Option("", "--pipeline-root", help="Vertex AI: gs:// folder for artifacts")),
    "service_account": (str, typer.Option("", "--service-account",
                                          help="Vertex AI: the runs' service account")),
    "network": (str, typer.Option("", "--network", help="Vertex AI: a VPC network to peer, "
                                                         "projects/NUMBER/global/networks/NAME")),
}


def with_cluster_options(command):
    """Give `command` the cluster options; it receives them as one `cluster` (a Cluster)."""
    return option_group(CLUSTER_OPTIONS, _cluster, "cluster")(command)


def with_vertex_options(command):
    """Give `command` the Vertex AI options; it receives them as one `vertex` (a VertexTarget)."""
    def build(**values):
        from pipelines.vertex import VertexTarget

        return VertexTarget(**values)

    return option_group(VERTEX_OPTIONS, build, "vertex")(command)


def _cluster(image_registry=None, image_tag=None, accelerator_type="nvidia.com/gpu", gpus=1,
             node_selector=None, toleration=None, cache_root="", scratch_size="", registry_uri="",
             checkpoint_root="", retries=2, ca_secret="", score_gpus=0, score_parallelism=8,
             target="kubeflow", machine_type=""):
    from cockatoo_lib.errors import CockatooError
    from cockatoo_lib.plan.limits import check_range
    from components.images import DEFAULT_REGISTRY, DEFAULT_TAG, Images
    from pipelines.cockatoo_train import Cluster

    check_range("gpus", gpus, "--gpus")
    check_range("retries", retries, "--retries")
    check_range("gpus", score_gpus, "--score-gpus")
    check_range("parallelism", score_parallelism, "--score-parallelism")
    if target not in ("kubeflow", "vertex"):
        raise CockatooError(f"--target {target!r}: kubeflow or vertex")
    if target == "vertex":
        from pipelines.vertex import check_accelerator

        check_accelerator(accelerator_type)
        kubernetes_only = {"--node-selector": node_selector, "--toleration": toleration,
                           "--scratch-size": scratch_size}
        for option in [o for o, value in kubernetes_only.items() if value]:
            raise CockatooError(f"{option} is a Kubernetes setting, which Vertex AI does not take; "
                                "leave it out")
    elif machine_type:
        raise CockatooError("--machine-type is Vertex AI's (--target vertex); on a cluster, nodes take the "
                            "train step's resources")
    selectors = dict(_pair(s, "--node-selector") for s in node_selector or [])
    tolerations = [{"key": k, "operator": "Equal", "value": v, "effect": "NoSchedule"}
                   for k, v in (_pair(t, "--toleration") for t in toleration or [])]
    return Cluster(images=Images.of(image_registry or DEFAULT_REGISTRY, image_tag or DEFAULT_TAG),
                   accelerator_type=accelerator_type, node_selector=selectors,
                   tolerations=tolerations, cache_root=cache_root, gpus=gpus, scratch_size=scratch_size,
                   registry_uri=registry_uri, checkpoint_root=checkpoint_root, retries=retries,
                   ca_secret=ca_secret, score_gpus=score_gpus, score_parallelism=score_parallelism,
                   target=target, machine_type=machine_type)


def _pair(text: str, option: str) -> tuple[str, str]:
    from cockatoo_lib.errors import CockatooError

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise CockatooError(f"{option} {text!r} is not of the form key=value")
    return key, value


def _known(pipeline: str) -> str:
    from cockatoo_lib.errors import CockatooError
    from pipelines.runner import PIPELINES

    if pipeline not in PIPELINES:
        raise CockatooError(f"unknown pipeline {pipeline!r}; one of: {', '.join(PIPELINES)}")
    return pipeline


def _params(model_type, set_, params, pipeline="cockatoo-train"):
    from cockatoo_lib.errors import CockatooError
    from cockatoo_lib.plan.catalogue import parse_overrides
    from pipelines.runner import parse_params

    values = parse_params(params or [], pipeline)
    if (model_type or set_) and pipeline != "cockatoo-train":
        raise CockatooError(f"--model-type and --set choose a training run; {pipeline} takes --param")
    if model_type:
        values["model_type"] = model_type
    if set_:
        values["overrides"] = {**values.get("overrides", {}), **parse_overrides(set_)}
    return values


@app.command(help=f"Run the whole pipeline locally with kfp.local ({', '.join(STEPS)}).")
def run(model_type: str = PIPELINE_MODEL_TYPE,
        data_config: str = typer.Option(None, "--data-config", "-c", help="preset name or YAML path"),
        set_: list[str] = SET, param: list[str] = PARAM,
        output_root: Path = typer.Option(Path("runs"), "--output-root", help="kfp.local pipeline root"),
        predict: str = typer.Option(None, "--predict",
                                    help="then classify this file (CSV, JSONL, Parquet; a `text` column) "
                                         "with the champion, or, if there is none, with this run's model"),
        predictions: Path = typer.Option(None, "--predictions",
                                         help="where --predict writes (<output-root>/predictions.csv)"),
        in_image: str = typer.Option(None, "--in-image",
                                     help="run each step in its own container of this image (e.g. the "
                                          "CPU image of `make images`; needs a Docker engine)")):
    import time

    from cockatoo_lib.storage.fileio import check_output
    from pipelines.runner import run_local

    params = _params(model_type, set_, param)
    if data_config:
        params["data_config"] = data_config
    predictions = predictions or output_root / "predictions.csv"
    if predict:
        check_output(predictions)  # before an hour of training, not after
    start = time.perf_counter()
    result = run_local(params, output_root.resolve(), in_image)
    typer.echo(f"\nmodel:   {result['model']}\nmetrics: {result['metrics']}\nreport:  {result['report']}"
               f"\ncard:    {result['model_card']}")
    typer.echo(f"test macro-F1: {result['test_macro_f1']:.4f} at tuned thresholds "
               f"({result['test_macro_f1_at_0_5']:.4f} at 0.5); linear baseline "
               f"{result['baseline_test_macro_f1']:.4f}; pipeline took {time.perf_counter() - start:.0f} s")
    decision = result["decision"]
    typer.echo(f"gate:    {decision['model_name']} version {decision['challenger']} "
               f"{'promoted to champion' if decision['promoted'] else 'not promoted'} "
               f"(champion before: {decision['champion'] or 'none'}; {result['gate']})")
    for reason in decision["reasons"]:
        typer.echo(f"         - {reason}")
    typer.echo(f"registry: {result['registry_uri']}")
    if predict:
        _predict_after_run(result, predict, predictions)


def _predict_after_run(result: dict, source: str, predictions: Path) -> None:
    """Classify with what would serve: the champion; with no champion, this run's model, said so."""
    from cockatoo_lib.cli import show_predictions
    from cockatoo_lib.data.tables import read_table
    from cockatoo_lib.release.model_registry import CHAMPION, open_registry
    from cockatoo_lib.release.predict import predict_file

    name, registry_uri = result["decision"]["model_name"], result["registry_uri"]
    champion = open_registry(registry_uri).by_alias(name, CHAMPION)
    if champion is not None:
        model = f"models:/{name}@{CHAMPION}"
        typer.echo(f"\npredictions of the champion, {name} version {champion.version}:")
    else:
        model = result["model"]
        typer.echo(f"\nno champion: the gate has promoted no version of {name} (reasons above). These "
                   "predictions are from this run's model folder, which is NOT the champion and would "
                   "not serve:")
    info = predict_file(model, source, predictions, registry_uri=registry_uri)
    frame = read_table(source, "predict input")
    # The demo's new texts carry what a reader would flag in each (`expected`): shown beside.
    expected = frame["expected"].fillna("").astype(str).tolist() if "expected" in frame.columns else None
    show_predictions(info, expected)


@app.command(name="score")
def score(input_: str = typer.Option(..., "--input", "-i",
                                     help="a CSV, JSONL or Parquet file, folder or glob (local or a bucket); "
                                     "{today}, {yesterday}"),
          output: str = typer.Option(..., "--output", "-o", help="the folder the shards and manifest.json "
                                                                  "go to"),
          model: str = typer.Option(None, "--model", help="models:/NAME@ALIAS (default the champion), "
                                                          "models:/NAME/VERSION or a model folder"),
          registry_uri: str = REGISTRY_URI,
          shards: int = typer.Option(None, "--shards", help="at most this many shards (pods on a cluster)"),
          param: list[str] = PARAM,
          output_root: Path = typer.Option(Path("runs-score"), "--output-root",
                                           help="kfp.local pipeline root")):
    """Run the cockatoo-score pipeline's steps locally with kfp.local, the shards one after another
    (on a cluster they fan out over pods: `submit --pipeline cockatoo-score`)."""
    import time

    from pipelines.runner import SCORE_PIPELINE, score_local

    params = _params(None, None, param, SCORE_PIPELINE)
    given = {"input_uri": input_, "output_uri": output, "model": model, "registry_uri": registry_uri,
             "shards": shards}
    params.update({k: v for k, v in given.items() if v is not None})
    start = time.perf_counter()
    manifest = score_local(params, output_root.resolve())
    seconds = time.perf_counter() - start
    rows = manifest["rows"]
    typer.echo(f"\n{manifest['output']}: {rows} rows in {len(manifest['shards'])} shards, scored by "
               f"{manifest['model']} in {seconds:.0f} s ({rows / seconds:,.0f} rows/s)")
    typer.echo("positives: " + ", ".join(f"{k} {v}" for k, v in manifest["positives"].items()))


@app.command(name="compile")
@with_cluster_options
def compile_(output: Path = typer.Option(None, "--output", "-o", help="default: PIPELINE.yaml"),
             pipeline: str = PIPELINE, cluster=None):
    """Compile a pipeline to a KFP YAML package."""
    from cockatoo_lib.storage.fileio import check_file_output
    from pipelines.runner import compile_pipeline

    pipeline = _known(pipeline)
    path = compile_pipeline(check_file_output(output or Path(f"{pipeline}.yaml")), cluster, pipeline)
    typer.echo(f"compiled {path} (images {cluster.images.cpu}, {cluster.images.cuda})")


HOST = typer.Option("", "--host", help="KFP API URL, e.g. http://localhost:8080 (--target kubeflow)")
EXPERIMENT = typer.Option(None, "--experiment", help="the KFP experiment, default cockatoo (kubeflow)")


def _kfp_only(host: str, experiment: str | None, cluster) -> tuple[str, str]:
    """The KFP API and experiment a run goes to; with --target vertex, neither may be given."""
    from cockatoo_lib.errors import CockatooError

    if cluster.on_kubernetes and not host:
        raise CockatooError("--host: the KFP API to submit to (or --target vertex)")
    if not cluster.on_kubernetes:
        for option, value in (("--host", host), ("--experiment", experiment)):
            if value:
                raise CockatooError(f"{option} is KFP's; --target vertex submits to Vertex AI (--project, "
                                    "--region), where a run's labels name its pipeline and model type")
    return host, experiment or "cockatoo"


@app.command()
@with_cluster_options
@with_vertex_options
def submit(host: str = HOST,
           experiment: str = EXPERIMENT,
           model_type: str = PIPELINE_MODEL_TYPE,
           set_: list[str] = SET, param: list[str] = PARAM,
           run_name: str = typer.Option(None, "--run-name"), pipeline: str = PIPELINE, cluster=None,
           vertex=None):
    """Compile a pipeline and start a run on a KFP cluster or on Vertex AI (--target vertex);
    prints the run's URL."""
    from pipelines.runner import submit as run_submit

    params = _params(model_type, set_, param, _known(pipeline))
    host, experiment = _kfp_only(host, experiment, cluster)
    if not cluster.on_kubernetes:
        from pipelines.runner import submit_vertex

        typer.echo(submit_vertex(vertex.check(), params, cluster, run_name, pipeline))
        return
    typer.echo(run_submit(host, params, experiment, cluster, run_name, pipeline))


@app.command()
@with_cluster_options
@with_vertex_options
def schedule(host: str = HOST,
             cron: str = typer.Option(..., "--cron", help="six fields, seconds first: '0 0 3 * * 1'"),
             experiment: str = EXPERIMENT,
             name: str = typer.Option(None, "--name",
                                      help="default: cockatoo-weekly-retrain, cockatoo-daily-score"),
             model_type: str = PIPELINE_MODEL_TYPE,
             set_: list[str] = SET, param: list[str] = PARAM, pipeline: str = PIPELINE,
             time_zone: str = typer.Option("UTC", "--time-zone", help="Vertex AI: the cron's time zone"),
             start: str = typer.Option("", "--start", help="Vertex AI: first run no earlier, RFC 3339"),
             end: str = typer.Option("", "--end", help="Vertex AI: no run after, RFC 3339"),
             max_concurrent_runs: int = typer.Option(1, "--max-concurrent-runs", min=1,
                                                     help="Vertex AI: runs of the schedule at once"),
             cluster=None, vertex=None):
    """Create a recurring run of a pipeline, one at a time (on a cluster the weekly retrain catches
    no missed run up, the daily score does; Vertex AI catches none up); prints its URL."""
    from pipelines.runner import schedule as run_schedule

    params = _params(model_type, set_, param, _known(pipeline))
    host, experiment = _kfp_only(host, experiment, cluster)
    if not cluster.on_kubernetes:
        from pipelines.runner import schedule_vertex

        typer.echo(schedule_vertex(vertex.check(), cron, params, cluster, name, pipeline, time_zone, start,
                                   end, max_concurrent_runs))
        return
    typer.echo(run_schedule(host, cron, params, experiment, cluster, name, pipeline))


@app.command(name="prune-trainjobs")
def prune_trainjobs(namespace: str = typer.Option(None, "--namespace", help="default: the kube config's"),
                    older_than_hours: float = typer.Option(24, "--older-than-hours", min=0,
                                                           help="finished at least this long ago")):
    """Delete the project's TrainJobs that completed or failed over N hours ago: Kubeflow Trainer
    keeps a finished job, and its pods, until deleted. Each multi-node train step does this too
    (24 hours); running jobs stay, and end at their deadline."""
    from cockatoo_lib.training import trainjob

    removed = trainjob.remove_finished_jobs(trainjob.trainer_client(namespace), older_than_hours * 3600)
    typer.echo(f"deleted {len(removed)} finished TrainJob(s){': ' + ', '.join(removed) if removed else ''}")


@app.command()
@with_serve_settings
def deploy(model_name: str = typer.Option(..., "--model-name", help="the registered model"),
           alias: str = typer.Option("champion", "--alias", help="the alias the service follows"),
           registry_uri: str = REGISTRY_URI,
           name: str = typer.Option(None, "--name", help="the InferenceService; default: the model name"),
           namespace: str = typer.Option("default", "--namespace"),
           image_registry: str = IMAGE_REGISTRY, image_tag: str = TAG,
           min_replicas: int = typer.Option(1, "--min-replicas"),
           max_replicas: int = typer.Option(3, "--max-replicas"),
           cpu: str = typer.Option("2", "--cpu", help="CPU request and limit of each replica"),
           model_type: str = typer.Option("deberta", "--model-type", "-m",
                                          help="what the alias serves, which sizes --memory's default: "
                                               + ", ".join(CATALOGUE)),
           memory: str = typer.Option(None, "--memory", help="memory request and limit of each replica; "
                                                            "default: what a switch of versions of "
                                                            "--model-type holds (README)"),
           scratch: str = typer.Option("4Gi", "--scratch", help="disk at /tmp of each replica, where the "
                                                              "versions it serves are downloaded"),
           mlflow_secret: str = typer.Option("cockatoo-mlflow", "--mlflow-secret",
                                             help="secret with the registry's username, password, token"),
           ca_secret: str = typer.Option("", "--ca-secret",
                                         help="a secret with the team's CA certificate (key ca.crt), "
                                              "trusted beside the public CAs"),
           output: Path = typer.Option(None, "--output", "-o", help="default: NAME-inferenceservice.yaml"),
           apply_: bool = typer.Option(False, "--apply", help="create or update it in the current "
                                                                 "kube context's cluster"),
           settings=None):
    """Write the KServe InferenceService that serves a registered model's alias on the CPU image
    (`cockatoo serve`), and with --apply create or update it."""
    import yaml

    from cockatoo_lib.serving.deploy import Deployment, apply, inference_service, serving_memory
    from cockatoo_lib.storage.fileio import check_file_output, write_text_atomic
    from components.images import DEFAULT_REGISTRY, DEFAULT_TAG, Images

    name = name or model_name
    manifest = inference_service(Deployment(
        name=name, model_uri=f"models:/{model_name}@{alias}", registry_uri=registry_uri or "",
        image=Images.of(image_registry or DEFAULT_REGISTRY, image_tag or DEFAULT_TAG).cpu,
        namespace=namespace, min_replicas=min_replicas, max_replicas=max_replicas, cpu=cpu,
        memory=memory or serving_memory(model_type),
        scratch=scratch, mlflow_secret=mlflow_secret, ca_secret=ca_secret, settings=settings))
    path = check_file_output(output or Path(f"{name}-inferenceservice.yaml"))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(manifest, sort_keys=False))
    typer.echo(f"wrote {path}: InferenceService {namespace}/{name} serving models:/{model_name}@{alias}")
    if apply_:
        typer.echo(f"{apply(manifest)} InferenceService {namespace}/{name}")


def main() -> None:
    _library_main()


if __name__ == "__main__":
    sys.exit(main())
