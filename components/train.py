from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import DEFAULT_IMAGES


@dsl.component(base_image=DEFAULT_IMAGES.cuda, install_kfp_package=False)
def train(
    tokenized: Input[Dataset],
    model_type: str,
    overrides: dict,
    base_model: str,
    model: Output[Model],
):
    """Fine-tune on the tokenized splits; the model folder with cockatoo.json."""
    from cockatoo_lib.steps import train_step

    model.metadata.update(train_step(tokenized.path, model_type, overrides, base_model, model.path))
