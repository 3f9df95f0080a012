"""Compile the pipeline, run it locally with kfp.local, and talk to a KFP cluster."""

import contextlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from kfp import compiler

from cockatoo_lib.errors import CockatooError, first_line
from cockatoo_lib.plan.limits import check_range
from components.images import Images
from pipelines.cockatoo_train import PIPELINE_NAME, Cluster, build_pipeline

_CRON_ITEM = r"(\*|\?|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/[0-9]+)?"  # *, 5, 1-5, MON-FRI, */15
CRON_FIELD = re.compile(rf"^{_CRON_ITEM}(,{_CRON_ITEM})*$")


def compile_pipeline(output: str | Path, cluster: Cluster = Cluster()) -> Path:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(cluster), str(output))
    return output


def pipeline_inputs() -> dict[str, Any]:
    """The pipeline's parameters and their defaults, from the pipeline itself."""
    spec = build_pipeline().component_spec
    return {name: spec.default for name, spec in spec.inputs.items()}


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """`key=value` run parameters. Values are JSON where they parse (lists, dicts, numbers),
    else strings. Unknown names are refused with the list of valid ones."""
    valid = pipeline_inputs()
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise CockatooError(f"parameter {pair!r} is not of the form name=value")
        if key not in valid:
            raise CockatooError(f"unknown pipeline parameter {key!r}; valid: {', '.join(valid)}")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def check_params(params: dict[str, Any]) -> None:
    """Fail before anything runs: a bad model type or override, or a missing data config."""
    from cockatoo_lib.data.prepare import load_data_config
    from cockatoo_lib.steps import PlanArgs

    defaults = pipeline_inputs()
    values = {**defaults, **params}
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
        # The subprocess runner starts each step with `python3` from PATH: make that this
        # interpreter, whose environment has cockatoo_lib and kfp installed, for the run only.
        path = os.environ.get("PATH", "")
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{path}"
        try:
            task = components.load_component_from_file(str(compiled))(**params)
        finally:
            os.environ["PATH"] = path
            if in_image:  # interrupted (Ctrl-C, a timeout): the step's container would train on
                _stop_containers(root)
    if not task.outputs:
        raise CockatooError(f"the local run failed; the failing step's log is above ({pipeline_root})")
    from cockatoo_lib.release.gate import DECISION_JSON
    from cockatoo_lib.steps import evaluation_files

    files = evaluation_files(task.outputs["evaluation"].path)
    metrics = json.loads(files["metrics"].read_text())
    decision = json.loads((Path(task.outputs["decision"].path) / DECISION_JSON).read_text())
    return {"model": task.outputs["model"].path, **{k: str(v) for k, v in files.items()},
            "gate": task.outputs["gate"].path, "decision": decision, "registry_uri": params["registry_uri"],
            "test_macro_f1": metrics["macro_f1"], "test_macro_f1_at_0_5": metrics["at_0.5"]["macro_f1"],
            "baseline_test_macro_f1": metrics["baseline"]["macro_f1"]}


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


def _compiled(cluster: Cluster, folder: str) -> str:
    return str(compile_pipeline(Path(folder) / f"{PIPELINE_NAME}.yaml", cluster))


def _experiment_id(client, name: str) -> str:
    # kfp's create_experiment gets the experiment of that name, or creates it.
    return client.create_experiment(name).experiment_id


def submit(host: str, params: dict[str, Any], experiment: str, cluster: Cluster,
           run_name: str | None = None) -> str:
    """Compile, create a run, return its URL."""
    check_params(params)
    client = kfp_client(host)
    with tempfile.TemporaryDirectory() as folder:
        try:
            result = client.create_run_from_pipeline_package(
                _compiled(cluster, folder), arguments=params, experiment_name=experiment,
                run_name=run_name)
        except CockatooError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise CockatooError(f"KFP at {host} refused the run: {first_line(exc, 'reason')}") from None
    return f"{host.rstrip('/')}/#/runs/details/{result.run_id}"


def schedule(host: str, cron: str, params: dict[str, Any], experiment: str, cluster: Cluster,
             name: str) -> str:
    """Create a recurring run: one at a time, no catch-up of missed runs. Returns its URL."""
    check_cron(cron)
    check_params(params)
    client = kfp_client(host)
    with tempfile.TemporaryDirectory() as folder:
        try:
            run = client.create_recurring_run(
                experiment_id=_experiment_id(client, experiment), job_name=name,
                cron_expression=cron, max_concurrency=1, no_catchup=True, params=params,
                pipeline_package_path=_compiled(cluster, folder), enabled=True)
        except CockatooError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise CockatooError(f"KFP at {host} refused the recurring run: "
                                f"{first_line(exc, 'reason')}") from None
    return f"{host.rstrip('/')}/#/recurringrun/details/{run.recurring_run_id}"
