"""The train step: the trainer and everything it runs on.

trainer (fine-tuning with HF Trainer, thresholds, the model folder), models (loading base and
trained models), optim (8-bit AdamW, layer-wise learning rates), losses, sampling (the order
of rows), rebalance (label weights, resampling), distributed (several processes), checkpoints
(durable checkpoints and resume), trainjob (several nodes through Kubeflow Trainer).
"""
