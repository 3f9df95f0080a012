"""Multi-node training through Kubeflow Trainer: the train step with nodes > 1 creates a
TrainJob with the `kubeflow` SDK against a loopback stand-in for the Kubernetes API, whose
"nodes" are real local processes running the job's own command (torchrun, static rendezvous,
gloo), and hands on the model they publish in a bucket (the GCS emulator)."""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest
from kfp import dsl
from kubeflow_trainer_api import models

from cockatoo_lib.errors import CockatooError
from cockatoo_lib.plan.catalogue import resolve_plan
from cockatoo_lib.tokenize import tokenize
from cockatoo_lib.training.model_folder import read_model_manifest
from cockatoo_lib.training.trainjob import remove_stale_models
from components import train
from tests.fake_k8s import FakeKubernetes
from tests.helpers import free_port, without_coverage

# Trains, runs pipelines or starts servers: `make test` runs these, `make test-fast` not.
pytestmark = pytest.mark.slow

FAST = {"num_epochs": 1, "batch_size": 16, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
        "dataloader_num_workers": 0}
IMAGE = "registry.example/cockatoo-cuda:1.2.3"


def play_nodes(body: dict, tmp_path) -> tuple[str, str, str]:
    """Run the TrainJob's command as its nodes would: one process per node, torchrun's node
    count, rank and rendezvous in the PET_* variables the torch-distributed runtime sets."""
    trainer = body["spec"]["trainer"]
    nodes, port = trainer["numNodes"], free_port()
    processes = []
    for rank in range(nodes):
        scratch = tmp_path / f"node-{rank}"
        scratch.mkdir()
        # Without coverage: the two-process run of tests/test_distributed measures the same
        # training code; here the processes only play the job.
        env = {**without_coverage(), "PET_NNODES": str(nodes), "PET_NPROC_PER_NODE": "1",
               "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(port),
               "TMPDIR": str(scratch),
               **{e["name"]: e["value"] for e in trainer.get("env") or []}}
        command = [sys.executable if trainer["command"][0] == "python" else trainer["command"][0],
                   *trainer["command"][1:]]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
    logs = [p.communicate(timeout=300)[0] for p in processes]
    failed = [rank for rank, p in enumerate(processes) if p.returncode]
    if failed:
        return "Failed", f"node-{failed[0]} exited with code {processes[failed[0]].returncode}", logs[0]
    return "Complete", "", logs[0]


@pytest.fixture
def tokenized_in_bucket(tiny_models, small_data, tmp_path, gcs):
    base = str(tiny_models["deberta"])
    tokenize(small_data, resolve_plan("deberta", {**FAST, "base_model": base}), tmp_path / "tok",
             cache_root=str(tmp_path / "cache"))
    gcs.put(str(tmp_path / "tok") + "/", f"cockatoo-data/{tmp_path.name}/tok/", recursive=True)
    return f"gs://cockatoo-data/{tmp_path.name}/tok", base


# What KFP hands the step on a cluster: its own pod's settings (a spot placement here).
SPOT = {"tolerations": [{"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
                         "effect": "NoSchedule"}],
        "node_selector": {"cloud.google.com/gke-spot": "true"},
        "env": [{"name": "HF_TOKEN",
                 "valueFrom": {"secretKeyRef": {"name": "cockatoo-hf-token", "key": "token"}}}],
        "resources": {"requests": {"cpu": "8", "memory": "48G"}, "limits": {"nvidia.com/gpu": "1"}}}


def _train_step(tokenized_uri, base, model_dir, root, nodes=2, task_config=None):
    model = dsl.Model(uri=str(model_dir))
    train.python_func(tokenized=dsl.Dataset(uri=tokenized_uri), model_type="deberta", overrides=FAST,
                      base_model=base, seed=3, gpus=1, checkpoint_root=root, nodes=nodes,
                      task_config=task_config or dsl.TaskConfig(), model=model)
    return model


