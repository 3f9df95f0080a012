"""The compiled pipeline, checked for meaning from a fresh compile: where every run parameter
and every compile option lands (which task, which value). The golden file only detects that
something changed; these tests say what must stay true."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from kfp.dsl.types import type_utils

from cockatoo_lib import steps
from cockatoo_lib.steps import EvaluateArgs, PrepareArgs, PromoteArgs, TokenizeArgs, TrainArgs
from components import COMPONENTS
from components.images import Images
from pipelines.cockatoo_train import RESOURCES, Cluster
from pipelines.runner import compile_pipeline, pipeline_inputs

README = Path(__file__).parents[1] / "README.md"
# The compiled tasks: one per step of the one list, and the helper that sizes train's pod.
STEPS = ("train-pod-gpus", *(component.name for component in COMPONENTS.values()))


def _compiled(tmp_path, cluster: Cluster = Cluster()):
    pipeline, platform = yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", cluster).read_text())
    tasks = pipeline["root"]["dag"]["tasks"]
    executors = pipeline["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return pipeline, tasks, executors, k8s


def _inputs(task) -> dict[str, str]:
    """A task's parameter inputs: which pipeline parameter (or constant) feeds each."""
    out = {}
    for name, spec in task["inputs"].get("parameters", {}).items():
        constant = spec.get("runtimeValue", {}).get("constant")
        out[name] = spec.get("componentInputParameter") or f"constant:{constant}"
    return out


# Each run parameter, the tasks that take it, and under which input name.
WIRING = {
    "model_type": {"prepare-data": "model_type", "tokenize": "model_type", "train": "model_type"},
    "overrides": {"prepare-data": "overrides", "tokenize": "overrides", "train": "overrides"},
    "base_model": {"prepare-data": "base_model", "tokenize": "base_model", "train": "base_model"},
    "data_config": {"prepare-data": "data_config"},
    "labels": {"prepare-data": "labels"},
    "seed": {"prepare-data": "seed", "train": "seed"},
    "max_train_samples": {"prepare-data": "max_samples"},
    "tokenized_cache_root": {"tokenize": "cache_root"},
    # The train step reads it (one process per GPU); its pod's accelerator limit comes from both.
    "gpus": {"train": "gpus", "train-pod-gpus": "gpus"},
    "checkpoint_root": {"train": "checkpoint_root"},
    "nodes": {"train": "nodes", "train-pod-gpus": "nodes"},
    "registry_uri": {"promote": "registry_uri"},
    "model_name": {"promote": "model_name"},
    "min_improvement": {"promote": "min_improvement"},
    "max_label_drop": {"promote": "max_label_drop"},
    "allow_label_change": {"promote": "allow_label_change"},
    "min_gain_over_baseline": {"promote": "min_gain_over_baseline"},
    "allow_below_baseline": {"promote": "allow_below_baseline"},
}


def test_every_run_parameter_reaches_exactly_its_tasks(tmp_path):
    pipeline, tasks, _, _ = _compiled(tmp_path)
    assert set(WIRING) == set(pipeline["root"]["inputDefinitions"]["parameters"])
    for parameter, where in WIRING.items():
        takers: dict[str, set] = {}
        for task in STEPS:
            for name, source in _inputs(tasks[task]).items():
                if source == parameter:
                    takers.setdefault(task, set()).add(name)
        assert takers == {t: {n} if isinstance(n, str) else set(n) for t, n in where.items()}, parameter


