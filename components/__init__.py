"""Thin KFP components, one step per file. Each body imports cockatoo_lib, calls one function
of cockatoo_lib.steps and records outputs; the logic lives in the library."""

from components.evaluate import evaluate
from components.prepare_data import prepare_data
from components.promote import promote
from components.tokenize import tokenize
from components.train import train

__all__ = ["prepare_data", "tokenize", "train", "evaluate", "promote"]
