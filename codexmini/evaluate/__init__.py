"""Stages that report on a model without changing it: `eval` (validation metrics) and `generate` (a sample)."""
