"""The one images setting: every component's base image comes from here. `cockatoo compile
--image-registry R --image-tag T` sets them per build; `cockatoo run --in-image I` runs every
step in one image."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_REGISTRY = "localhost:5000/cockatoo"
DEFAULT_TAG = "0.1.0"


@dataclass(frozen=True)
class Images:
    # prepare, tokenize, evaluate, promote: images/Dockerfile, target cpu
    cpu: str
    # train: images/Dockerfile, target cuda
    cuda: str

    @classmethod
    def of(cls, registry: str = DEFAULT_REGISTRY, tag: str = DEFAULT_TAG) -> Images:
        """The images `make images REGISTRY=... TAG=...` builds and pushes."""
        return cls(f"{registry}/cockatoo-cpu:{tag}", f"{registry}/cockatoo-cuda:{tag}")

    @classmethod
    def single(cls, image: str) -> Images:
        """Every step, train included, in one image (the CPU image on a machine without GPUs)."""
        return cls(image, image)


DEFAULT_IMAGES = Images.of()
