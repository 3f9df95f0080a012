from kfp import dsl
from kfp.dsl import Dataset, Output

from components.images import DEFAULT_IMAGES


@dsl.component(base_image=DEFAULT_IMAGES.cpu, install_kfp_package=False)
def prepare_data(
    data_config: str,
    labels: list,
    seed: int,
    max_samples: int,
    model_type: str,
    overrides: dict,
    base_model: str,
    schedule_time: str,
    data: Output[Dataset],
):
    """Read, map, clean and split the sources; Parquet per split plus manifest.json.

    `schedule_time` is not read: it is part of KFP's cache key, so a scheduled run always
    reads its sources afresh instead of reusing last week's data.
    """
    from cockatoo_lib.steps import PrepareArgs, prepare_step

    data.metadata.update(prepare_step(PrepareArgs.of(locals(), output=data.path)))
