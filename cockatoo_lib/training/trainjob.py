"""Training on several nodes: the train step hands the work to Kubeflow Trainer. It creates a
TrainJob (the `torch-distributed` runtime) through the `kubeflow` SDK, whose every node runs
`cockatoo train` under torchrun (the runtime sets torchrun's node count, rank and rendezvous
in PET_* variables), streams node 0's log into the step's, waits, and fails with the job's own
error. The nodes share no disk: they read the tokenized data from its bucket URI, checkpoint
under the checkpoint root, and process 0 publishes the model there, from where the step takes
it (cockatoo_lib.storage.publish verifies it on the way).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shlex
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cockatoo_lib.errors import CockatooError, first_line

log = logging.getLogger(__name__)

RUNTIME = "torch-distributed"
# The image every node runs: the train step's own, set on the step by the pipeline.
IMAGE_ENV = "COCKATOO_TRAIN_IMAGE"
# The accelerator type the pipeline gives the train step (its resource name), for the nodes.
ACCELERATOR_ENV = "COCKATOO_ACCELERATOR"
# Where the nodes run: "vertex" (a Vertex AI custom job, cockatoo_lib.training.vertex_job), set on the
# train step by `cockatoo compile --target vertex`; else Kubeflow Trainer on the step's cluster.
NODES_ON_ENV = "COCKATOO_NODES_ON"
# A week: the step's own timeout (KFP's) is the one to set for a shorter bound.
WAIT_S = 7 * 24 * 3600
# A job whose step died without SIGTERM (OOM kill, node loss) and is not retried trains on with
# nobody waiting: its deadline comes from the plan, at a rate below any card's (a row a second
# per GPU; ModernBERT-large at 512 tokens on a T4 does several), at least two hours (image pulls,
# scheduling), at most WAIT_S.
SLOWEST_ROWS_PER_GPU_S = 1.0
MIN_DEADLINE_S = 2 * 3600


def deadline_s(train_rows: int, epochs: float, gpus: int) -> int:
    """How long a TrainJob may run: every epoch's rows at the slowest rate, twice over."""
    seconds = 2 * epochs * train_rows / (SLOWEST_ROWS_PER_GPU_S * max(gpus, 1))
    return int(min(WAIT_S, max(MIN_DEADLINE_S, seconds)))
PATCH_MANAGER = "cockatoo.dev/train-step"
STALE_MODEL_S = 7 * 24 * 3600
PART_OF = {"app.kubernetes.io/part-of": "cockatoo"}  # the label of every TrainJob the step creates
# Kubeflow Trainer's v1alpha1 TrainJob has no TTL after it finishes: a finished job (and its
# JobSet's pods) stays until deleted. Each multi-node train step deletes those of the project that
# finished this long ago (a retry of their step would have come by then); `cockatoo
# prune-trainjobs` does the same by hand.
FINISHED_JOB_KEEP_S = 24 * 3600


@dataclass(frozen=True)
class JobRequest:
    image: str
    nodes: int
    gpus_per_node: int
    command: list[str]
    accelerator: str = "nvidia.com/gpu"  # the resource name of the step's accelerator type
    deadline_s: int = WAIT_S  # activeDeadlineSeconds: deadline_s() of the plan
    # The train step's own pod settings, as KFP's TaskConfig passes them through (Kubernetes
    # JSON): each node gets the step's CPU and memory requests, its environment (secrets stay
    # references), tolerations and node selector, so a spot placement reaches the nodes too.
    placement: dict = field(default_factory=dict)


def train_command(argv: list[str]) -> list[str]:
    """What every node runs: torchrun, with its node count, rank and rendezvous from the
    runtime's PET_* variables, starting one `cockatoo <argv>` per GPU."""
    return ["python", "-m", "torch.distributed.run", "-m", "cockatoo_lib.cli", *argv]


def job_base_name(output_uri: str) -> str:
    """Names the step's jobs: from the step's output URI, which a KFP retry of the step keeps,
    so that a retry finds the job its earlier try started instead of training twice at once."""
    return "cockatoo-" + hashlib.sha256(output_uri.encode()).hexdigest()[:12]


def model_uri(checkpoint_root: str, name: str) -> str:
    """Where a job publishes its model: a folder of its own under the checkpoint root."""
    return f"{checkpoint_root.rstrip('/')}/models/{name}"


