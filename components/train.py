from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import DEFAULT_IMAGES


@dsl.component(base_image=DEFAULT_IMAGES.cuda, install_kfp_package=False)
def train(
    tokenized: Input[Dataset],
    model_type: str,
    overrides: dict,
    base_model: str,
    seed: int,
    gpus: int,
    checkpoint_root: str,
    nodes: int,
    model: Output[Model],
):
    """Fine-tune on the tokenized splits with the run's seed; the model folder with cockatoo.json.
    With several GPUs, one data-parallel process per GPU; with several nodes, a Kubeflow Trainer
    TrainJob. With a checkpoint root, a retry resumes from the newest checkpoint."""
    from cockatoo_lib.steps import train_step

    model.metadata.update(train_step(tokenized.path, model_type, overrides, base_model, seed, model.path,
                                     gpus, checkpoint_root, model.uri, nodes, tokenized.uri))