def test_nodes_above_one_train_through_a_trainjob_and_hand_on_its_model(tokenized_in_bucket, tmp_path,
                                                                        monkeypatch, capsys, gcs):
    tokenized_uri, base = tokenized_in_bucket
    root = f"gs://cockatoo-data/{tmp_path.name}/checkpoints"
    with FakeKubernetes(lambda body: play_nodes(body, tmp_path)) as k8s:
        monkeypatch.setenv("KUBECONFIG", str(k8s.kubeconfig(tmp_path)))
        monkeypatch.setenv("COCKATOO_TRAIN_IMAGE", IMAGE)
        monkeypatch.setenv("COCKATOO_ACCELERATOR", "amd.com/gpu")
        model = _train_step(tokenized_uri, base, tmp_path / "model", root, task_config=dsl.TaskConfig(**SPOT))
        first = read_model_manifest(model.path)
        # KFP retries the step after it returned, before its output was uploaded (a new pod, an
        # empty output folder): the retry follows the job that completed and takes its model.
        shutil.rmtree(model.path)
        _train_step(tokenized_uri, base, tmp_path / "model", root, task_config=dsl.TaskConfig(**SPOT))
    (body,) = k8s.created
    assert read_model_manifest(model.path) == first
    # The body is a TrainJob as the SDK's own models define it.
    job = models.TrainerV1alpha1TrainJob.from_dict(body)
    assert job.spec.runtime_ref.name == "torch-distributed"
    assert job.spec.trainer.num_nodes == 2 and job.spec.trainer.image == IMAGE
    # The step's accelerator type, its CPU and memory as requests (the step sets no limits for them).
    resources = job.spec.trainer.resources_per_node
    assert {k: v.actual_instance for k, v in resources.limits.items()} == {"amd.com/gpu": "1"}
    assert {k: v.actual_instance for k, v in resources.requests.items()} == {"cpu": "8", "memory": "48G",
                                                                             "amd.com/gpu": "1"}
    # A job nobody waits for ends: its deadline from the plan (309 rows, 1 epoch, 2 GPUs: the floor).
    assert job.spec.active_deadline_seconds == 2 * 3600
    assert job.spec.trainer.command[:6] == ["python", "-m", "torch.distributed.run", "-m", "cockatoo_lib.cli",
                                            "train"]
    assert job.metadata.name.startswith("cockatoo-") and job.metadata.name.endswith("-0")
    # The step's placement reaches every node: spot tolerations and selector, the secret as a reference.
    (patch,) = body["spec"]["runtimePatches"]
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert node["name"] == "node" and pod["tolerations"] == SPOT["tolerations"]
    assert pod["nodeSelector"] == SPOT["node_selector"] and pod["containers"][0]["env"] == SPOT["env"]
    # Two nodes trained one model, together; node 0's log reached the step's.
    manifest = read_model_manifest(model.path)
    assert manifest["processes"] == 2 and manifest["plan"]["seed"] == 3
    assert model.metadata["model_type"] == "deberta"
    assert "training in 2 processes (gloo backend)" in capsys.readouterr().out
    # The nodes removed their checkpoints once the model was published; the model stays for a retry
    # until a week on, when a later multi-node step removes it.
    assert not gcs.find(f"cockatoo-data/{tmp_path.name}/checkpoints/checkpoints")
    (published,) = remove_stale_models(root, older_than_s=-1)
    assert published.startswith(f"gs://cockatoo-data/{tmp_path.name}/checkpoints/models/cockatoo-")
    assert not gcs.find(f"cockatoo-data/{tmp_path.name}/checkpoints")


def test_a_failed_trainjob_fails_the_step_with_its_error_and_a_retry_starts_another(tokenized_in_bucket,
                                                                                    tmp_path, monkeypatch):
    tokenized_uri, base = tokenized_in_bucket
    message = "node-1 exited with code 137: OOMKilled"
    with FakeKubernetes(lambda body: ("Failed", message, "Traceback ...\n")) as k8s:
        monkeypatch.setenv("KUBECONFIG", str(k8s.kubeconfig(tmp_path)))
        monkeypatch.setenv("COCKATOO_TRAIN_IMAGE", IMAGE)
        for attempt in range(2):
            with pytest.raises(CockatooError, match=rf"TrainJob cockatoo-\w+-{attempt} failed: JobSetFailed: "
                                                    f"{message}"):
                _train_step(tokenized_uri, base, tmp_path / "model", f"gs://cockatoo-data/{tmp_path.name}/ck")
        assert [b["metadata"]["name"][-2:] for b in k8s.created] == ["-0", "-1"] and not k8s.deleted
        for job in k8s.jobs.values():  # days later: the next multi-node step deletes them first
            job["status"]["conditions"][0]["lastTransitionTime"] = "2026-01-01T00:00:00Z"
        with pytest.raises(CockatooError, match=r"TrainJob cockatoo-\w+-0 failed"):
            _train_step(tokenized_uri, base, tmp_path / "model", f"gs://cockatoo-data/{tmp_path.name}/ck")
    assert [name[-2:] for name in k8s.deleted] == ["-0", "-1"]
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("root, tokenized, image, message", [
    ("", "gs://b/tok", IMAGE, "nodes=2 needs checkpoint_root in a bucket the nodes share"),
    ("gs://b/ck", "/local/tok", IMAGE, "nodes=2 needs the tokenized data in a bucket"),
    ("gs://b/ck", "gs://b/tok", "", "COCKATOO_TRAIN_IMAGE (the image the nodes run) is not set"),
])
def test_nodes_above_one_need_shared_storage_and_the_image(root, tokenized, image, message, tmp_path,
                                                           monkeypatch):
    monkeypatch.setenv("COCKATOO_TRAIN_IMAGE", image)
    with pytest.raises(CockatooError, match=re.escape(message)):
        _train_step(tokenized, "", tmp_path / "model", root)


