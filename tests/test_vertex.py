"""Vertex AI Pipelines: `--target vertex` compile, submit and schedule through the real
google-cloud-aiplatform SDK, which builds every request; the generated API clients' create calls
(the last step before the network) are replaced by ones that keep the request, as the API's own
message types, and answer as the API would. No credentials, no network."""

import json
import os

import pytest
import yaml
from helpers import error_line, run_cli

from pipelines.cockatoo_train import Cluster
from pipelines.runner import compile_pipeline

VERTEX = ["--target", "vertex", "--accelerator-type", "NVIDIA_H100_80GB", "--project", "my-project",
          "--region", "europe-west4", "--pipeline-root", "gs://my-bucket/pipeline-root",
          "--service-account", "runner@my-project.iam.gserviceaccount.com",
          "--network", "projects/123/global/networks/ml"]


@pytest.fixture
def vertex_api(monkeypatch, gcs):
    """Submitting, the SDK checks that the pipeline root's bucket exists and belongs to the
    project: the bucket is in the storage emulator, the project's number from a stand-in for the
    Resource Manager call."""
    import google.auth
    from gcp_storage_emulator.storage import DEFAULT_PROJECT_NUMBER
    from google.auth.credentials import AnonymousCredentials
    from google.cloud.aiplatform.utils import resource_manager_utils
    from google.cloud.aiplatform_v1 import types
    from google.cloud.aiplatform_v1.services.pipeline_service import PipelineServiceClient
    from google.cloud.aiplatform_v1.services.schedule_service import ScheduleServiceClient

    sent = {}

    def create_pipeline_job(self, request=None, *, parent=None, pipeline_job=None, pipeline_job_id=None,
                            **_):
        assert isinstance(pipeline_job, types.PipelineJob)
        sent["job"] = (parent, pipeline_job)
        made = types.PipelineJob(pipeline_job)
        made.name = f"{parent}/pipelineJobs/{pipeline_job_id}"
        return made

    def create_schedule(self, request=None, *, parent=None, schedule=None, **_):
        assert isinstance(schedule, types.Schedule)
        sent["schedule"] = (parent, schedule)
        made = types.Schedule(schedule)
        made.name = f"{parent}/schedules/42"
        return made

    gcs.makedirs("my-bucket", exist_ok=True)
    monkeypatch.setattr(resource_manager_utils, "get_project_number", lambda *a, **k: DEFAULT_PROJECT_NUMBER)
    monkeypatch.setattr(google.auth, "default", lambda *a, **k: (AnonymousCredentials(), "my-project"))
    monkeypatch.setattr(PipelineServiceClient, "create_pipeline_job", create_pipeline_job)
    monkeypatch.setattr(ScheduleServiceClient, "create_schedule", create_schedule)
    return sent


def _spec(job) -> dict:
    return json.loads(type(job).to_json(job))["pipelineSpec"]


def test_a_run_submitted_to_vertex_carries_the_spec_parameters_and_labels(vertex_api, capsys, monkeypatch):
    code, out, err = run_cli(["submit", *VERTEX, "-m", "modernbert", "--param",
                              "data_config=gs://my-bucket/configs/Moderation_v2.yaml",
                              "--machine-type", "a3-megagpu-8g"], capsys, monkeypatch)
    assert code == 0, err
    parent, job = vertex_api["job"]
    assert parent == "projects/my-project/locations/europe-west4"
    assert out.strip().splitlines()[-1].startswith(
        "https://console.cloud.google.com/vertex-ai/locations/europe-west4/pipelines/runs/cockatoo-train-")
    assert job.runtime_config.gcs_output_directory == "gs://my-bucket/pipeline-root"
    assert job.service_account == "runner@my-project.iam.gserviceaccount.com"
    assert job.network == "projects/123/global/networks/ml"
    assert dict(job.labels) == {"cockatoo-pipeline": "cockatoo-train", "model-type": "modernbert",
                                "data-config": "moderation_v2"}
    values = dict(job.runtime_config.parameter_values)
    assert values["model_type"] == "modernbert"
    assert values["data_config"] == "gs://my-bucket/configs/Moderation_v2.yaml"
    # The spec Vertex gets: the accelerator by Vertex's name, no Kubernetes platform config.
    spec = _spec(job)
    train = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]["accelerator"]
    assert train["resourceType"] == "NVIDIA_H100_80GB"
    assert "platforms" not in json.dumps(spec) and "secretAsEnv" not in json.dumps(spec)
    # Secrets by name, read from Secret Manager at each step's start; the gate's MLflow credentials too.
    executors = spec["deploymentSpec"]["executors"]
    env = {name: {e["name"]: e["value"] for e in executor.get("container", {}).get("env", [])}
           for name, executor in executors.items()}
    assert env["exec-train"]["COCKATOO_SECRETS"] == "HF_TOKEN=cockatoo-hf-token"
    # nodes > 1 starts a custom job on this machine type.
    assert env["exec-train"]["COCKATOO_VERTEX_MACHINE_TYPE"] == "a3-megagpu-8g"
    assert env["exec-promote"]["COCKATOO_SECRETS"] == (
        "HF_TOKEN=cockatoo-hf-token,MLFLOW_TRACKING_USERNAME=cockatoo-mlflow-username,"
        "MLFLOW_TRACKING_PASSWORD=cockatoo-mlflow-password,MLFLOW_TRACKING_TOKEN=cockatoo-mlflow-token")


