"""Multi-node training on Vertex AI: the train step with nodes > 1, compiled for Vertex, creates a
custom job against a loopback stand-in for Vertex's REST API (bodies checked with the API's own
message types), whose replicas are real local processes started with Vertex's CLUSTER_SPEC, and
hands on the model they publish in a bucket (the GCS emulator)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest
from kfp import dsl

from cockatoo_lib.errors import CockatooError
from cockatoo_lib.training import vertex_job
from cockatoo_lib.training.model_folder import read_model_manifest
from components import train
from tests.fake_vertex import FakeVertex
from tests.helpers import free_port, without_coverage
from tests.test_trainjob import FAST, tokenized_in_bucket  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow

IMAGE = "europe-docker.pkg.dev/p/cockatoo/cockatoo-cuda:1.2.3"


def play_replicas(body: dict, tmp_path) -> tuple[str, str]:
    """Run the job's replicas as Vertex would: every pool's replicas, each with CLUSTER_SPEC naming
    the cluster and its own task, and the container's environment."""
    pools = body["jobSpec"]["workerPoolSpecs"]
    port = free_port()
    hosts = {f"workerpool{i}": [f"127.0.0.1:{port}"] * pool["replicaCount"] for i, pool in enumerate(pools)}
    processes = []
    for i, pool in enumerate(pools):
        container = pool["containerSpec"]
        for index in range(pool["replicaCount"]):
            scratch = tmp_path / f"replica-{i}-{index}"
            scratch.mkdir()
            spec = {"cluster": hosts, "environment": "cloud",
                    "task": {"type": f"workerpool{i}", "index": index}}
            env = {**without_coverage(), "CLUSTER_SPEC": json.dumps(spec), "TMPDIR": str(scratch),
                   **{e["name"]: e["value"] for e in container.get("env", [])}}
            command = [sys.executable if container["command"][0] == "python" else container["command"][0],
                       *container["command"][1:]]
            processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                              stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in processes]
    failed = [i for i, p in enumerate(processes) if p.returncode]
    if failed:
        first = failed[0]
        return "JOB_STATE_FAILED", f"replica {first}: {logs[first][-300:]}"
    return "JOB_STATE_SUCCEEDED", ""


@pytest.fixture
def on_vertex(monkeypatch):
    """The train step's environment as `cockatoo compile --target vertex` sets it and Vertex
    resolves it."""
    import google.auth
    from google.auth.credentials import AnonymousCredentials

    monkeypatch.setattr(google.auth, "default", lambda *a, **k: (AnonymousCredentials(), "my-project"))
    for variable, value in {"COCKATOO_NODES_ON": "vertex", "COCKATOO_TRAIN_IMAGE": IMAGE,
                            "COCKATOO_ACCELERATOR": "NVIDIA_L4", vertex_job.PROJECT_ENV: "my-project",
                            vertex_job.LOCATION_ENV: "europe-west4",
                            vertex_job.SERVICE_ACCOUNT_ENV: "trainer@my-project.iam.gserviceaccount.com",
                            "COCKATOO_SECRETS": "HF_TOKEN=cockatoo-hf-token"}.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.setenv("HF_TOKEN", "set")  # the step's own secret, read already: the replicas read theirs


def _tokenized_info_only(gcs, tmp_path) -> str:
    """Tokenized data as far as the step reads it before a job starts: its row counts."""
    info = json.dumps({"rows": {"train": 100}}).encode()
    gcs.pipe(f"cockatoo-data/{tmp_path.name}/tok/tokenized.json", info)
    return f"gs://cockatoo-data/{tmp_path.name}/tok"


def _train_step(tokenized_uri, base, model_dir, root, nodes=2):
    model = dsl.Model(uri=str(model_dir))
    train.python_func(tokenized=dsl.Dataset(uri=tokenized_uri), model_type="deberta", overrides=FAST,
                      base_model=base, seed=3, gpus=1, checkpoint_root=root, nodes=nodes,
                      task_config=dsl.TaskConfig(), model=model)
    return model


