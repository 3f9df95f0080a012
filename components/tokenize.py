from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.images import DEFAULT_IMAGES


@dsl.component(base_image=DEFAULT_IMAGES.cpu, install_kfp_package=False)
def tokenize(
    data: Input[Dataset],
    model_type: str,
    overrides: dict,
    base_model: str,
    cache_root: str,
    tokenized: Output[Dataset],
) -> NamedTuple("TokenizeOutputs", [("cache_uri", str)]):
    """Tokenize through the content-addressed cache; returns the cache entry's URI, which
    names the tokenized data by content (the pipeline imports it for train and evaluate)."""
    from collections import namedtuple

    from cockatoo_lib.steps import TokenizeArgs, tokenize_step

    meta = tokenize_step(TokenizeArgs.of(locals(), data_dir=data.path, output=tokenized.path,
                                         output_uri=tokenized.uri))
    tokenized.metadata.update(meta)
    return namedtuple("TokenizeOutputs", ["cache_uri"])(meta["cache_uri"])
