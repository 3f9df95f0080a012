"""Training on several nodes: the train step hands the work to Kubeflow Trainer. It creates a
TrainJob (the `torch-distributed` runtime) through the `kubeflow` SDK, whose every node runs
`cockatoo train` under torchrun (the runtime sets torchrun's node count, rank and rendezvous
in PET_* variables), streams node 0's log into the step's, waits, and fails with the job's own
error. The nodes share no disk: they read the tokenized data from its bucket URI, checkpoint
under the checkpoint root, and process 0 publishes the model there, from where the step takes
it (cockatoo_lib.publish verifies it on the way).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field

from cockatoo_lib.errors import CockatooError

log = logging.getLogger(__name__)

RUNTIME = "torch-distributed"
# The image every node runs: the train step's own, set on the step by the pipeline.
IMAGE_ENV = "COCKATOO_TRAIN_IMAGE"
# A week: the step's own timeout (KFP's) is the one to set for a shorter bound.
WAIT_S = 7 * 24 * 3600


@dataclass(frozen=True)
class JobRequest:
    image: str
    nodes: int
    gpus_per_node: int
    command: list[str]
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


def trainer_client():
    """A TrainerClient for the cluster this runs in (in-cluster config in a pod; the kube
    config elsewhere, KUBECONFIG if set)."""
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient

    return TrainerClient(KubernetesBackendConfig(config_file=os.environ.get("KUBECONFIG") or None))


def _node_patch(placement: dict):
    """The step's environment, tolerations and node selector on every node's pod."""
    from kubeflow.trainer.options import kubernetes as k8s

    env, tolerations = placement.get("env"), placement.get("tolerations")
    selector = placement.get("node_selector")
    if not (env or tolerations or selector):
        return None
    pod = k8s.PodSpecPatch(containers=[k8s.ContainerPatch(name="node", env=env)] if env else None,
                           tolerations=tolerations or None, node_selector=selector or None)
    node = k8s.ReplicatedJobPatch(name="node", template=k8s.JobTemplatePatch(
        spec=k8s.JobSpecPatch(template=k8s.PodTemplatePatch(spec=pod))))
    return k8s.RuntimePatch(training_runtime_spec=k8s.TrainingRuntimeSpecPatch(
        template=k8s.JobSetTemplatePatch(spec=k8s.JobSetSpecPatch(replicated_jobs=[node]))))


def create(client, request: JobRequest, name: str) -> str:
    """Create the TrainJob; its name."""
    from kubeflow.trainer import CustomTrainerContainer
    from kubeflow.trainer.options import Labels, Name, TrainerCommand

    requests = (request.placement.get("resources") or {}).get("requests") or {}
    trainer = CustomTrainerContainer(
        image=request.image, num_nodes=request.nodes,
        resources_per_node={"gpu": request.gpus_per_node,
                            **{k: requests[k] for k in ("cpu", "memory") if k in requests}})
    patch = _node_patch(request.placement)
    name = client.train(runtime=RUNTIME, trainer=trainer,
                        options=[Name(name=name), TrainerCommand(command=request.command),
                                 Labels(labels={"app.kubernetes.io/part-of": "cockatoo"}),
                                 *([patch] if patch else [])])
    log.info("TrainJob %s created: %d nodes x %d GPUs, %s; command: %s", name, request.nodes,
             request.gpus_per_node, request.image, shlex.join(request.command))
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


def run(client, base_name: str, make_request: Callable[[str], JobRequest],
        echo: Callable[[str], None] = print, poll_s: int = 10) -> str:
    """Follow the job an earlier try of this step started, unless it failed; else create one
    (`<base>-<try>`). Returns the name of the job that completed."""
    from kubeflow.trainer.constants import constants

    for attempt in range(100):
        name = f"{base_name}-{attempt}"
        found = status(client, name)
        if found == constants.TRAINJOB_FAILED:
            continue
        if found is None:
            create(client, make_request(name), name)
        else:
            log.info("TrainJob %s exists (%s), started by an earlier try of this step: following it",
                     name, found)
        follow(client, name, echo, poll_s=poll_s)
        return name
    raise CockatooError(f"TrainJobs {base_name}-0 to -99 all failed; delete them to try again")
