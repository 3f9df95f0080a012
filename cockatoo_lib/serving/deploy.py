"""`cockatoo deploy`: the KServe InferenceService that serves the champion on a cluster.

A custom predictor: the CPU image running `cockatoo serve` on the registry alias, so the
service follows the gate's promotions without a redeploy. Built with kserve's own models
(V1beta1InferenceService) and the kubernetes client's; `apply` creates it, or replaces the
one of that name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from cockatoo_lib.errors import CockatooError, first_line
from cockatoo_lib.release.model_registry import MLFLOW_SECRET_KEYS
from cockatoo_lib.serving.settings import DEFAULT_HTTP_PORT, ServeSettings
from cockatoo_lib.storage.trust import CA_KEY, EXTRA_CA_PEM_ENV

CONTAINER = "kserve-container"  # the name KServe gives a custom predictor's container
# The port opens once the model is downloaded and loaded: ModernBERT-large's 1.6 GB from a slow
# artifact store can take minutes. The startup probe allows this long before liveness counts.
STARTUP_SECONDS = 900
# The only writable path under a read-only root: downloaded versions, caches, HOME.
SCRATCH = "/tmp"
# While the alias moves, a replica holds the old version in its served form, the new one as
# trained (fp32) and the new one's reduced form: about 2.5 copies of the fp32 weights, beside the
# runtime (torch, kserve, the tokenizer, a batch).
SWITCH_WEIGHT_COPIES = 2.5
RUNTIME_GIB = 1.5


def serving_memory(model_type: str) -> str:
    """A replica's memory for a model type: what a switch of versions holds, whole GiB."""
    import math

    from transformers import AutoConfig

    from cockatoo_lib.plan.batch_split import count_parameters, parameter_count, published_config
    from cockatoo_lib.plan.catalogue import CATALOGUE, default_base_model

    if model_type not in CATALOGUE:
        raise CockatooError(f"unknown model type {model_type!r}; known: {', '.join(CATALOGUE)}")
    if published_config(model_type) is not None:
        parameters = parameter_count(model_type)[0]
    else:  # a model whose weights come in a package (minilm): its own config
        bundled = AutoConfig.from_pretrained(default_base_model(CATALOGUE[model_type]))
        parameters = count_parameters(bundled)[0]
    weights_gib = 4 * parameters / 2**30
    return f"{max(2, math.ceil(SWITCH_WEIGHT_COPIES * weights_gib + RUNTIME_GIB))}Gi"


@dataclass(frozen=True)
class Deployment:
    name: str
    model_uri: str  # models:/NAME@champion
    registry_uri: str
    image: str
    namespace: str = "default"
    min_replicas: int = 1
    max_replicas: int = 3
    cpu: str = "2"
    memory: str = "4Gi"
    scratch: str = "4Gi"  # the emptyDir at /tmp, where each version served is downloaded
    # MLflow credentials: the secret's keys username, password, token as MLFLOW_TRACKING_*.
    mlflow_secret: str = "cockatoo-mlflow"
    # A secret with the team's CA certificate (key ca.crt), trusted beside the public CAs.
    ca_secret: str = ""
    settings: ServeSettings = field(default_factory=ServeSettings)

    def serve_args(self) -> list[str]:
        return ["--model", self.model_uri, "--registry-uri", self.registry_uri,
                "--http-port", str(DEFAULT_HTTP_PORT), "--model-name", self.name, *self.settings.args()]


