"""Vertex AI Pipelines: the pipelines compiled for Vertex (`--target vertex`), then submitted and
scheduled through google-cloud-aiplatform (PipelineJob, PipelineJob.create_schedule) instead of a
KFP API server.

What the Vertex target compiles differently (pipelines/cockatoo_train.py `Cluster.on_kubernetes`):
- no Kubernetes platform config: kfp-kubernetes' secrets as environment variables, the /dev/shm
  volume, scratch volumes, node selectors and tolerations belong to the KFP backend on a cluster;
  Vertex places a step by its machine and accelerator and reads no Kubernetes secret, so its spec
  holds none of them and the options that would set them are refused;
- the accelerator by Vertex's name (NVIDIA_L4, NVIDIA_H100_80GB, ...), checked against the API's
  own enum, where a cluster takes a resource name (nvidia.com/gpu).
Caching and the train step's retries are in the IR, which Vertex runs as a cluster does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cockatoo_lib.errors import CockatooError, first_line

INSTALL_HINT = "pip install 'cockatoo-pipelines[vertex]'"


def _aiplatform():
    try:
        from google.cloud import aiplatform
    except ImportError:
        raise CockatooError(f"Vertex AI needs google-cloud-aiplatform: {INSTALL_HINT}") from None
    return aiplatform


def accelerators() -> list[str]:
    """The accelerator names Vertex's API knows (its AcceleratorType enum)."""
    _aiplatform()
    from google.cloud.aiplatform_v1.types import AcceleratorType

    return [a.name for a in AcceleratorType if a.name != "ACCELERATOR_TYPE_UNSPECIFIED"]


def check_accelerator(name: str) -> str:
    known = accelerators()
    if name not in known:
        gpus = ", ".join(a for a in known if a.startswith("NVIDIA"))
        raise CockatooError(f"--accelerator-type {name!r}: Vertex AI names its accelerators, e.g. {gpus}")
    return name


@dataclass(frozen=True)
class VertexTarget:
    """Where a run goes on Vertex AI, and as whom."""

    project: str
    region: str
    pipeline_root: str  # gs://...: where the steps' artifacts go
    service_account: str = ""
    network: str = ""  # projects/NUMBER/global/networks/NAME, to reach a private MLflow server

    def check(self) -> VertexTarget:
        for option, value in (("--project", self.project), ("--region", self.region),
                              ("--pipeline-root", self.pipeline_root)):
            if not value:
                raise CockatooError(f"--target vertex needs {option}")
        if not re.fullmatch(r"[a-z]+-[a-z]+\d+", self.region):
            raise CockatooError(f"--region {self.region!r} is no Vertex AI region (e.g. europe-west4)")
        if not self.pipeline_root.startswith("gs://"):
            raise CockatooError(f"--pipeline-root {self.pipeline_root!r}: Vertex AI writes artifacts to "
                                "Cloud Storage, a gs:// URI")
        return self


LABEL = re.compile(r"[^a-z0-9_-]")


def labels(pipeline: str, params: dict[str, Any]) -> dict[str, str]:
    """What a run is, as Vertex labels (lower case, at most 63 characters): the pipeline, the model
    type and the data config (its file's stem)."""
    found = {"cockatoo-pipeline": pipeline}
    if params.get("model_type"):
        found["model-type"] = str(params["model_type"])
    if params.get("data_config"):
        stem = re.sub(r"\.ya?ml$", "", str(params["data_config"]).rstrip("/").rsplit("/", 1)[-1])
        found["data-config"] = stem
    return {key: LABEL.sub("-", value.lower())[:63] for key, value in found.items()}


def _job(aiplatform, target: VertexTarget, spec: str, params: dict[str, Any], pipeline: str,
         display_name: str):
    return aiplatform.PipelineJob(display_name=display_name, template_path=spec,
                                  pipeline_root=target.pipeline_root, parameter_values=params,
                                  labels=labels(pipeline, params), project=target.project,
                                  location=target.region)


def submit(target: VertexTarget, spec: str, params: dict[str, Any], pipeline: str,
           run_name: str | None = None) -> str:
    """Create a PipelineJob from the compiled spec; its console URL."""
    aiplatform = _aiplatform()
    try:
        job = _job(aiplatform, target, spec, params, pipeline, run_name or pipeline)
        job.submit(service_account=target.service_account or None, network=target.network or None)
    except CockatooError:
        raise
    except Exception as exc:  # noqa: BLE001 - google-api-core and auth raise many kinds
        raise CockatooError(f"Vertex AI ({target.project}, {target.region}) refused the run: "
                            f"{first_line(exc, 'message')}") from None
    return job._dashboard_uri()


def vertex_cron(cron: str, time_zone: str) -> str:
    """The six-field cron of `cockatoo schedule` (seconds first, as KFP takes it) as Vertex's
    five fields, with its time zone (`TZ=...`)."""
    import zoneinfo

    fields = cron.split()
    try:
        zoneinfo.ZoneInfo(time_zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise CockatooError(f"--time-zone {time_zone!r}: no IANA time zone (e.g. Europe/Berlin)") from None
    if len(fields) != 6 or fields[0] != "0":
        raise CockatooError(f"--cron {cron!r}: six fields with seconds 0 (Vertex AI schedules whole minutes)")
    return f"TZ={time_zone} {' '.join(fields[1:])}"


def schedule(target: VertexTarget, spec: str, params: dict[str, Any], pipeline: str, cron: str,
             name: str, time_zone: str = "UTC", start_time: str = "", end_time: str = "",
             max_concurrent_runs: int = 1) -> str:
    """Create a Vertex schedule of the compiled spec; its resource name."""
    aiplatform = _aiplatform()
    try:
        job = _job(aiplatform, target, spec, params, pipeline, name)
        made = job.create_schedule(cron=vertex_cron(cron, time_zone), display_name=name,
                                   start_time=start_time or None, end_time=end_time or None,
                                   max_concurrent_run_count=max_concurrent_runs,
                                   service_account=target.service_account or None,
                                   network=target.network or None)
    except CockatooError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CockatooError(f"Vertex AI ({target.project}, {target.region}) refused the schedule: "
                            f"{first_line(exc, 'message')}") from None
    return made.resource_name
