"""Cockatoo: the plain-Python core of the training pipeline. Knows nothing of KFP.

One package per part of the pipeline: plan (the model catalogue and the settings a run
resolves), data (the prepare step), tokenize (the tokenize step), training (the train step),
evaluation (the evaluate step), release (the gate, the MLflow model registry, predict), storage
(outputs, published files, remote reads). Above them: steps (one function per pipeline step,
what the components call) and cli (the library's commands). errors and versions serve all.
"""

from cockatoo_lib.errors import CockatooError

__all__ = ["CockatooError"]
