"""Compile the pipeline, run it locally with kfp.local, and talk to a KFP cluster."""

import contextlib
import io
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from kfp import compiler

from cockatoo_lib.errors import CockatooError, first_line
from cockatoo_lib.plan.limits import check_range
from components.images import Images
from pipelines.cockatoo_score import PIPELINE_NAME as SCORE_PIPELINE
from pipelines.cockatoo_score import build_score_pipeline
from pipelines.cockatoo_train import PIPELINE_NAME, Cluster, build_pipeline

_CRON_ITEM = r"(\*|\?|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/[0-9]+)?"  # *, 5, 1-5, MON-FRI, */15
CRON_FIELD = re.compile(rf"^{_CRON_ITEM}(,{_CRON_ITEM})*$")


# The pipelines this project compiles, by name: the training pipeline and the scoring one.
class Pipeline(NamedTuple):
    build: Callable[[Cluster], Any]
    schedule_name: str  # a recurring run's default name
    catch_up: bool  # a recurring run, back from a pause, runs the times it missed


# Training catches nothing up (one retrain on the latest data is what a missed week needs);
# scoring does: each missed day's run scores that day's posts ({yesterday} of its own time).
PIPELINES = {PIPELINE_NAME: Pipeline(build_pipeline, "cockatoo-weekly-retrain", catch_up=False),
             SCORE_PIPELINE: Pipeline(build_score_pipeline, "cockatoo-daily-score", catch_up=True)}


def compile_pipeline(output: str | Path, cluster: Cluster = Cluster(), pipeline: str = PIPELINE_NAME) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(PIPELINES[pipeline].build(cluster), str(output))
    return output


def pipeline_inputs(pipeline: str = PIPELINE_NAME) -> dict[str, Any]:
    """The pipeline's parameters and their defaults (None: required), from the pipeline itself."""
    spec = PIPELINES[pipeline].build().component_spec
    return {name: spec.default for name, spec in spec.inputs.items()}


def parse_params(pairs: list[str], pipeline: str = PIPELINE_NAME) -> dict[str, Any]:
    """`key=value` run parameters. Values are JSON where they parse (lists, dicts, numbers),
    else strings. Unknown names are refused with the list of valid ones."""
    valid = pipeline_inputs(pipeline)
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise CockatooError(f"parameter {pair!r} is not of the form name=value")
        if key not in valid:
            raise CockatooError(f"unknown {pipeline} parameter {key!r}; valid: {', '.join(valid)}")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def check_params(params: dict[str, Any], pipeline: str = PIPELINE_NAME) -> None:
    """Fail before anything runs: a missing parameter, a bad model type or override, a missing
    data config."""
    defaults = pipeline_inputs(pipeline)
    values = {**defaults, **params}
    missing = [name for name, value in values.items() if value is None]
    if missing:
        raise CockatooError(f"{pipeline} needs the parameter{'s' * (len(missing) > 1)} "
                            f"{', '.join(missing)} (--param name=value)")
    if pipeline == SCORE_PIPELINE:
        for name in ("shards", "batch_size"):
            check_range(name, values[name])
        return
    from cockatoo_lib.data.prepare import load_data_config
    from cockatoo_lib.steps import PlanArgs

    if not isinstance(values["overrides"], dict):
        raise CockatooError(f"parameter overrides must be a JSON object, got {values['overrides']!r}")
    for name, value in (("seed", values["seed"]), ("max_samples", values["max_train_samples"]),
                        ("gpus", values["gpus"]), ("nodes", values["nodes"]),
                        ("min_improvement", values["min_improvement"]),
                        ("min_gain_over_baseline", values["min_gain_over_baseline"]),
                        ("max_label_drop", values["max_label_drop"])):
        check_range(name, value, {"max_samples": "max_train_samples"}.get(name, name))
    PlanArgs.of(values).plan()
    if "://" not in values["data_config"]:
        load_data_config(values["data_config"], values["labels"] or None)


def check_cron(cron: str) -> None:
    """KFP's cron has six fields, seconds first: '0 0 3 * * 1' is Mondays at 03:00."""
    fields = cron.split()
    if len(fields) != 6 or not all(CRON_FIELD.match(f) for f in fields):
        raise CockatooError(
            f"invalid cron {cron!r}: KFP expects six fields, seconds first "
            "(second minute hour day-of-month month day-of-week), e.g. '0 0 3 * * 1'")


# ------------------------------------------------------------------------ local


