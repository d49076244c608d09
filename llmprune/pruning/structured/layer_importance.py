"""Importance of whole decoder layers.

- block influence (ShortGPT, Men et al. 2024): 1 - cos(x_t, y_t) between a layer's input and output hidden
  state, averaged over calibration tokens; a layer that barely turns the residual stream does little.
- skip loss: the calibration loss with that layer alone skipped, minus the full model's.
"""

from __future__ import annotations

import torch


def influence_terms(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Per token 1 - cos(input, output), float32, flattened over (batch, sequence)."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    y = outputs.reshape(-1, outputs.shape[-1]).float()
    return 1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)


def lowest(scores: list[float], count: int) -> list[int]:
    """Indices of the `count` lowest scores, ascending by index (ties: the earlier layer goes first)."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(order[:count])
