"""The `cockatoo-score` pipeline's components: plan, one per shard, finish
(cockatoo_lib/release/scoring.py)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Metrics, Output

from components.images import DEFAULT_IMAGES


@dsl.component(base_image=DEFAULT_IMAGES.cpu, install_kfp_package=False)
def plan_scoring(model: str, input_uri: str, output_uri: str, shards: int, registry_uri: str, run_time: str
                 ) -> NamedTuple("Plan", model=str, output_uri=str, shards=list, plan=dict):  # noqa: UP014 - KFP reads it
    """Pin the model's version (models:/NAME/VERSION), date the URIs, deal the input's files to
    the shards ([{"index": i, "files": [...]}], what ParallelFor fans out). The whole plan is a
    parameter, not an artifact, so that finish also runs alone under kfp.local."""
    from cockatoo_lib.release.scoring import plan_scoring as make_plan
    from cockatoo_lib.storage.secrets import step_environment

    step_environment()
    made = make_plan(model, input_uri, output_uri, shards, registry_uri or None, run_time)
    return (made["model"], made["output"], made["shards"], made)


@dsl.component(base_image=DEFAULT_IMAGES.cpu, install_kfp_package=False)
def score_shard(model: str, shard: dict, output_uri: str, registry_uri: str, text_column: str,
                image_column: str, batch_size: int) -> int:
    """Score one shard's files into OUTPUT/shard-NNNNN/; returns its rows."""
    from cockatoo_lib.release.scoring import score_shard as score
    from cockatoo_lib.storage.secrets import step_environment

    step_environment()
    return score(model, shard["files"], output_uri, shard["index"], registry_uri or None, text_column,
                 image_column or None, batch_size)["rows"]


@dsl.component(base_image=DEFAULT_IMAGES.cpu, install_kfp_package=False)
def finish_scoring(plan: dict, scored: Output[Artifact], metrics: Output[Metrics]):
    """Check every shard finished; OUTPUT/manifest.json; rows and positives per label as metrics."""
    import json

    from cockatoo_lib.release.scoring import finish_scoring as finish
    from cockatoo_lib.storage.secrets import step_environment

    step_environment()
    manifest = finish(plan)
    with open(scored.path, "w") as handle:
        json.dump(manifest, handle, indent=2)
    scored.metadata.update(rows=manifest["rows"], model=manifest["model"], output=manifest["output"])
    metrics.log_metric("rows", manifest["rows"])
    for label, count in manifest["positives"].items():
        metrics.log_metric(f"positives_{label}", count)
