"""Wanda (Sun et al., 2023, arXiv:2306.11695): score |W_ij| * ||X_j||_2, compared within each output row."""

from ..registry import WandaConfig, handles
from .magnitude import score_mask


@handles(WandaConfig)
def wanda(weight, input_norms, target):
    keep = score_mask(weight.abs() * input_norms, target)
    return weight * keep, keep
