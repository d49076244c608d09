"""Magnitude: the L2 norm of all of a unit's weights (its rows in the input projections, its columns in the output one)."""

from . import UnitView, per_unit, register_importance


@register_importance("magnitude", needs=None, summary="L2 norm of the unit's weights; needs no calibration data")
def magnitude(view: UnitView):
    return sum(per_unit(w.square()) for w in view.rows + view.cols).sqrt()