def test_a_vertex_schedule_is_a_whole_minute_cron_in_its_time_zone_one_run_at_a_time(vertex_api, capsys,
                                                                                    monkeypatch):
    code, out, err = run_cli(["schedule", *VERTEX, "--pipeline", "cockatoo-score", "--cron", "0 0 4 * * *",
                              "--time-zone", "Europe/Berlin", "--start", "2027-01-01T00:00:00Z",
                              "--param", "input_uri=gs://posts/{yesterday}/", "--param",
                              "output_uri=gs://scores/{yesterday}/"], capsys, monkeypatch)
    assert code == 0, err
    assert out.strip().splitlines()[-1] == "projects/my-project/locations/europe-west4/schedules/42"
    parent, schedule = vertex_api["schedule"]
    assert schedule.display_name == "cockatoo-daily-score"
    assert schedule.cron == "TZ=Europe/Berlin 0 4 * * *"
    assert schedule.max_concurrent_run_count == 1
    assert schedule.start_time.isoformat().startswith("2027-01-01T00:00:00")
    request = schedule.create_pipeline_job_request
    assert request.parent == parent == "projects/my-project/locations/europe-west4"
    assert request.pipeline_job.service_account == "runner@my-project.iam.gserviceaccount.com"
    assert dict(request.pipeline_job.labels) == {"cockatoo-pipeline": "cockatoo-score"}
    assert "job" not in vertex_api


@pytest.mark.parametrize(("args", "message"), [
    (["--project", ""], "--target vertex needs --project"),
    (["--region", ""], "--target vertex needs --region"),
    (["--region", "Europe West"], "--region 'Europe West' is no Vertex AI region"),
    (["--pipeline-root", "s3://b/root"], "--pipeline-root 's3://b/root': Vertex AI writes artifacts"),
    (["--accelerator-type", "nvidia.com/gpu"], "--accelerator-type 'nvidia.com/gpu': Vertex AI names its"),
    (["--node-selector", "pool=gpu"], "--node-selector is a Kubernetes setting, which Vertex AI does not"),
    (["--host", "http://kfp:8080"], "--host is KFP's; --target vertex submits to Vertex AI"),
    (["--experiment", "moderation"], "--experiment is KFP's; --target vertex submits to Vertex AI"),
    (["--target", "kubeflow", "--host", "http://kfp:8080", "--machine-type", "a2-highgpu-2g"],
     "--machine-type is Vertex AI's (--target vertex)"),
])
def test_vertex_bad_input_is_one_line_and_submits_nothing(args, message, vertex_api, capsys, monkeypatch):
    code, _, err = run_cli(["submit", *VERTEX, *args], capsys, monkeypatch)
    assert code == 2 and error_line(err).startswith(f"error: {message}"), err
    assert vertex_api == {}


def test_a_vertex_schedule_refuses_seconds_and_an_unknown_time_zone(vertex_api, capsys, monkeypatch):
    code, _, err = run_cli(["schedule", *VERTEX, "--cron", "30 0 3 * * 1"], capsys, monkeypatch)
    assert code == 2 and "six fields with seconds 0" in error_line(err)
    code, _, err = run_cli(["schedule", *VERTEX, "--cron", "0 0 3 * * 1", "--time-zone", "Mars/Olympus"],
                           capsys, monkeypatch)
    assert code == 2 and "--time-zone 'Mars/Olympus': no IANA time zone" in error_line(err)
    assert vertex_api == {}


