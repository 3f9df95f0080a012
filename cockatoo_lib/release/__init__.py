"""After evaluation: the gate, the MLflow model registry, and predictions.

gate (is the challenger better than the champion and the baseline), model_registry (MLflow:
versions, aliases, downloads), predict (classify new text with a model folder or the champion).
"""
