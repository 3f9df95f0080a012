"""The `cockatoo-train` pipeline: prepare -> tokenize -> train -> evaluate -> promote.

Caching (KFP keys its cache on parameter values and upstream artifact IDs):
- prepare is never cached (and takes the run's schedule time), so every run reads its
  sources afresh;
- tokenize reruns whenever prepare did, but hits our content cache (seconds, not minutes);
- train and evaluate read the tokenized data through an importer of the cache entry's URI,
  which names the data by content: when data and plan are unchanged, KFP reuses them;
- promote is never cached: it reads and moves the registry's aliases, which change between runs.
No dsl.If/Else: kfp.local 2.16 runs both branches; the gate decides inside its step.
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import HTML, Artifact, Dataset, Markdown, Model

from cockatoo_lib.release.model_registry import MLFLOW_SECRET_KEYS
from cockatoo_lib.storage.secrets import SECRETS_ENV, secrets_spec
from cockatoo_lib.storage.trust import CA_KEY, EXTRA_CA_PEM_ENV
from cockatoo_lib.training.trainjob import ACCELERATOR_ENV, IMAGE_ENV, NODES_ON_ENV
from components import evaluate, prepare_data, promote, tokenize, train
from components.images import DEFAULT_IMAGES, Images
from components.train import train_pod_gpus

PIPELINE_NAME = "cockatoo-train"


@dataclass(frozen=True)
class Cluster:
    """Compile-time settings for where the steps run."""

    images: Images = DEFAULT_IMAGES
    accelerator_type: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict] = field(default_factory=list)
    # Secrets reach steps as environment variables only, never as parameters.
    hf_token_secret: str = "cockatoo-hf-token"
    # MLflow credentials (keys username, password, token: MLFLOW_TRACKING_*), for the promote step.
    mlflow_secret: str = "cockatoo-mlflow"
    # A secret holding the team's CA certificate (key ca.crt), for an MLflow server, bucket or
    # image host behind a private CA: mounted on every step, which then trusts it
    # (cockatoo_lib/storage/trust.py); empty: the public CAs only.
    ca_secret: str = ""
    cache_root: str = ""
    # Default of the registry_uri run parameter: the MLflow tracking server on a cluster.
    registry_uri: str = ""
    gpus: int = 1
    # Default of the checkpoint_root run parameter: where train publishes its checkpoints (a
    # bucket on a cluster), so that a retried or rerun step resumes; empty: no checkpoints kept.
    checkpoint_root: str = ""
    # How often KFP retries a failed train step (a preempted spot node), with backoff.
    retries: int = 2
    # A volume of this size (e.g. "100Gi") for prepare's and tokenize's temporary files, which
    # hold a data set's images twice over; empty: the pod's ephemeral storage.
    scratch_size: str = ""
    # The cockatoo-score pipeline: GPUs per shard (0: the CPU image) and shards scored at once
    # (0: all; KFP takes this at compile time, not as a run parameter).
    score_gpus: int = 0
    score_parallelism: int = 8
    # kfp.local 2.16 cannot resolve the schedule-time placeholder; local runs pass a constant.
    for_local: bool = False
    # "kubeflow": a KFP cluster; "vertex": Vertex AI Pipelines, which takes no Kubernetes
    # platform config (pipelines/vertex.py).
    target: str = "kubeflow"
    # Vertex AI: the machine type of a multi-node run's nodes, where vertex_job.MACHINE_TYPES has
    # none for the accelerator and GPU count.
    machine_type: str = ""

    @property
    def on_kubernetes(self) -> bool:
        return self.target != "vertex"


def vertex_secrets(cluster: Cluster, mlflow: bool = False) -> dict[str, str]:
    """On Vertex AI, the variables a step reads from Secret Manager at its start, by secret name
    (cockatoo_lib/storage/secrets.py): the cluster's secrets, one secret per key
    (cockatoo-hf-token; cockatoo-mlflow-username, -password, -token; the CA secret's certificate)."""
    wanted = {"HF_TOKEN": cluster.hf_token_secret}
    if cluster.ca_secret:
        wanted[EXTRA_CA_PEM_ENV] = cluster.ca_secret
    if mlflow:
        wanted.update({variable: f"{cluster.mlflow_secret}-{key}"
                       for key, variable in MLFLOW_SECRET_KEYS.items()})
    return wanted


def vertex_nodes(cluster: Cluster) -> dict[str, str]:
    """What the train step needs on Vertex AI to start a custom job for nodes > 1: the run's project,
    region and service account (placeholders Vertex resolves) and a machine type if one is given."""
    from cockatoo_lib.training import vertex_job

    return {NODES_ON_ENV: "vertex", **vertex_job.PLACEHOLDERS,
            **({vertex_job.MACHINE_TYPE_ENV: cluster.machine_type} if cluster.machine_type else {})}


def mlflow_credentials(task, cluster: Cluster) -> None:
    """The MLflow secret's keys as MLFLOW_TRACKING_*: from the Kubernetes secret on a cluster, from
    Secret Manager on Vertex AI."""
    if cluster.on_kubernetes:
        kubernetes.use_secret_as_env(task, cluster.mlflow_secret, MLFLOW_SECRET_KEYS, optional=True)
    else:
        task.set_env_variable(SECRETS_ENV, secrets_spec(vertex_secrets(cluster, mlflow=True)))


class PipelineOutputs(NamedTuple):
    model: Model
    evaluation: Artifact
    report: HTML
    model_card: Markdown
    decision: Artifact
    gate: Markdown



RESOURCES = {  # (cpu, memory) requests per step
    "prepare": ("2", "8G"), "tokenize": ("4", "8G"), "train-pod-gpus": ("100m", "256M"),
    "train": ("8", "48G"), "evaluate": ("2", "8G"), "promote": ("2", "8G"),
    # the cockatoo-score pipeline's
    "plan-scoring": ("1", "2G"), "score-shard": ("4", "8G"), "finish-scoring": ("1", "2G"),
}


def configure(task, step: str, image: str, cluster: Cluster, shm: bool = False,
               scratch: bool = False):
    cpu, memory = RESOURCES[step]
    task.set_container_image(image).set_cpu_request(cpu).set_memory_request(memory)
    task.set_display_name(step)
    if not cluster.on_kubernetes:
        task.set_env_variable(SECRETS_ENV, secrets_spec(vertex_secrets(cluster)))
        return task
    kubernetes.use_secret_as_env(task, cluster.hf_token_secret, {"token": "HF_TOKEN"}, optional=True)
    if cluster.ca_secret:  # as the environment: a TrainJob's nodes get the train step's too
        kubernetes.use_secret_as_env(task, cluster.ca_secret, {CA_KEY: EXTRA_CA_PEM_ENV})
    if shm:  # DataLoader workers share tensors through /dev/shm, which is 64 MB by default
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory")
    if scratch and cluster.scratch_size:
        kubernetes.add_ephemeral_volume(task, volume_name="scratch", mount_path="/scratch",
                                        access_modes=["ReadWriteOnce"], size=cluster.scratch_size)
        task.set_env_variable("TMPDIR", "/scratch")
    for key, value in cluster.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for toleration in cluster.tolerations:
        kubernetes.add_toleration(task, **toleration)
    return task


def build_pipeline(cluster: Cluster = Cluster()):
    """The pipeline for `cluster`."""
    return on_a_shallow_stack(_build, cluster)


def on_a_shallow_stack(build, cluster: Cluster):
    """build(cluster) in a thread of its own: KFP's task setters name their caller with
    inspect.stack(), which reads the source of every frame on the stack, seconds a build under a
    deep stack in a process that has loaded torch (a test, a notebook); a new thread's stack is a
    few frames deep."""
    with ThreadPoolExecutor(max_workers=1) as thread:
        return thread.submit(build, cluster).result()


def _build(cluster: Cluster):
    schedule_time = "" if cluster.for_local else dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="Fine-tune a multi-label content-moderation classifier.")
    def cockatoo_train(
        model_type: str = "deberta",
        data_config: str = "sample",
        labels: list = [],  # noqa: B006 - KFP reads defaults from the signature
        overrides: dict = {},  # noqa: B006
        base_model: str = "",
        seed: int = 42,
        max_train_samples: int = 0,
        tokenized_cache_root: str = cluster.cache_root,
        gpus: int = cluster.gpus,
        checkpoint_root: str = cluster.checkpoint_root,
        nodes: int = 1,
        registry_uri: str = cluster.registry_uri,
        model_name: str = "cockatoo-moderation",
        min_improvement: float = 0.0,
        max_label_drop: float = 0.02,
        allow_label_change: bool = False,
        min_gain_over_baseline: float = 0.0,
        allow_below_baseline: bool = False,
    ) -> PipelineOutputs:
        prepare = prepare_data(
            data_config=data_config, labels=labels, seed=seed, max_samples=max_train_samples,
            model_type=model_type, overrides=overrides, base_model=base_model,
            schedule_time=schedule_time)
        configure(prepare, "prepare", cluster.images.cpu, cluster, scratch=True)
        # Sources may change under the same URI: always read them afresh. (The schedule time
        # alone would do where the backend resolves its placeholder; not every backend does.)
        prepare.set_caching_options(False)

        tok = tokenize(data=prepare.outputs["data"], model_type=model_type, overrides=overrides,
                       base_model=base_model, cache_root=tokenized_cache_root)
        configure(tok, "tokenize", cluster.images.cpu, cluster, shm=True, scratch=True)

        tokenized = dsl.importer(artifact_uri=tok.outputs["cache_uri"], artifact_class=Dataset,
                                 reimport=False)
        tokenized.set_display_name("tokenized (by content)")

        # With nodes > 1 the step's pod only waits for the TrainJob's nodes: it holds no GPU.
        pod_gpus = train_pod_gpus(gpus=gpus, nodes=nodes)
        configure(pod_gpus, "train-pod-gpus", cluster.images.cpu, cluster)

        fit = train(tokenized=tokenized.output, model_type=model_type, overrides=overrides,
                    base_model=base_model, seed=seed, gpus=gpus, checkpoint_root=checkpoint_root,
                    nodes=nodes)
        configure(fit, "train", cluster.images.cuda, cluster, shm=True)
        fit.set_env_variable(IMAGE_ENV, cluster.images.cuda)  # what a TrainJob's nodes run
        fit.set_env_variable(ACCELERATOR_ENV, cluster.accelerator_type)  # and on what
        fit.set_accelerator_type(cluster.accelerator_type).set_accelerator_limit(pod_gpus.output)
        if not cluster.on_kubernetes:  # several nodes train as a Vertex AI custom job
            for variable, value in vertex_nodes(cluster).items():
                fit.set_env_variable(variable, value)
        fit.after(pod_gpus)  # the compiler does not count a resource's channel as a dependency
        if cluster.retries:  # a retry finds the checkpoints of the try before: same inputs, same key
            fit.set_retry(num_retries=cluster.retries, backoff_duration="60s", backoff_factor=2.0,
                          backoff_max_duration="3600s")

        scored = evaluate(model=fit.outputs["model"], tokenized=tokenized.output)
        configure(scored, "evaluate", cluster.images.cpu, cluster)

        gate = promote(model=fit.outputs["model"], data=prepare.outputs["data"],
                       evaluation=scored.outputs["evaluation"], registry_uri=registry_uri,
                       model_name=model_name, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                       min_improvement=min_improvement, max_label_drop=max_label_drop,
                       allow_label_change=allow_label_change, min_gain_over_baseline=min_gain_over_baseline,
                       allow_below_baseline=allow_below_baseline)
        configure(gate, "promote", cluster.images.cpu, cluster)
        mlflow_credentials(gate, cluster)
        gate.set_caching_options(False)

        return PipelineOutputs(model=fit.outputs["model"], evaluation=scored.outputs["evaluation"],
                               report=scored.outputs["report"], model_card=scored.outputs["model_card"],
                               decision=gate.outputs["decision"], gate=gate.outputs["decision_report"])

    return cockatoo_train


cockatoo_train = build_pipeline()
