"""Bias compensation (FLAP's): a removed input channel j of the output projection W contributed
W[:, j] * Z_j; replacing Z_j by its calibration mean keeps the projection's mean output exactly, and that
constant is W[:, removed] @ mean(Z[removed]), folded into the bias."""

from __future__ import annotations

import torch


def removed_mean_contribution(weight: torch.Tensor, channel_mean: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """weight (out, in); channel_mean (in,) over the calibration tokens; keep (in,) bool. Returns (out,)."""
    removed = ~keep
    return (weight[:, removed].double() @ channel_mean[removed].double()).float()
