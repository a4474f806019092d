"""Structural pruning of a sub-model: attention heads and MLP neurons under a MACs budget.

- :mod:`.hsic`: the HSIC estimator and kernels the importance scores are built on.
- :mod:`.importance`: per-neuron and per-head importance, accumulated over batches.
- :mod:`.slicing`: a physically smaller model from kept heads/neurons (and masking, its reference).
- :mod:`.search`: per-layer sparsity candidates within a MACs tolerance, scored on validation.
- :mod:`.cli`: ``devit-mq prune BUNDLE --part K --macs 0.5 --out NEW_BUNDLE``.
"""