def test_the_vertex_spec_is_the_clusters_without_its_kubernetes_config(tmp_path):
    """Same steps, inputs, images, caching and retries: the local run of the compiled cluster spec
    (tests/test_pipeline.py) stands for the Vertex one. Only the accelerator's name differs, the
    Kubernetes platform config is gone, each step names the secrets it reads instead, and the
    train step knows where to start a multi-node custom job."""
    kubeflow = list(yaml.safe_load_all(compile_pipeline(tmp_path / "k.yaml", Cluster()).read_text()))
    (vertex,) = yaml.safe_load_all(compile_pipeline(
        tmp_path / "v.yaml", Cluster(target="vertex", accelerator_type="NVIDIA_L4",
                                     machine_type="g2-standard-32")).read_text())
    assert len(kubeflow) == 2 and "kubernetes" in kubeflow[1]["platforms"]
    as_cluster = json.loads(json.dumps(vertex).replace('"NVIDIA_L4"', '"nvidia.com/gpu"'))
    executors = as_cluster["deploymentSpec"]["executors"]
    nodes_env = {"COCKATOO_NODES_ON": "vertex",
                 "COCKATOO_VERTEX_PROJECT": "{{$.pipeline_google_cloud_project_id}}",
                 "COCKATOO_VERTEX_LOCATION": "{{$.pipeline_google_cloud_location}}",
                 "COCKATOO_VERTEX_SERVICE_ACCOUNT": "{{$.pipeline_service_account}}",
                 "COCKATOO_VERTEX_MACHINE_TYPE": "g2-standard-32"}
    train_env = {e["name"]: e["value"] for e in executors["exec-train"]["container"]["env"]}
    assert {k: v for k, v in train_env.items() if k in nodes_env} == nodes_env
    for container in [e["container"] for e in executors.values() if "container" in e]:  # not the importer
        assert [e["name"] for e in container.get("env", [])].count("COCKATOO_SECRETS") == 1
        container["env"] = [e for e in container["env"] if e["name"] not in {"COCKATOO_SECRETS", *nodes_env}]
        if not container["env"]:
            del container["env"]
    assert as_cluster == kubeflow[0]


@pytest.fixture
def secret_manager(monkeypatch):
    """Secret Manager's generated client with its access call answering from a dict (the real
    request: the secret version's resource name)."""
    import google.auth
    from google.api_core import exceptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud.secretmanager_v1 import SecretManagerServiceClient, types

    stored = {}

    def access_secret_version(self, request=None, *, name=None, **_):
        if name not in stored:
            raise exceptions.NotFound(f"Secret [{name}] not found or has no versions.")
        if stored[name] is None:
            raise exceptions.PermissionDenied(f"Permission 'secretmanager.versions.access' denied for {name}")
        return types.AccessSecretVersionResponse(name=name, payload=types.SecretPayload(data=stored[name]))

    anonymous = (AnonymousCredentials(), "my-project")
    monkeypatch.setattr(google.auth, "default", lambda *a, **k: anonymous)
    monkeypatch.setattr(SecretManagerServiceClient, "access_secret_version", access_secret_version)
    for variable in ("HF_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                     "MLFLOW_TRACKING_TOKEN", "CLOUD_ML_PROJECT_ID", "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(variable, raising=False)
    return stored


def test_a_step_on_vertex_reads_its_secrets_by_name_and_skips_the_ones_that_do_not_exist(secret_manager,
                                                                                          monkeypatch):
    from cockatoo_lib.steps import PlanArgs
    from cockatoo_lib.storage.secrets import load_secrets

    secret_manager["projects/runs-project/secrets/cockatoo-mlflow-password/versions/latest"] = b"s3cret"
    secret_manager["projects/runs-project/secrets/cockatoo-mlflow-username/versions/latest"] = b"gate"
    monkeypatch.setenv("CLOUD_ML_PROJECT_ID", "runs-project")  # as Vertex AI sets it in a step
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "already-set")
    monkeypatch.setenv("COCKATOO_SECRETS", "MLFLOW_TRACKING_USERNAME=cockatoo-mlflow-username,"
                       "MLFLOW_TRACKING_PASSWORD=cockatoo-mlflow-password,HF_TOKEN=cockatoo-hf-token")
    PlanArgs.of({"model_type": "deberta"})  # every step starts here
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cret"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "already-set" and "HF_TOKEN" not in os.environ
    assert load_secrets() == []  # what is set stays; what does not exist is still skipped


def test_a_secret_a_step_may_not_read_is_one_line_naming_it(secret_manager, monkeypatch):
    from cockatoo_lib.errors import CockatooError
    from cockatoo_lib.storage.secrets import load_secrets

    secret_manager["projects/my-project/secrets/cockatoo-hf-token/versions/latest"] = None
    monkeypatch.setenv("COCKATOO_SECRETS", "HF_TOKEN=cockatoo-hf-token")
    name = "projects/my-project/secrets/cockatoo-hf-token/versions/latest"
    with pytest.raises(CockatooError, match=rf"^COCKATOO_SECRETS: cannot read secret {name} for HF_TOKEN: "
                                            r".*denied"):
        load_secrets()
