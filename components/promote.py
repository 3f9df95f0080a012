from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Model, Output

from components.images import DEFAULT_IMAGES


@dsl.component(base_image=DEFAULT_IMAGES.cpu, install_kfp_package=False)
def promote(
    model: Input[Model],
    data: Input[Dataset],
    evaluation: Input[Artifact],
    registry_uri: str,
    model_name: str,
    run_id: str,
    min_improvement: float,
    max_label_drop: float,
    allow_label_change: bool,
    min_gain_over_baseline: float,
    allow_below_baseline: bool,
    decision: Output[Artifact],
    decision_report: Output[Markdown],
):
    """Register the model as a new version of `model_name` and move the `champion` alias to it
    only if it beats the linear baseline and the current champion (cockatoo_lib.release.gate):
    decision.json and its Markdown."""
    import shutil

    from cockatoo_lib.release.gate import DECISION_MD
    from cockatoo_lib.steps import PromoteArgs, promote_step

    meta = promote_step(PromoteArgs.of(locals(), model_dir=model.path, data_dir=data.path,
                                       evaluation_dir=evaluation.path, output=decision.path,
                                       output_uri=decision.uri))
    decision.metadata.update(meta)
    shutil.copyfile(f"{decision.path}/{DECISION_MD}", decision_report.path)