def test_nodes_above_one_train_through_a_vertex_custom_job_and_hand_on_its_model(
        tokenized_in_bucket, tmp_path, monkeypatch, on_vertex, caplog):  # noqa: F811
    from google.cloud.aiplatform_v1.types import CustomJob

    tokenized_uri, base = tokenized_in_bucket
    root = f"gs://cockatoo-data/{tmp_path.name}/checkpoints"
    caplog.set_level("INFO", logger="cockatoo_lib.training.trainjob")
    with FakeVertex(lambda body: play_replicas(body, tmp_path)) as vertex:
        monkeypatch.setenv(vertex_job.API_ENV, vertex.url)
        monkeypatch.setattr(vertex_job, "POLL_S", 0.2)
        model = _train_step(tokenized_uri, base, tmp_path / "model", root)
        first = read_model_manifest(model.path)
        # A retry of the step (a new pod, its output not uploaded) follows the job that succeeded.
        shutil.rmtree(model.path)
        _train_step(tokenized_uri, base, tmp_path / "model", root)
    (body,) = vertex.created
    assert read_model_manifest(model.path) == first
    job = CustomJob.from_json(json.dumps(body))  # the API's own message, as the fake checked it
    primary, workers = job.job_spec.worker_pool_specs
    assert (primary.replica_count, workers.replica_count) == (1, 1)
    for pool in (primary, workers):
        assert pool.machine_spec.machine_type == "g2-standard-16"
        assert pool.machine_spec.accelerator_type.name == "NVIDIA_L4"
        assert pool.machine_spec.accelerator_count == 1
        assert pool.container_spec.image_uri == IMAGE
        assert list(pool.container_spec.command[:4]) == ["python", "-m", "cockatoo_lib.training.vertex_job",
                                                         "python"]
        # Secrets by name only: each replica reads them from Secret Manager.
        assert {e.name: e.value for e in pool.container_spec.env} == {
            "PET_NPROC_PER_NODE": "1", "COCKATOO_SECRETS": "HF_TOKEN=cockatoo-hf-token"}
    assert job.job_spec.service_account == "trainer@my-project.iam.gserviceaccount.com"
    assert job.job_spec.scheduling.timeout.total_seconds() == 2 * 3600  # the plan's deadline: the floor
    assert not job.job_spec.scheduling.restart_job_on_worker_restart
    assert job.display_name.startswith("cockatoo-") and job.display_name.endswith("-0")
    assert job.labels["cockatoo_step"] == job.display_name.removeprefix("cockatoo-")[:-2]
    # The two replicas trained one model together.
    manifest = read_model_manifest(model.path)
    assert manifest["processes"] == 2 and manifest["plan"]["seed"] == 3
    assert "exists, started by an earlier try of this step: following it" in caplog.text


def test_a_failed_custom_job_fails_the_step_with_its_error_and_a_retry_starts_another(tmp_path, monkeypatch,
                                                                                      on_vertex, gcs):
    tokenized = _tokenized_info_only(gcs, tmp_path)
    message = "The replica workerpool1-0 exited with a non-zero status of 137."
    with FakeVertex(lambda body: ("JOB_STATE_FAILED", message)) as vertex:
        monkeypatch.setenv(vertex_job.API_ENV, vertex.url)
        monkeypatch.setattr(vertex_job, "POLL_S", 0.05)
        for attempt in range(2):
            job = rf"cockatoo-\w+-{attempt} \(projects/my-project/locations/europe-west4/customJobs/\d+\)"
            with pytest.raises(CockatooError, match=rf"Vertex AI custom job {job} ended JOB_STATE_FAILED: "
                                                    + re.escape(message)):
                _train_step(tokenized, "", tmp_path / "model", f"gs://cockatoo-data/{tmp_path.name}/ck")
    assert [b["displayName"][-2:] for b in vertex.created] == ["-0", "-1"] and not vertex.cancelled
    assert not (tmp_path / "model").exists()