def test_parameter_defaults_are_the_readmes(tmp_path):
    table = README.read_text().split("## Pipeline parameters", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)`", table, re.M))
    assert set(rows) == set(pipeline_inputs())
    for name, default in pipeline_inputs().items():
        shown = {"[]": [], "{}": {}, '""': ""}.get(rows[name], rows[name])
        if isinstance(default, bool):
            shown = shown == "true"
        elif isinstance(default, int | float):
            shown = type(default)(shown)
        assert shown == default, name


def test_gpus_and_accelerator_type_reach_the_train_step_only(tmp_path):
    cluster = Cluster(gpus=3, accelerator_type="nvidia-tesla-a100")
    pipeline, tasks, executors, _ = _compiled(tmp_path, cluster)
    assert pipeline["root"]["inputDefinitions"]["parameters"]["gpus"]["defaultValue"] == 3
    accelerator = executors["exec-train"]["container"]["resources"]["accelerator"]
    assert accelerator["resourceType"] == "nvidia-tesla-a100"
    # The count is read at run time from the run's `gpus` and `nodes`: all of them while the pod
    # trains, none while it waits for a TrainJob's nodes (which get the same accelerator type).
    assert accelerator["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--train-pod-gpus-Output']}}"
    assert tasks["train"]["inputs"]["parameters"]["pipelinechannel--train-pod-gpus-Output"] == {
        "taskOutputParameter": {"outputParameterKey": "Output", "producerTask": "train-pod-gpus"}}
    from cockatoo_lib.steps import train_pod_gpus

    assert (train_pod_gpus(3, 1), train_pod_gpus(3, 2)) == (3, 0)
    assert "train-pod-gpus" in tasks["train"]["dependentTasks"]  # kfp.local orders tasks by these
    env = {e["name"]: e["value"] for e in executors["exec-train"]["container"]["env"]}
    assert env["COCKATOO_ACCELERATOR"] == "nvidia-tesla-a100"
    for step in ("prepare-data", "tokenize", "train-pod-gpus", "evaluate", "promote"):
        assert "accelerator" not in executors[f"exec-{step}"]["container"]["resources"], step


STEP_ARGS = dict(zip(steps.STEPS, (PrepareArgs, TokenizeArgs, TrainArgs, EvaluateArgs, PromoteArgs),
                     strict=True))
NOT_PASSED_ON = {"schedule_time",  # prepare's: only in KFP's cache key
                 "task_config"}  # train's: KFP's own, handed on as TrainArgs.placement


@pytest.mark.parametrize("step", steps.STEPS)
def test_every_run_parameter_of_a_component_reaches_its_step_as_a_field_of_the_steps_arguments(step):
    inputs = COMPONENTS[step].component_spec.inputs.items()
    parameters = {name for name, spec in inputs if type_utils.is_parameter_type(spec.type)} - NOT_PASSED_ON
    assert parameters <= {f.name for f in dataclasses.fields(STEP_ARGS[step])}


def test_step_arguments_take_a_components_run_parameters_by_name_and_its_paths_by_keyword():
    inputs = {"model_type": "minilm", "seed": 3, "nodes": 2, "tokenized": object(), "task_config": object()}
    args = TrainArgs.of(inputs, tokenized_dir="/in", output="/out", output_uri="gs://b/out")
    assert (args.model_type, args.seed, args.nodes, args.gpus) == ("minilm", 3, 2, 1)
    assert (args.tokenized_dir, args.output, args.output_uri) == ("/in", "/out", "gs://b/out")
    # The overrides' seed wins over the run's; base_model over the overrides'.
    args = TrainArgs(model_type="minilm", overrides={"seed": 9, "base_model": "a"}, base_model="b",
                     tokenized_dir="/in", output="/out", seed=3)
    assert args.settings() == {"seed": 9, "base_model": "b"}
    assert args.plan().seed == 9
    assert TrainArgs(model_type="minilm", tokenized_dir="/in", output="/out", seed=3).plan().seed == 3


def test_tokenized_data_reaches_train_and_evaluate_through_a_content_keyed_importer(tmp_path):
    _, tasks, executors, _ = _compiled(tmp_path)
    (importer,) = [n for n in tasks if n.startswith("importer")]
    uri = tasks[importer]["inputs"]["parameters"]["uri"]["taskOutputParameter"]
    assert uri == {"outputParameterKey": "cache_uri", "producerTask": "tokenize"}
    spec = executors[f"exec-{importer}"]["importer"]
    assert spec["typeSchema"]["schemaTitle"] == "system.Dataset"
    assert spec.get("reimport", False) is False  # the same URI hands out the same artifact
    for step in ("train", "evaluate"):
        source = tasks[step]["inputs"]["artifacts"]["tokenized"]["taskOutputArtifact"]
        assert source == {"outputArtifactKey": "artifact", "producerTask": importer}, step
    assert tasks["evaluate"]["inputs"]["artifacts"]["model"]["taskOutputArtifact"] == {
        "outputArtifactKey": "model", "producerTask": "train"}


@pytest.mark.parametrize("retries", [0, 3])
def test_train_alone_is_retried_with_backoff(retries, tmp_path):
    _, tasks, _, _ = _compiled(tmp_path, Cluster(retries=retries))
    for step in STEPS:
        policy = tasks[step].get("retryPolicy")
        if step == "train" and retries:
            assert policy == {"maxRetryCount": retries, "backoffDuration": "60s", "backoffFactor": 2.0,
                              "backoffMaxDuration": "3600s"}
        else:
            assert policy is None, step


def test_the_train_step_names_its_image_for_the_nodes_of_a_trainjob(tmp_path):
    cluster = Cluster(images=Images.of("europe-docker.pkg.dev/p/r", "1.2.3"))
    _, _, executors, _ = _compiled(tmp_path, cluster)
    env = {e["name"]: e["value"] for e in executors["exec-train"]["container"]["env"]}
    assert env["COCKATOO_TRAIN_IMAGE"] == cluster.images.cuda == executors["exec-train"]["container"]["image"]


def test_train_passes_its_pod_settings_through_to_a_trainjob_and_keeps_them(tmp_path):
    pipeline, _, _, _ = _compiled(tmp_path)
    for step in STEPS:
        passthroughs = pipeline["components"][f"comp-{step}"].get("taskConfigPassthroughs")
        if step == "train":  # applied to its own pod too: with nodes=1 it trains there
            assert {(p["field"], p["applyToTask"]) for p in passthroughs} == {
                ("RESOURCES", True), ("ENV", True), ("KUBERNETES_TOLERATIONS", True),
                ("KUBERNETES_NODE_SELECTOR", True)}
        else:
            assert passthroughs is None, step


def test_images_caching_and_resources_per_step(tmp_path):
    cluster = Cluster(images=Images.of("europe-docker.pkg.dev/p/r", "1.2.3"))
    _, tasks, executors, _ = _compiled(tmp_path, cluster)
    for step in STEPS:
        container = executors[f"exec-{step}"]["container"]
        kind = "cuda" if step == "train" else "cpu"
        assert container["image"] == f"europe-docker.pkg.dev/p/r/cockatoo-{kind}:1.2.3", step
        assert float(container["resources"]["cpuRequest"]) > 0 and container["resources"]["memoryRequest"] > 0
        # Prepare must read its sources afresh every run, and promote the registry's aliases as
        # they are now; the rest are keyed on their inputs.
        cached = step not in ("prepare-data", "promote")
        assert tasks[step]["cachingOptions"].get("enableCache", False) is cached, step


def test_one_image_for_every_step_for_a_run_in_containers(tmp_path):
    _, _, executors, _ = _compiled(tmp_path, Cluster(images=Images.single("cockatoo-cpu:dev")))
    assert {executors[f"exec-{step}"]["container"]["image"] for step in STEPS} == {"cockatoo-cpu:dev"}


@pytest.mark.parametrize("secret", ["cockatoo-hf-token", "team-hf"])
def test_placement_secret_scratch_and_shm(secret, tmp_path):
    toleration = {"key": "gpu", "operator": "Equal", "value": "true", "effect": "NoSchedule"}
    cluster = Cluster(node_selector={"pool": "gpu"}, hf_token_secret=secret, scratch_size="50Gi",
                      tolerations=[toleration])
    _, _, executors, k8s = _compiled(tmp_path, cluster)
    for step in STEPS:
        config = k8s[f"exec-{step}"]
        assert config["nodeSelector"]["labels"] == {"pool": "gpu"}, step
        assert config["tolerations"] == [toleration], step
        # Every step may download from the hub: the token reaches each as an env variable.
        env_secret, *others = config["secretAsEnv"]
        assert env_secret["secretName"] == secret and env_secret["optional"] is True, step
        assert env_secret["keyToEnv"] == [{"secretKey": "token", "envVar": "HF_TOKEN"}], step
        has_scratch = step in ("prepare-data", "tokenize")
        assert ("genericEphemeralVolume" in config) is has_scratch, step
        if has_scratch:
            assert config["genericEphemeralVolume"][0]["size"] == "50Gi"
            env = executors[f"exec-{step}"]["container"]["env"]
            assert {"name": "TMPDIR", "value": "/scratch"} in env
        # DataLoader workers share tensors through /dev/shm where they run.
        shm = [m for m in config.get("emptyDirMounts", []) if m["mountPath"] == "/dev/shm"]
        assert bool(shm) is (step in ("tokenize", "train")), step


def test_a_teams_ca_reaches_every_step_from_its_secret(tmp_path):
    _, _, _, k8s = _compiled(tmp_path, Cluster(ca_secret="team-ca"))
    for step in STEPS:  # the train step's environment reaches a TrainJob's nodes too
        (ca,) = [s for s in k8s[f"exec-{step}"]["secretAsEnv"] if s["secretName"] == "team-ca"]
        assert ca["keyToEnv"] == [{"secretKey": "ca.crt", "envVar": "COCKATOO_EXTRA_CA_PEM"}], step
    _, _, _, k8s = _compiled(tmp_path / "none", Cluster())
    assert not any(s["secretName"] == "team-ca" for step in STEPS for s in k8s[f"exec-{step}"]["secretAsEnv"])


def test_the_cache_root_and_registry_options_are_the_parameters_defaults(tmp_path):
    pipeline, tasks, _, _ = _compiled(tmp_path, Cluster(cache_root="gs://bucket/cache",
                                                        registry_uri="http://mlflow.mlflow:5000"))
    assert pipeline["root"]["inputDefinitions"]["parameters"]["registry_uri"]["defaultValue"] == \
        "http://mlflow.mlflow:5000"
    assert pipeline["root"]["inputDefinitions"]["parameters"]["tokenized_cache_root"]["defaultValue"] == \
        "gs://bucket/cache"
    assert _inputs(tasks["tokenize"])["cache_root"] == "tokenized_cache_root"


def test_promote_takes_the_runs_data_model_and_evaluation_and_the_mlflow_secret(tmp_path):
    _, tasks, _, k8s = _compiled(tmp_path, Cluster(mlflow_secret="team-mlflow", registry_uri="http://m:5000"))
    artifacts = tasks["promote"]["inputs"]["artifacts"]
    assert {name: (a["taskOutputArtifact"]["producerTask"], a["taskOutputArtifact"]["outputArtifactKey"])
            for name, a in artifacts.items()} == {
        "data": ("prepare-data", "data"), "model": ("train", "model"),
        "evaluation": ("evaluate", "evaluation")}
    assert _inputs(tasks["promote"])["run_id"] == "constant:{{$.pipeline_job_uuid}}"
    (mlflow,) = [s for s in k8s["exec-promote"]["secretAsEnv"] if s["secretName"] == "team-mlflow"]
    assert mlflow["optional"] is True
    assert {e["envVar"] for e in mlflow["keyToEnv"]} == {
        "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"}
    for step in STEPS[:-1]:  # credentials reach the step that needs them, no other
        assert all(s["secretName"] != "team-mlflow" for s in k8s[f"exec-{step}"]["secretAsEnv"]), step


def test_every_step_of_the_one_list_is_a_component_with_resources_and_a_task(tmp_path):
    assert list(COMPONENTS) == list(steps.STEPS)
    # and the cockatoo-score pipeline's steps (tests/test_score_pipeline.py)
    assert set(RESOURCES) == {*steps.STEPS, "train-pod-gpus", "plan-scoring", "score-shard", "finish-scoring"}
    _, tasks, _, _ = _compiled(tmp_path)
    assert set(STEPS) <= set(tasks)
    shown = [tasks[component.name]["taskInfo"]["name"] for component in COMPONENTS.values()]
    assert shown == list(steps.STEPS)  # the KFP UI shows each task by its step's name


def test_the_pipeline_is_built_on_a_shallow_stack_whatever_the_callers_depth(monkeypatch):
    """KFP's task setters call inspect.stack(), whose cost grows with the frames below it: a
    build from deep in a test or a notebook took seconds. The build runs on a stack of its own."""
    import inspect

    from kfp.dsl import pipeline_task

    from pipelines.cockatoo_train import build_pipeline

    depths = []
    original = inspect.stack

    def counting_stack(*args, **kwargs):
        frames = original(*args, **kwargs)
        depths.append(len(frames))
        return frames

    monkeypatch.setattr(pipeline_task.inspect, "stack", counting_stack)

    def deep(n):
        return deep(n - 1) if n else build_pipeline(Cluster())

    deep(200)
    assert depths and max(depths) < 50
