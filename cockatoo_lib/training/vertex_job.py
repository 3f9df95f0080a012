"""Training on several nodes on Vertex AI, which has no Kubeflow Trainer: the train step creates a
Vertex AI custom job through the API's REST interface (google-auth's session; the images carry
no aiplatform SDK), two worker pools of the same machine: the primary replica and nodes - 1
workers. Every replica runs the command a TrainJob's nodes run (torchrun over `cockatoo train`),
started by this module's `main`, which turns Vertex's CLUSTER_SPEC into torchrun's node count,
rank and rendezvous (the PET_* variables the Trainer runtime sets on a cluster). The rest is the
TrainJob's: the same shared bucket for data, checkpoints and the published model, the same
retry rules (cockatoo_lib.training.trainjob.run).

Not checked against a live project: the request bodies are checked against the API's own
message types (tests/test_vertex_job.py), CLUSTER_SPEC's form is Vertex's documented one.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from cockatoo_lib.errors import CockatooError, first_line
from cockatoo_lib.training.trainjob import JobRequest

log = logging.getLogger(__name__)

# Set on the train step by `cockatoo compile --target vertex`: the run's project, region and
# service account as Vertex's placeholders, which it resolves at run time; where they arrive
# unresolved, the variables Vertex sets in a custom job's container stand in.
PROJECT_ENV = "COCKATOO_VERTEX_PROJECT"
LOCATION_ENV = "COCKATOO_VERTEX_LOCATION"
SERVICE_ACCOUNT_ENV = "COCKATOO_VERTEX_SERVICE_ACCOUNT"
PLACEHOLDERS = {PROJECT_ENV: "{{$.pipeline_google_cloud_project_id}}",
                LOCATION_ENV: "{{$.pipeline_google_cloud_location}}",
                SERVICE_ACCOUNT_ENV: "{{$.pipeline_service_account}}"}
FALLBACKS = {PROJECT_ENV: "CLOUD_ML_PROJECT_ID", LOCATION_ENV: "CLOUD_ML_REGION"}
# The nodes' machine type, where the table below has none for the run's accelerator and count.
MACHINE_TYPE_ENV = "COCKATOO_VERTEX_MACHINE_TYPE"
# Another API endpoint (Private Service Connect, or a stand-in in tests).
API_ENV = "COCKATOO_VERTEX_API"
# What a job's replicas get from the step's environment: secret names, never values.
PASSED_ENV = ("COCKATOO_SECRETS",)
STEP_LABEL = "cockatoo_step"  # a custom job's label: the step (its output URI's hash) that made it

# Compute Engine's accelerator-optimized machines by GPU type and count per machine.
MACHINE_TYPES = {
    "NVIDIA_H100_80GB": {n: f"a3-highgpu-{n}g" for n in (1, 2, 4, 8)},
    "NVIDIA_H200_141GB": {8: "a3-ultragpu-8g"},
    "NVIDIA_A100_80GB": {n: f"a2-ultragpu-{n}g" for n in (1, 2, 4, 8)},
    "NVIDIA_TESLA_A100": {n: f"a2-highgpu-{n}g" for n in (1, 2, 4, 8)},
    "NVIDIA_L4": {1: "g2-standard-16", 2: "g2-standard-24", 4: "g2-standard-48", 8: "g2-standard-96"},
}
FAILED = {"JOB_STATE_FAILED", "JOB_STATE_CANCELLING", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED",
          "JOB_STATE_PARTIALLY_SUCCEEDED"}
SUCCEEDED = "JOB_STATE_SUCCEEDED"
POLL_S = 30  # seconds between reads of a job's state
BOOT_DISK_GB = 200  # the image (~10 GB) and the model's checkpoints before upload


def _setting(variable: str) -> str:
    value = os.environ.get(variable, "")
    if not value or value.startswith("{{"):  # a placeholder the backend left unresolved
        value = os.environ.get(FALLBACKS.get(variable, ""), "")
    return value


def machine_type(accelerator: str, gpus: int) -> str:
    """The machine each node runs on: the compile option's, else the table's for the GPUs."""
    chosen = os.environ.get(MACHINE_TYPE_ENV) or MACHINE_TYPES.get(accelerator, {}).get(gpus)
    if not chosen:
        raise CockatooError(f"no Vertex AI machine type known for {gpus} x {accelerator} per node; "
                            "compile with --machine-type (e.g. a3-highgpu-8g)")
    return chosen


def job_body(request: JobRequest, name: str, step: str, machine: str, service_account: str = "") -> dict:
    """The custom job as the API takes it (REST JSON): the primary replica and nodes - 1 workers,
    each with the step's image and command, its GPUs, and the deadline as the job's timeout."""
    env = {"PET_NPROC_PER_NODE": str(request.gpus_per_node),
           **{v: os.environ[v] for v in PASSED_ENV if os.environ.get(v)}}
    pool = {"machineSpec": {"machineType": machine, "acceleratorType": request.accelerator,
                            "acceleratorCount": request.gpus_per_node},
            "containerSpec": {"imageUri": request.image, "command": request.command,
                              "env": [{"name": k, "value": v} for k, v in env.items()]},
            "diskSpec": {"bootDiskType": "pd-ssd", "bootDiskSizeGb": BOOT_DISK_GB}}
    spec = {"workerPoolSpecs": [{**pool, "replicaCount": 1}, {**pool, "replicaCount": request.nodes - 1}],
            # A replica's restart would rejoin a rendezvous the others left: fail, and let the step retry.
            "scheduling": {"timeout": f"{request.deadline_s}s", "restartJobOnWorkerRestart": False}}
    if service_account:
        spec["serviceAccount"] = service_account
    return {"displayName": name, "labels": {STEP_LABEL: step, "app": "cockatoo"}, "jobSpec": spec}


class CustomJobs:
    """The step's custom jobs, by display name (`<base>-<try>`), for trainjob.run."""

    kind = "Vertex AI custom job"
    stopped = "cancelled"

    def __init__(self, base_name: str, machine: str, session=None):
        self.project, self.location = _setting(PROJECT_ENV), _setting(LOCATION_ENV)
        if not (self.project and self.location):
            raise CockatooError(f"nodes > 1 on Vertex AI needs the run's project and region: {PROJECT_ENV} "
                                f"and {LOCATION_ENV} (or {FALLBACKS[PROJECT_ENV]} and "
                                f"{FALLBACKS[LOCATION_ENV]}) are not set; compile with --target vertex")
        self.service_account = _setting(SERVICE_ACCOUNT_ENV)
        self.api = (os.environ.get(API_ENV) or f"https://{self.location}-aiplatform.googleapis.com").rstrip("/")
        self.parent = f"projects/{self.project}/locations/{self.location}"
        self.step, self.machine = base_name.removeprefix("cockatoo-"), machine
        self.session = session or _session()
        self.jobs = self._list()  # display name -> the newest job of that name

    def _call(self, method: str, path: str, what: str, **kwargs) -> dict:
        import requests

        try:
            response = self.session.request(method, f"{self.api}/v1/{path}", timeout=60, **kwargs)
        except requests.RequestException as exc:
            raise CockatooError(f"Vertex AI ({self.api}): cannot {what}: {first_line(exc)}") from None
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise CockatooError(f"Vertex AI refused to {what}: {response.status_code} {message}")
        return response.json() if response.content else {}

    def _list(self) -> dict[str, dict]:
        found, token = {}, ""
        while True:
            page = self._call("GET", f"{self.parent}/customJobs", "list the step's custom jobs",
                              params={"filter": f'labels.{STEP_LABEL}="{self.step}"', "pageToken": token})
            for job in sorted(page.get("customJobs", []), key=lambda j: j.get("createTime", "")):
                found[job["displayName"]] = job
            token = page.get("nextPageToken", "")
            if not token:
                return found

    def failed(self, name: str) -> bool | None:
        job = self.jobs.get(name)
        return None if job is None else job.get("state") in FAILED

    def start(self, request: JobRequest, name: str) -> None:
        body = job_body(request, name, self.step, self.machine, self.service_account)
        self.jobs[name] = self._call("POST", f"{self.parent}/customJobs", f"create custom job {name}",
                                     json=body)
        log.info("Vertex AI custom job %s created (%s): %d nodes x %d %s on %s, %s", name,
                 self.jobs[name].get("name"), request.nodes, request.gpus_per_node, request.accelerator,
                 self.machine, request.image)

    def follow(self, name: str) -> None:
        resource, state = self.jobs[name]["name"], None
        log.info("following Vertex AI custom job %s (%s); its replicas' logs are in Cloud Logging, "
                 "resource.labels.job_id=%s", name, resource, resource.rsplit("/", 1)[-1])
        while True:
            job = self._call("GET", resource, f"read custom job {name}")
            if job.get("state") != state:
                state = job.get("state")
                log.info("custom job %s: %s", name, state)
            if state == SUCCEEDED:
                return
            if state in FAILED:
                error = job.get("error", {}).get("message") or "(no error message)"
                raise CockatooError(f"{self.kind} {name} ({resource}) ended {state}: {error}")
            time.sleep(POLL_S)

    def stop(self, name: str) -> None:
        self._call("POST", f"{self.jobs[name]['name']}:cancel", f"cancel custom job {name}")


