"""The plan: what a run trains and with which settings, decided before any work.

catalogue (one record per model type: base model, defaults, the plan a run resolves from them
and the user's overrides), batch_split (the micro-batch and accumulation for a card and a
number of processes), limits (valid ranges of the numeric options that are not plan settings).
"""
