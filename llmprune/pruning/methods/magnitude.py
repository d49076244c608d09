"""Magnitude pruning: drop the smallest |W|, compared within each output row (or each N:M group)."""

from ..masks import nm_mask, row_mask
from ..registry import MagnitudeConfig, handles


def score_mask(scores, target):
    """The comparison groups every score-based method shares: per output row, or per N:M group."""
    return nm_mask(scores, *target.nm) if target.nm else row_mask(scores, target.sparsity)


@handles(MagnitudeConfig)
def magnitude(weight, statistic, target):
    keep = score_mask(weight.abs(), target)
    return weight * keep, keep
