from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components.images import DEFAULT_IMAGES


@dsl.component(base_image=DEFAULT_IMAGES.cpu, install_kfp_package=False)
def evaluate(
    model: Input[Model],
    tokenized: Input[Dataset],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    classification_metrics: Output[ClassificationMetrics],
    report: Output[HTML],
):
    """Score the test split: metrics.json and report.html, per-label scalars to Metrics, the
    label confusion matrix to ClassificationMetrics, the report to HTML."""
    import shutil

    from cockatoo_lib.steps import evaluate_step, kfp_metrics, report_path

    results = evaluate_step(model.path, tokenized.path, evaluation.path)
    scalars, confusion = kfp_metrics(results)
    for name, value in scalars.items():
        metrics.log_metric(name, value)
    classification_metrics.log_confusion_matrix(results["labels"], confusion)
    shutil.copyfile(report_path(evaluation.path), report.path)
    evaluation.metadata["test_macro_f1"] = results["macro_f1"]