def inference_service(d: Deployment) -> dict:
    """The manifest, as the Kubernetes API takes it."""
    if not d.registry_uri or d.registry_uri.startswith("sqlite:"):
        raise CockatooError(f"deploy needs a registry the cluster can reach (http://...), not "
                            f"{d.registry_uri or 'none'}: pass --registry-uri")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", d.name):
        raise CockatooError(f"InferenceService name {d.name!r}: Kubernetes takes lowercase letters, digits "
                            "and '-', at most 63; pass --name")
    if not 1 <= d.min_replicas <= d.max_replicas:
        raise CockatooError(f"replicas: min {d.min_replicas} and max {d.max_replicas}; need 1 <= min <= max")
    from kserve import constants
    from kserve.models import V1beta1InferenceService, V1beta1InferenceServiceSpec, V1beta1PredictorSpec
    from kubernetes import client as k8s

    def secret_env(env_name: str, key: str):
        return k8s.V1EnvVar(name=env_name, value_from=k8s.V1EnvVarSource(
            secret_key_ref=k8s.V1SecretKeySelector(name=d.mlflow_secret, key=key, optional=True)))

    def probe(path: str, period_s: int = 10, failures: int = 3):
        return k8s.V1Probe(http_get=k8s.V1HTTPGetAction(path=path, port=DEFAULT_HTTP_PORT),
                           period_seconds=period_s, failure_threshold=failures)

    # HOME and the caches move to the scratch volume: the root file system is read-only.
    scratch_env = {"TMPDIR": SCRATCH, "HOME": f"{SCRATCH}/home", "XDG_CACHE_HOME": f"{SCRATCH}/cache",
                   "HF_HOME": f"{SCRATCH}/cache/huggingface", "MPLCONFIGDIR": f"{SCRATCH}/cache/matplotlib"}
    ca = [k8s.V1EnvVar(name=EXTRA_CA_PEM_ENV, value_from=k8s.V1EnvVarSource(
        secret_key_ref=k8s.V1SecretKeySelector(name=d.ca_secret, key=CA_KEY)))] if d.ca_secret else []
    container = k8s.V1Container(
        name=CONTAINER, image=d.image, command=["cockatoo", "serve"], args=d.serve_args(),
        ports=[k8s.V1ContainerPort(container_port=DEFAULT_HTTP_PORT, protocol="TCP")],
        env=[*(secret_env(env, key) for key, env in MLFLOW_SECRET_KEYS.items()),
             *(k8s.V1EnvVar(name=k, value=v) for k, v in scratch_env.items()), *ca],
        # The CPU limit is the request: the server sizes torch's threads from it (the cgroup quota).
        resources=k8s.V1ResourceRequirements(
            requests={"cpu": d.cpu, "memory": d.memory, "ephemeral-storage": d.scratch},
            limits={"cpu": d.cpu, "memory": d.memory, "ephemeral-storage": d.scratch}),
        # Ready only while the served model is loaded: kserve's /v2/health/ready says true with none.
        readiness_probe=probe(f"/v2/models/{d.name}/ready"), liveness_probe=probe("/v2/health/live"),
        startup_probe=probe("/v2/health/live", period_s=5, failures=STARTUP_SECONDS // 5),
        # What the `restricted` Pod Security Standard asks; the image runs as any uid (uid 1000 here).
        security_context=k8s.V1SecurityContext(
            run_as_non_root=True, run_as_user=1000, allow_privilege_escalation=False,
            read_only_root_filesystem=True, capabilities=k8s.V1Capabilities(drop=["ALL"]),
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")),
        volume_mounts=[k8s.V1VolumeMount(name="scratch", mount_path=SCRATCH)])
    service = V1beta1InferenceService(
        api_version=constants.KSERVE_V1BETA1, kind=constants.KSERVE_KIND_INFERENCESERVICE,
        metadata=k8s.V1ObjectMeta(name=d.name, namespace=d.namespace,
                                  labels={"app.kubernetes.io/part-of": "cockatoo"}),
        spec=V1beta1InferenceServiceSpec(predictor=V1beta1PredictorSpec(
            min_replicas=d.min_replicas, max_replicas=d.max_replicas, containers=[container],
            # Knative queues requests past this per replica (and scales out) instead of sending them.
            container_concurrency=d.settings.max_concurrent_requests,
            volumes=[k8s.V1Volume(name="scratch",
                                  empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=d.scratch))])))
    return k8s.ApiClient().sanitize_for_serialization(service)


def apply(manifest: dict) -> str:
    """Create the InferenceService, or replace the one of that name; 'created' or 'updated'."""
    from kserve import constants
    from kubernetes import client as k8s
    from kubernetes import config

    try:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
    except Exception as exc:  # noqa: BLE001 - a missing or broken kube config
        raise CockatooError(f"no Kubernetes cluster to apply to: {first_line(exc)}") from None
    api = k8s.CustomObjectsApi()
    group, version = constants.KSERVE_GROUP, constants.KSERVE_V1BETA1_VERSION
    plural, ns, name = constants.KSERVE_PLURAL_INFERENCESERVICE, manifest["metadata"]["namespace"], \
        manifest["metadata"]["name"]
    where = f"InferenceService {ns}/{name}"
    try:
        try:
            api.create_namespaced_custom_object(group, version, ns, plural, manifest)
            return "created"
        except k8s.ApiException as exc:
            if exc.status != 409:
                raise
        current = api.get_namespaced_custom_object(group, version, ns, plural, name)
        body = {**manifest, "metadata": {**manifest["metadata"],
                                         "resourceVersion": current["metadata"]["resourceVersion"]}}
        api.replace_namespaced_custom_object(group, version, ns, plural, name, body)
        return "updated"
    except k8s.ApiException as exc:
        raise CockatooError(f"cannot apply {where}: HTTP {exc.status} {first_line(exc, 'reason')}") from None
    except Exception as exc:  # noqa: BLE001 - connection errors arrive as many types
        raise CockatooError(f"cannot apply {where}: {first_line(exc)}") from None
