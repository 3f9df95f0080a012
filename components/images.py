"""The one images setting: every component's base image comes from here. `cockatoo compile
--image-registry R --image-tag T` sets them per build through `Images`."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_REGISTRY = "localhost:5000/cockatoo"
DEFAULT_TAG = "0.1.0"


@dataclass(frozen=True)
class Images:
    registry: str = DEFAULT_REGISTRY
    tag: str = DEFAULT_TAG

    @property
    def cpu(self) -> str:
        """prepare, tokenize and evaluate: images/cpu/Dockerfile."""
        return f"{self.registry}/cockatoo-cpu:{self.tag}"

    @property
    def cuda(self) -> str:
        """train: images/cuda/Dockerfile."""
        return f"{self.registry}/cockatoo-cuda:{self.tag}"


DEFAULT_IMAGES = Images()