def run_local(params: dict[str, Any], pipeline_root: str | Path,
              in_image: str | None = None) -> dict[str, Any]:
    """Run the whole pipeline locally with kfp.local: the compiled pipeline file, as a cluster
    would receive it, not the Python definition. Each step runs in this Python environment
    (SubprocessRunner), or, with `in_image`, in its own container of that image (DockerRunner),
    the steps handing artifacts over through the pipeline root."""
    from kfp import components, local

    from cockatoo_lib.release.model_registry import local_registry_uri

    check_params(params)
    if in_image:
        _check_engine()
    root = Path(pipeline_root).resolve()
    with _writable_by_containers(in_image):
        # What steps share lies under the pipeline root, the one folder every container sees: the
        # embedded registry (SQLite) and checkpoints, so that a rerun resumes; in containers the
        # tokenization cache too (a container's own HOME is gone with it).
        shared = {"checkpoint_root": str(root)}
        if in_image:
            shared["tokenized_cache_root"] = str(root / "tokenized-cache")
        params = {**params, **{key: value for key, value in shared.items() if not params.get(key)}}
        if not params.get("registry_uri"):  # only then: it creates the registry's folder
            params["registry_uri"] = local_registry_uri(root)
        if in_image:
            runner, cluster = _docker_runner(root), Cluster(images=Images.single(in_image), for_local=True)
        else:
            runner, cluster = local.SubprocessRunner(use_venv=False), Cluster(for_local=True)
        local.init(runner=runner, pipeline_root=str(root), raise_on_error=False)
        compiled = compile_pipeline(root / f"{PIPELINE_NAME}.yaml", cluster)
        try:
            with _python_on_path(), _StepErrors() as errors:
                outputs = components.load_component_from_file(str(compiled))(**params).outputs
        finally:
            if in_image:  # interrupted (Ctrl-C, a timeout): the step's container would train on
                _stop_containers(root)
    if not outputs:
        why = errors.last or "the failing step's log is above"
        raise CockatooError(f"the local run failed: {why} ({pipeline_root})")
    from cockatoo_lib.release.gate import DECISION_JSON
    from cockatoo_lib.steps import evaluation_files

    files = evaluation_files(outputs["evaluation"].path)
    metrics = json.loads(files["metrics"].read_text())
    decision = json.loads((Path(outputs["decision"].path) / DECISION_JSON).read_text())
    return {"model": outputs["model"].path, **{k: str(v) for k, v in files.items()},
            "gate": outputs["gate"].path, "decision": decision, "registry_uri": params["registry_uri"],
            "test_macro_f1": metrics["macro_f1"], "test_macro_f1_at_0_5": metrics["at_0.5"]["macro_f1"],
            "baseline_test_macro_f1": metrics["baseline"]["macro_f1"]}


def score_local(params: dict[str, Any], pipeline_root: str | Path) -> dict:
    """Run the cockatoo-score pipeline's components locally with kfp.local, the shards one after
    another: kfp.local 2.16 runs a dsl.ParallelFor only where no task waits for the loop and its
    items are a task's single output, and finish waits for every shard. The manifest it wrote."""
    from kfp import local

    from components.score import finish_scoring, plan_scoring, score_shard

    check_params(params, SCORE_PIPELINE)
    values = {**pipeline_inputs(SCORE_PIPELINE), **params}
    root = Path(pipeline_root).resolve()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=False)
    with _python_on_path(), _StepErrors() as errors:
        def ran(task, step: str):
            if not task.outputs:
                why = errors.last or f"its log is above ({root})"
                raise CockatooError(f"the local run failed at {step}: {why}")
            return task

        plan = ran(plan_scoring(model=values["model"], input_uri=values["input_uri"],
                                output_uri=values["output_uri"], shards=values["shards"],
                                registry_uri=values["registry_uri"], run_time=""), "plan")
        for shard in plan.outputs["shards"]:
            ran(score_shard(model=plan.outputs["model"], shard=shard, output_uri=plan.outputs["output_uri"],
                            registry_uri=values["registry_uri"], text_column=values["text_column"],
                            image_column=values["image_column"], batch_size=values["batch_size"]),
                f"shard {int(shard['index'])}")
        finish = ran(finish_scoring(plan=plan.outputs["plan"]), "finish")
    return json.loads(Path(finish.outputs["scored"].path).read_text())


class _StepErrors(io.TextIOBase):
    """kfp.local prints each step's output to sys.stdout: pass it on, and keep the last
    CockatooError a step raised, so that a failed local run says why in its one line."""

    PATTERN = re.compile(r"^(?:[\w.]+\.)?CockatooError: (.+)$")

    def __enter__(self):
        self.last, self._target, self._line = None, sys.stdout, ""
        sys.stdout = self
        return self

    def __exit__(self, *exc):
        sys.stdout = self._target

    def write(self, text: str) -> int:
        self._target.write(text)
        *lines, self._line = (self._line + text).split("\n")
        for line in lines:
            if match := self.PATTERN.match(line.strip()):
                self.last = match.group(1)
        return len(text)

    def flush(self):
        self._target.flush()


@contextlib.contextmanager
def _python_on_path():
    """The subprocess runner starts each step with `python3` from PATH: make that this
    interpreter, whose environment has cockatoo_lib and kfp installed, for the run only."""
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{path}"
    try:
        yield
    finally:
        os.environ["PATH"] = path


CONTAINER_LABEL = "cockatoo.pipeline-root"  # on each step's container: the run it belongs to


@contextlib.contextmanager
def _writable_by_containers(in_image: str | None):
    """Where this process is root, steps in containers run as the image's user, in group 0: the
    folders this process creates meanwhile (the root, the registry's) are writable by that group."""
    if not in_image or os.getuid() != 0:
        yield
        return
    previous = os.umask(0o002)
    try:
        yield
    finally:
        os.umask(previous)


