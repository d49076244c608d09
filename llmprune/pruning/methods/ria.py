"""RIA, relative importance and activations (Zhang et al., ICLR 2024, "Plug-and-Play"):

    score_ij = (|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * ||X_j||_2 ** alpha

a weight matters relative to the other weights of its input channel (the column sum) and of its output
channel (the row sum), scaled by its input's activation norm (alpha = 0.5 in the paper). The mask is
compared within each output row, or within each N:M group, like Wanda.

The paper's channel permutation for N:M (a heuristic reordering of input channels so that large scores
land in different groups) is not implemented: it must permute the producing layer's outputs too, which a
method that sees one matrix cannot do.
"""

from __future__ import annotations

import torch

from ..registry import RiaConfig, handles
from .magnitude import score_mask


def relative_importance(weight: torch.Tensor, segments: tuple[int, ...] = ()) -> torch.Tensor:
    """|W_ij| / (column sum) + |W_ij| / (row sum). Stacked linears (q/k/v, gate/up) share an input but are
    separate matrices: each takes its column sums over its own rows only."""
    magnitude = weight.abs()
    parts = magnitude.split(list(segments)) if segments else (magnitude,)
    column_sums = torch.cat([part.sum(0, keepdim=True).expand_as(part) for part in parts])
    row_sums = magnitude.sum(1, keepdim=True)
    tiny = torch.finfo(magnitude.dtype).tiny  # an all-zero row or column scores 0, not 0/0
    return magnitude / column_sums.clamp_min(tiny) + magnitude / row_sums.clamp_min(tiny)


@handles(RiaConfig)
def ria(weight, input_norms, target, ria_alpha=0.5):
    keep = score_mask(relative_importance(weight, target.segments) * input_norms.pow(ria_alpha), target)
    return weight * keep, keep
