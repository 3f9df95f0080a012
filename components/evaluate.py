from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from components.images import DEFAULT_IMAGES


@dsl.component(base_image=DEFAULT_IMAGES.cpu, install_kfp_package=False)
def evaluate(
    model: Input[Model],
    tokenized: Input[Dataset],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    classification_metrics: Output[ClassificationMetrics],
    report: Output[HTML],
    model_card: Output[Markdown],
):
    """Score the test split beside the linear baseline: metrics.json, report.html and the model
    card; scalars (model, baseline, per source) to Metrics, the label confusion matrix to
    ClassificationMetrics, the report to HTML, the card to Markdown."""
    import shutil

    from cockatoo_lib.evaluation.evaluate import kfp_metrics
    from cockatoo_lib.steps import EvaluateArgs, evaluate_step, evaluation_files

    results = evaluate_step(EvaluateArgs(model_dir=model.path, tokenized_dir=tokenized.path,
                                         output=evaluation.path))
    scalars, confusion = kfp_metrics(results)
    for name, value in scalars.items():
        metrics.log_metric(name, value)
    classification_metrics.log_confusion_matrix(results["labels"], confusion)
    files = evaluation_files(evaluation.path)
    shutil.copyfile(files["report"], report.path)
    shutil.copyfile(files["model_card"], model_card.path)
    evaluation.metadata.update(test_macro_f1=results["macro_f1"],
                               baseline_test_macro_f1=results["baseline"]["macro_f1"])