def test_a_stopped_step_deletes_the_trainjob_it_waits_for(tokenized_in_bucket, tmp_path, monkeypatch):
    """A terminated KFP run stops its pods with SIGTERM: the job's nodes must not train on for nobody."""
    tokenized_uri, base = tokenized_in_bucket
    with FakeKubernetes(lambda body: ("Running", "", "training...\n")) as k8s:
        monkeypatch.setenv("KUBECONFIG", str(k8s.kubeconfig(tmp_path)))
        monkeypatch.setenv("COCKATOO_TRAIN_IMAGE", IMAGE)
        threading.Timer(3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        with pytest.raises(CockatooError, match=r"stopped \(SIGTERM\); TrainJob cockatoo-\w+-0 deleted"):
            _train_step(tokenized_uri, base, tmp_path / "model", f"gs://cockatoo-data/{tmp_path.name}/ck")
    assert [b["metadata"]["name"] for b in k8s.created] == k8s.deleted
    assert signal.getsignal(signal.SIGTERM) is not None and not (tmp_path / "model").exists()


def test_a_trainjobs_deadline_grows_with_its_work_between_two_hours_and_a_week():
    from cockatoo_lib.training.trainjob import deadline_s

    assert deadline_s(1_000, 3, 8) == 2 * 3600
    assert deadline_s(200_000, 3, 16) == 75_000  # 21 hours
    assert deadline_s(2_000_000, 3, 16) == 7 * 24 * 3600  # 8.7 days: capped at a week
    assert deadline_s(10**9, 3, 1) == 7 * 24 * 3600


def test_finished_trainjobs_are_deleted_a_day_on_and_running_ones_stay(tmp_path, monkeypatch, capsys):
    """Kubeflow Trainer's TrainJob has no TTL: each multi-node step, and `cockatoo prune-trainjobs`,
    deletes the project's jobs that finished long enough ago."""
    import time

    from cockatoo_lib.training.trainjob import JobRequest, create, remove_finished_jobs, trainer_client
    from tests.helpers import error_line, run_cli

    ends = iter([("Complete", "", ""), ("Failed", "OOMKilled", ""), ("Running", "", ""),
                 ("Complete", "", "")])
    with FakeKubernetes(lambda body: next(ends)) as k8s:
        monkeypatch.setenv("KUBECONFIG", str(k8s.kubeconfig(tmp_path)))
        client = trainer_client()
        for name in ("cockatoo-a-0", "cockatoo-b-0", "cockatoo-c-0"):
            create(client, JobRequest(image=IMAGE, nodes=2, gpus_per_node=1, command=["true"]), name)
        k8s.jobs["someone-elses"] = {**k8s.jobs["cockatoo-a-0"], "metadata": {"name": "someone-elses"}}
        assert remove_finished_jobs(client) == []  # they finished just now
        day_on = time.time() + 25 * 3600
        assert remove_finished_jobs(client, now=day_on) == ["cockatoo-a-0", "cockatoo-b-0"]
        assert sorted(k8s.jobs) == ["cockatoo-c-0", "someone-elses"]  # running; not the project's
        create(client, JobRequest(image=IMAGE, nodes=2, gpus_per_node=1, command=["true"]), "cockatoo-d-0")
        code, out, err = run_cli(["prune-trainjobs", "--older-than-hours", "0"], capsys, monkeypatch)
        assert code == 0 and out.strip() == "deleted 1 finished TrainJob(s): cockatoo-d-0", err
    code, _, err = run_cli(["prune-trainjobs"], capsys, monkeypatch)  # the fake cluster is gone
    assert code == 2 and error_line(err).startswith("error: cannot list the TrainJobs of namespace default")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    code, _, err = run_cli(["prune-trainjobs"], capsys, monkeypatch)
    assert code == 2 and error_line(err).startswith("error: no Kubernetes cluster to reach for TrainJobs")
