"""Magnitude: the L2 norm of all of a unit's weights (its rows in the input projections, its columns in the output one)."""

from . import UnitView, per_unit, handles_importance


@handles_importance("magnitude")
def magnitude(view: UnitView):
    return sum(per_unit(w.square()) for w in view.rows + view.cols).sqrt()