def remove_stale_models(checkpoint_root: str, older_than_s: float = STALE_MODEL_S) -> list[str]:
    """Unpublish the models TrainJobs published under the checkpoint root more than a week ago: the
    steps that waited for them have long since handed them on."""
    from cockatoo_lib.storage import remote
    from cockatoo_lib.storage.publish import generations, published_at, read_generation, remove_generation

    fs, root = remote.url_to_fs(model_uri(checkpoint_root, ""))
    try:
        folders = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    removed, now = [], time.time()
    for folder in folders:
        for generation in generations(fs, folder):
            entry, _ = read_generation(fs, folder, generation)
            if entry is not None and now - published_at(entry) > older_than_s:
                remove_generation(fs, folder, generation)
                removed.append(entry.uri)
                log.info("removed %s, a TrainJob's model published over %d days ago", entry.uri,
                         older_than_s // 86400)
    return removed


def remove_finished_jobs(client, older_than_s: float = FINISHED_JOB_KEEP_S, now: float | None = None
                         ) -> list[str]:
    """Delete the project's TrainJobs that completed or failed more than `older_than_s` ago (by
    their condition's time); the names deleted. Running jobs stay: their deadline ends them."""
    from datetime import datetime

    from kubeflow.trainer.constants import constants

    backend = client.backend
    selector = ",".join(f"{k}={v}" for k, v in PART_OF.items())
    try:
        found = backend.custom_api.list_namespaced_custom_object(
            constants.GROUP, constants.VERSION, backend.namespace, constants.TRAINJOB_PLURAL,
            label_selector=selector)
    except Exception as exc:  # noqa: BLE001 - the kubernetes client raises many kinds
        raise CockatooError(f"cannot list the TrainJobs of namespace {backend.namespace}: "
                            f"{first_line(exc, 'reason')}") from None
    now = time.time() if now is None else now
    removed = []
    for job in found.get("items", []):
        ended = [c.get("lastTransitionTime") for c in job.get("status", {}).get("conditions", [])
                 if c.get("type") in (constants.TRAINJOB_COMPLETE, constants.TRAINJOB_FAILED)
                 and c.get("status") == "True"]
        if not ended or not ended[0]:
            continue
        age = now - datetime.fromisoformat(ended[0].replace("Z", "+00:00")).timestamp()
        if age >= older_than_s:
            client.delete_job(job["metadata"]["name"])
            removed.append(job["metadata"]["name"])
    if removed:
        log.info("removed %d TrainJob(s) that finished over %.0f h ago: %s", len(removed),
                 older_than_s / 3600, ", ".join(removed))
    return removed


def trainer_client(namespace: str | None = None):
    """A TrainerClient for the cluster this runs in (in-cluster config in a pod; the kube
    config elsewhere, KUBECONFIG if set), in `namespace` or the config's."""
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient

    try:
        return TrainerClient(KubernetesBackendConfig(config_file=os.environ.get("KUBECONFIG") or None,
                                                     namespace=namespace))
    except Exception as exc:  # noqa: BLE001 - kube config and client errors of many kinds
        raise CockatooError(f"no Kubernetes cluster to reach for TrainJobs (kube config "
                            f"{os.environ.get('KUBECONFIG') or '~/.kube/config'}, or in-cluster): "
                            f"{first_line(exc, 'reason')}") from None


def _node_patch(placement: dict) -> dict | None:
    """The step's environment, tolerations and node selector on every node's pod: a runtime
    patch (.spec.runtimePatches) as Kubeflow Trainer's API defines it."""
    env, tolerations = placement.get("env"), placement.get("tolerations")
    selector = placement.get("node_selector")
    if not (env or tolerations or selector):
        return None
    pod = {k: v for k, v in (("containers", [{"name": "node", "env": env}] if env else None),
                             ("tolerations", tolerations or None), ("nodeSelector", selector or None)) if v}
    node = {"name": "node", "template": {"spec": {"template": {"spec": pod}}}}
    return {"manager": PATCH_MANAGER,
            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [node]}}}}


def node_resources(request: JobRequest) -> dict:
    """Each node's resources: its GPUs of the step's accelerator type, and the step's CPU and memory
    as requests (room to burst, as the step's own pod has), limits only where the step sets them."""
    resources = request.placement.get("resources") or {}
    requests = {k: v for k, v in (resources.get("requests") or {}).items() if k in ("cpu", "memory")}
    limits = {k: v for k, v in (resources.get("limits") or {}).items() if k in ("cpu", "memory")}
    gpus = {request.accelerator: str(request.gpus_per_node)}
    return {"requests": {**requests, **gpus}, "limits": {**limits, **gpus}}


def create(client, request: JobRequest, name: str) -> str:
    """Create the TrainJob; its name. The body is built here, on Kubeflow Trainer's own API
    models, because the SDK sets a node's CPU and memory as limits too."""
    from kubeflow.trainer.constants import constants
    from kubeflow_trainer_api import models

    patch = _node_patch(request.placement)
    job = models.TrainerV1alpha1TrainJob.from_dict({
        "apiVersion": constants.API_VERSION, "kind": constants.TRAINJOB_KIND,
        "metadata": {"name": name, "labels": dict(PART_OF)},
        "spec": {"runtimeRef": {"name": RUNTIME, "kind": "ClusterTrainingRuntime"},
                 "trainer": {"image": request.image, "command": request.command, "numNodes": request.nodes,
                             "resourcesPerNode": node_resources(request)},
                 # A job no step waits for any more (its pod was lost) still ends.
                 "activeDeadlineSeconds": request.deadline_s,
                 **({"runtimePatches": [patch]} if patch else {})}})
    api, namespace = client.backend.custom_api, client.backend.namespace
    try:
        api.create_namespaced_custom_object(constants.GROUP, constants.VERSION, namespace,
                                            constants.TRAINJOB_PLURAL, job.to_dict())
    except Exception as exc:  # noqa: BLE001 - the kubernetes client raises many kinds
        raise CockatooError(f"cannot create TrainJob {name}: {first_line(exc, 'reason')}") from None
    log.info("TrainJob %s created: %d nodes x %d %s, %s; command: %s", name, request.nodes,
             request.gpus_per_node, request.accelerator, request.image, shlex.join(request.command))
    return name


