"""The evaluate step: metrics, the linear baseline, the report and the model card.

metrics (per label and macro, thresholds), baseline (character n-grams and a linear model on
the same rows), evaluate (the test split scored, metrics JSON, HTML report), model_card.
"""
