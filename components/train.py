from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import DEFAULT_IMAGES

# The step's resources, environment and placement, applied to its own pod (which trains when
# nodes is 1) and handed to the TrainJob's nodes when nodes > 1.
PASSTHROUGH = [dsl.TaskConfigPassthrough(field=field, apply_to_task=True) for field in (
    dsl.TaskConfigField.RESOURCES, dsl.TaskConfigField.ENV, dsl.TaskConfigField.KUBERNETES_TOLERATIONS,
    dsl.TaskConfigField.KUBERNETES_NODE_SELECTOR)]


@dsl.component(base_image=DEFAULT_IMAGES.cpu, install_kfp_package=False)
def train_pod_gpus(gpus: int, nodes: int) -> int:
    """The GPUs the train step's own pod holds (its accelerator limit): all `gpus` when it trains
    itself, none while it only waits for a TrainJob's nodes."""
    from cockatoo_lib.steps import train_pod_gpus as gpus_of_the_pod

    return gpus_of_the_pod(gpus, nodes)


@dsl.component(base_image=DEFAULT_IMAGES.cuda, install_kfp_package=False,
               task_config_passthroughs=PASSTHROUGH)
def train(
    tokenized: Input[Dataset],
    model_type: str,
    overrides: dict,
    base_model: str,
    seed: int,
    gpus: int,
    checkpoint_root: str,
    nodes: int,
    task_config: dsl.TaskConfig,
    model: Output[Model],
):
    """Fine-tune on the tokenized splits with the run's seed; the model folder with cockatoo.json.
    With several GPUs, one data-parallel process per GPU; with several nodes, a Kubeflow Trainer
    TrainJob. With a checkpoint root, a retry resumes from the newest checkpoint."""
    from cockatoo_lib.steps import TrainArgs, train_step

    placement = {"resources": task_config.resources, "env": task_config.env,
                 "tolerations": task_config.tolerations, "node_selector": task_config.node_selector}
    model.metadata.update(train_step(TrainArgs.of(
        locals(), tokenized_dir=tokenized.path, tokenized_uri=tokenized.uri, placement=placement,
        output=model.path, output_uri=model.uri)))
