"""Thin KFP components, one step per file. Each body imports cockatoo_lib, calls one function
of cockatoo_lib.steps and records outputs; the logic lives in the library."""

from cockatoo_lib.steps import STEPS
from components.evaluate import evaluate
from components.prepare_data import prepare_data
from components.promote import promote
from components.tokenize import tokenize
from components.train import train

# Each step of cockatoo_lib.steps.STEPS, the one list, and its component.
COMPONENTS = dict(zip(STEPS, (prepare_data, tokenize, train, evaluate, promote), strict=True))

__all__ = ["COMPONENTS", "evaluate", "prepare_data", "promote", "tokenize", "train"]
