"""Cockatoo: the plain-Python core of the training pipeline. Knows nothing of KFP."""

from cockatoo_lib.errors import CockatooError

__all__ = ["CockatooError"]
