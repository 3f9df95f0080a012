"""The `cockatoo-score` pipeline: score a backlog with a registered model, the shards fanned out
over pods with dsl.ParallelFor (cockatoo_lib/release/scoring.py says what each step does).

plan -> score_shard x N (at most `Cluster.score_parallelism` at once) -> finish.
No step is cached: the same URIs name new posts from one run to the next, and the outputs in
the user's bucket, not KFP's artifacts, are what a run leaves.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Metrics

from components.score import finish_scoring, plan_scoring, score_shard
from pipelines.cockatoo_train import Cluster, configure, mlflow_credentials, on_a_shallow_stack

PIPELINE_NAME = "cockatoo-score"


class ScoreOutputs(NamedTuple):
    scored: Artifact  # the manifest
    metrics: Metrics


def build_score_pipeline(cluster: Cluster = Cluster()):
    return on_a_shallow_stack(_build, cluster)


def _build(cluster: Cluster):
    run_time = "" if cluster.for_local else dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER

    @dsl.pipeline(name=PIPELINE_NAME,
                  description="Score a backlog of texts (and images) with a registered model, in shards.")
    def cockatoo_score(
        input_uri: str,
        output_uri: str,
        model: str = "models:/cockatoo-moderation@champion",
        registry_uri: str = cluster.registry_uri,
        shards: int = 8,
        text_column: str = "text",
        image_column: str = "",
        batch_size: int = 64,
    ) -> ScoreOutputs:
        plan = plan_scoring(model=model, input_uri=input_uri, output_uri=output_uri, shards=shards,
                            registry_uri=registry_uri, run_time=run_time)
        configure(plan, "plan-scoring", cluster.images.cpu, cluster)
        mlflow_credentials(plan, cluster)

        with dsl.ParallelFor(plan.outputs["shards"], parallelism=cluster.score_parallelism) as shard:
            score = score_shard(model=plan.outputs["model"], shard=shard,
                                output_uri=plan.outputs["output_uri"], registry_uri=registry_uri,
                                text_column=text_column, image_column=image_column, batch_size=batch_size)
            on_gpu = cluster.score_gpus > 0
            configure(score, "score-shard", cluster.images.cuda if on_gpu else cluster.images.cpu, cluster,
                      shm=True)
            mlflow_credentials(score, cluster)
            if on_gpu:
                score.set_accelerator_type(cluster.accelerator_type).set_accelerator_limit(cluster.score_gpus)
            if cluster.retries:  # a preempted pod: the retry scores only the parts not written
                score.set_retry(num_retries=cluster.retries, backoff_duration="60s", backoff_factor=2.0)

        finish = finish_scoring(plan=plan.outputs["plan"]).after(score)
        configure(finish, "finish-scoring", cluster.images.cpu, cluster)
        for task in (plan, score, finish):
            task.set_caching_options(False)
        return ScoreOutputs(scored=finish.outputs["scored"], metrics=finish.outputs["metrics"])

    return cockatoo_score
