"""Losses and estimators as pure functions of tensors; no trainer state, nothing of ours above ops/."""