def _session():
    import google.auth
    from google.auth.transport.requests import AuthorizedSession

    try:
        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    except Exception as exc:  # noqa: BLE001 - google.auth raises several kinds
        raise CockatooError(f"no Google credentials to create Vertex AI custom jobs with: "
                            f"{first_line(exc, 'message')}") from None
    return AuthorizedSession(credentials)


def node_command(command: list[str]) -> list[str]:
    """What each replica runs: this module, which sets torchrun's rendezvous, then `command`."""
    return ["python", "-m", __name__, *command]


def rendezvous(cluster_spec: str) -> dict[str, str]:
    """torchrun's node count, this node's rank and the primary's address, as PET_* variables, from
    Vertex's CLUSTER_SPEC: {"cluster": {"workerpool0": ["host:port"], "workerpool1": [...]},
    "task": {"type": "workerpool1", "index": 0}, ...}. The primary is rank 0, worker i rank i + 1."""
    try:
        spec = json.loads(cluster_spec)
        cluster, task = spec["cluster"], spec["task"]
        primary, workers = cluster["workerpool0"], cluster.get("workerpool1", [])
        rank = 0 if task["type"] == "workerpool0" else 1 + int(task["index"])
        host, port = primary[0].rsplit(":", 1)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise CockatooError(f"CLUSTER_SPEC is not Vertex AI's cluster spec ({type(exc).__name__}: {exc}): "
                            f"{cluster_spec[:200]!r}") from None
    return {"PET_NNODES": str(len(primary) + len(workers)), "PET_NODE_RANK": str(rank),
            "PET_MASTER_ADDR": host, "PET_MASTER_PORT": port}


def main(argv: list[str]) -> None:
    """A replica's start: the rendezvous from CLUSTER_SPEC, then `argv` in its place."""
    from cockatoo_lib.storage.secrets import step_environment

    try:
        if not argv:
            raise CockatooError(f"usage: python -m {__name__} COMMAND...")
        os.environ.update(rendezvous(os.environ.get("CLUSTER_SPEC") or "{}"))
        step_environment()  # the secrets once per node, not once per GPU
    except CockatooError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    command = [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