def follow(client, name: str, echo: Callable[[str], None] = print, timeout_s: int = WAIT_S,
           poll_s: int = 10) -> None:
    """Wait for the job's nodes to start, stream node 0's log, wait for the end; raise with the
    job's own error if it failed."""
    from kubeflow.trainer.constants import constants

    done = {constants.TRAINJOB_COMPLETE, constants.TRAINJOB_FAILED}
    client.wait_for_job_status(name, {constants.TRAINJOB_RUNNING, *done}, timeout=timeout_s,
                               polling_interval=poll_s)
    for line in client.get_job_logs(name, step=f"{constants.NODE}-0", follow=True):
        echo(line.rstrip("\n"))
    job = client.wait_for_job_status(name, done, timeout=timeout_s, polling_interval=poll_s)
    if job.status == constants.TRAINJOB_FAILED:
        raise CockatooError(f"TrainJob {name} failed: {failure_message(client, name)}")
    log.info("TrainJob %s complete", name)


def failure_message(client, name: str) -> str:
    """The Failed condition's reason and message, as Kubeflow Trainer (or JobSet) wrote them.
    The SDK's TrainJob keeps only the status, so this reads the object itself."""
    from kubeflow.trainer.constants import constants

    backend = client.backend
    body = backend.custom_api.get_namespaced_custom_object(
        constants.GROUP, constants.VERSION, backend.namespace, constants.TRAINJOB_PLURAL, name)
    for condition in body.get("status", {}).get("conditions", []):
        if condition.get("type") == constants.TRAINJOB_FAILED and condition.get("status") == "True":
            return f"{condition.get('reason', 'Failed')}: {condition.get('message', '(no message)')}"
    return "(no Failed condition with a message)"


def status(client, name: str) -> str | None:
    """The job's status, or None if there is no such job."""
    from kubernetes.client import ApiException

    try:
        return client.get_job(name).status
    except RuntimeError as exc:
        if isinstance(exc.__cause__, ApiException) and exc.__cause__.status == 404:
            return None
        raise


class Stopped(Exception):
    """The step's pod was told to stop (SIGTERM: the KFP run was terminated, or the pod evicted)."""


@contextlib.contextmanager
def _stopped_on_sigterm():
    def stop(signum, frame):
        raise Stopped

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class TrainJobs:
    """The step's TrainJobs, by name, for run()."""

    kind = "TrainJob"
    stopped = "deleted"

    def __init__(self, client, poll_s: int = 10, echo: Callable[[str], None] = print):
        self.client, self.poll_s, self.echo = client, poll_s, echo

    def failed(self, name: str) -> bool | None:
        from kubeflow.trainer.constants import constants

        found = status(self.client, name)
        return None if found is None else found == constants.TRAINJOB_FAILED

    def start(self, request: JobRequest, name: str) -> None:
        create(self.client, request, name)

    def follow(self, name: str) -> None:
        follow(self.client, name, self.echo, poll_s=self.poll_s)

    def stop(self, name: str) -> None:
        self.client.delete_job(name)


def run(jobs, base_name: str, make_request: Callable[[str], JobRequest]) -> str:
    """Follow the job an earlier try of this step started, unless it failed; else start one
    (`<base>-<try>`). Returns the name of the job that completed. Told to stop, the step stops
    the job it follows, so that nodes x GPUs do not train for a run nobody waits for; the
    checkpoints stay, and a retry's new job resumes from them. `jobs`: TrainJobs on a cluster,
    vertex_job.CustomJobs on Vertex AI."""
    for attempt in range(100):
        name = f"{base_name}-{attempt}"
        failed = jobs.failed(name)
        if failed:
            continue
        with _stopped_on_sigterm():
            try:
                if failed is None:
                    jobs.start(make_request(name), name)
                else:
                    log.info("%s %s exists, started by an earlier try of this step: following it",
                             jobs.kind, name)
                jobs.follow(name)
            except Stopped:
                jobs.stop(name)
                raise CockatooError(f"the train step was stopped (SIGTERM); {jobs.kind} {name} "
                                    f"{jobs.stopped} with it (its checkpoints remain for a retry)") from None
        return name
    raise CockatooError(f"{jobs.kind}s {base_name}-0 to -99 all failed; delete them to try again")