def _docker_runner(root: Path):
    """Steps in containers: as the image's user where this process is root; else as the caller's
    uid, in group 0 as on OpenShift, so that the files under the root stay the caller's. Each
    container is labelled with the run's root."""
    from kfp import local

    root.mkdir(parents=True, exist_ok=True)
    if os.getuid() == 0:  # folders made before this run (a rerun's root, its registry): the same
        for folder in (root, *root.iterdir()):
            if folder.is_dir() and folder.stat().st_uid == 0:
                folder.chmod(folder.stat().st_mode | 0o070)
    user = {} if os.getuid() == 0 else {"user": f"{os.getuid()}:0"}
    return local.DockerRunner(labels={CONTAINER_LABEL: str(root)}, **user)


def _stop_containers(root: Path) -> None:
    import docker

    client = docker.from_env()
    for container in client.containers.list(filters={"label": f"{CONTAINER_LABEL}={root}"}):
        container.kill()


def _check_engine() -> None:
    try:
        import docker

        docker.from_env().ping()
    except Exception as exc:  # noqa: BLE001 - docker raises many kinds, none of them the user's fault
        raise CockatooError(f"no container engine answers (docker: {first_line(exc, 'reason')}); start "
                            "one, or run without --in-image") from None


# ---------------------------------------------------------------------- cluster


def kfp_client(host: str):
    """A kfp.Client; a bearer token comes from KF_PIPELINES_TOKEN, else kfp's own lookup
    (kube config, in-cluster service account token)."""
    import kfp

    try:
        return kfp.Client(host=host, existing_token=os.environ.get("KF_PIPELINES_TOKEN") or None)
    except Exception as exc:  # noqa: BLE001 - urllib3 and kfp_server_api raise many kinds
        raise CockatooError(f"cannot reach KFP at {host}: {first_line(exc, 'reason')}") from None


def _compiled(cluster: Cluster, folder: str, pipeline: str) -> str:
    return str(compile_pipeline(Path(folder) / f"{pipeline}.yaml", cluster, pipeline))


def _experiment_id(client, name: str) -> str:
    # kfp's create_experiment gets the experiment of that name, or creates it.
    return client.create_experiment(name).experiment_id


def submit(host: str, params: dict[str, Any], experiment: str, cluster: Cluster,
           run_name: str | None = None, pipeline: str = PIPELINE_NAME) -> str:
    """Compile, create a run, return its URL."""
    check_params(params, pipeline)
    client = kfp_client(host)
    with tempfile.TemporaryDirectory() as folder:
        try:
            result = client.create_run_from_pipeline_package(
                _compiled(cluster, folder, pipeline), arguments=params, experiment_name=experiment,
                run_name=run_name)
        except CockatooError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise CockatooError(f"KFP at {host} refused the run: {first_line(exc, 'reason')}") from None
    return f"{host.rstrip('/')}/#/runs/details/{result.run_id}"


def schedule(host: str, cron: str, params: dict[str, Any], experiment: str, cluster: Cluster,
             name: str | None = None, pipeline: str = PIPELINE_NAME) -> str:
    """Create a recurring run, one at a time, catching up missed runs or not (Pipeline.catch_up).
    Returns its URL."""
    check_cron(cron)
    check_params(params, pipeline)
    client = kfp_client(host)
    with tempfile.TemporaryDirectory() as folder:
        kind = PIPELINES[pipeline]
        try:
            run = client.create_recurring_run(
                experiment_id=_experiment_id(client, experiment), job_name=name or kind.schedule_name,
                cron_expression=cron, max_concurrency=1, no_catchup=not kind.catch_up, params=params,
                pipeline_package_path=_compiled(cluster, folder, pipeline), enabled=True)
        except CockatooError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise CockatooError(f"KFP at {host} refused the recurring run: "
                                f"{first_line(exc, 'reason')}") from None
    return f"{host.rstrip('/')}/#/recurringrun/details/{run.recurring_run_id}"


# ---------------------------------------------------------------------- Vertex AI


def submit_vertex(target, params: dict[str, Any], cluster: Cluster, run_name: str | None = None,
                  pipeline: str = PIPELINE_NAME) -> str:
    """Compile for Vertex AI, create a PipelineJob, return its console URL."""
    from pipelines import vertex

    check_params(params, pipeline)
    with tempfile.TemporaryDirectory() as folder:
        return vertex.submit(target, _compiled(cluster, folder, pipeline), params, pipeline, run_name)


def schedule_vertex(target, cron: str, params: dict[str, Any], cluster: Cluster, name: str | None = None,
                    pipeline: str = PIPELINE_NAME, time_zone: str = "UTC", start: str = "", end: str = "",
                    max_concurrent_runs: int = 1) -> str:
    """Compile for Vertex AI and create its schedule; return the schedule's resource name."""
    from pipelines import vertex

    check_params(params, pipeline)
    with tempfile.TemporaryDirectory() as folder:
        return vertex.schedule(target, _compiled(cluster, folder, pipeline), params, pipeline, cron,
                               name or PIPELINES[pipeline].schedule_name, time_zone, start, end,
                               max_concurrent_runs)