def test_a_stopped_step_cancels_the_custom_job_it_waits_for(tmp_path, monkeypatch, on_vertex, gcs):
    tokenized = _tokenized_info_only(gcs, tmp_path)
    with FakeVertex(lambda body: (None, "")) as vertex:
        monkeypatch.setenv(vertex_job.API_ENV, vertex.url)
        monkeypatch.setattr(vertex_job, "POLL_S", 0.05)
        threading.Timer(2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        with pytest.raises(CockatooError, match=r"stopped \(SIGTERM\); Vertex AI custom job cockatoo-\w+-0 "
                                                r"cancelled with it"):
            _train_step(tokenized, "", tmp_path / "model", f"gs://cockatoo-data/{tmp_path.name}/ck")
    assert vertex.cancelled == [next(iter(vertex.jobs))]


def test_a_request_the_api_refuses_is_one_line_with_its_message(tmp_path, monkeypatch, on_vertex, gcs):
    """The stand-in parses bodies with the API's message type: a body it cannot parse is refused."""
    tokenized = _tokenized_info_only(gcs, tmp_path)
    real = vertex_job.job_body
    monkeypatch.setattr(vertex_job, "job_body", lambda *a, **k: {**real(*a, **k), "replicas": 2})
    with FakeVertex(lambda body: ("JOB_STATE_SUCCEEDED", "")) as vertex:
        monkeypatch.setenv(vertex_job.API_ENV, vertex.url)
        with pytest.raises(CockatooError, match=r"Vertex AI refused to create custom job cockatoo-\w+-0: 400 "
                                                r"Invalid JSON payload.*replicas"):
            _train_step(tokenized, "", tmp_path / "model", f"gs://cockatoo-data/{tmp_path.name}/ck")
    assert not vertex.created


def test_each_replica_finds_its_rank_and_the_primary_in_the_cluster_spec():
    spec = {"cluster": {"workerpool0": ["cmle-training-workerpool0-ab-0:2222"],
                        "workerpool1": ["cmle-training-workerpool1-ab-0:2222",
                                        "cmle-training-workerpool1-ab-1:2222"]},
            "environment": "cloud", "task": {"type": "workerpool1", "index": 1}}
    assert vertex_job.rendezvous(json.dumps(spec)) == {
        "PET_NNODES": "3", "PET_NODE_RANK": "2", "PET_MASTER_ADDR": "cmle-training-workerpool0-ab-0",
        "PET_MASTER_PORT": "2222"}
    spec["task"] = {"type": "workerpool0", "index": 0}
    assert vertex_job.rendezvous(json.dumps(spec))["PET_NODE_RANK"] == "0"
    # A replica without Vertex's cluster spec: one line, exit 2, nothing started.
    no_pools = {"cluster": {}, "task": {"type": "workerpool0", "index": 0}}
    env = {**without_coverage(), "CLUSTER_SPEC": json.dumps(no_pools)}
    done = subprocess.run([sys.executable, "-m", "cockatoo_lib.training.vertex_job", "true"], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("error: CLUSTER_SPEC is not Vertex AI's cluster spec "
                                  "(KeyError: 'workerpool0')")


def test_the_nodes_machine_is_the_option_or_the_table_and_else_one_line(monkeypatch):
    assert vertex_job.machine_type("NVIDIA_H100_80GB", 8) == "a3-highgpu-8g"
    with pytest.raises(CockatooError, match=r"no Vertex AI machine type known for 3 x NVIDIA_L4 per node; "
                                            r"compile with --machine-type"):
        vertex_job.machine_type("NVIDIA_L4", 3)
    monkeypatch.setenv(vertex_job.MACHINE_TYPE_ENV, "n1-highmem-16")
    assert vertex_job.machine_type("NVIDIA_TESLA_T4", 2) == "n1-highmem-16"


def test_a_step_without_the_runs_project_and_region_says_so(monkeypatch, on_vertex):
    # Placeholders Vertex left unresolved count as unset, as do the variables it sets in containers.
    monkeypatch.setenv(vertex_job.LOCATION_ENV, "{{$.pipeline_google_cloud_location}}")
    monkeypatch.delenv("CLOUD_ML_REGION", raising=False)
    with pytest.raises(CockatooError, match=r"needs the run's project and region: COCKATOO_VERTEX_PROJECT "
                                            r"and COCKATOO_VERTEX_LOCATION \(or CLOUD_ML_PROJECT_ID and "
                                            r"CLOUD_ML_REGION\)"):
        vertex_job.CustomJobs("cockatoo-abc", "g2-standard-16")
    monkeypatch.setenv("CLOUD_ML_REGION", "us-central1")
    with FakeVertex(lambda body: (None, "")) as vertex:
        monkeypatch.setenv(vertex_job.API_ENV, vertex.url)
        assert vertex_job.CustomJobs("cockatoo-abc", "g2-standard-16").parent == \
            "projects/my-project/locations/us-central1"
