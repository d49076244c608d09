"""Magnitude pruning: drop the smallest |W|, compared within each output row (or each N:M group)."""

from ..masks import nm_mask, row_mask
from . import register


def score_mask(scores, sparsity, config):
    """The comparison groups every score-based method shares: per output row, or per N:M group."""
    return nm_mask(scores, *config.nm) if config.nm else row_mask(scores, sparsity)


@register("magnitude", statistic=None, summary="|W|; needs no calibration data")
def magnitude(weight, statistic, sparsity, config, segments=None):
    keep = score_mask(weight.abs(), sparsity, config)
    return weight * keep, keep
