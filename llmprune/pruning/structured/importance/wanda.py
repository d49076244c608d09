"""Wanda-sp (An et al. 2024's structured Wanda): sum over the unit's weights of |W_ij| * ||X_j||_2, X being
the input each weight multiplies (the layer input for rows of gate/up/q/k/v; the channel itself for columns
of down/o)."""

from . import UnitView, per_unit, handles_importance


@handles_importance("wanda")
def wanda(view: UnitView):
    rows = sum(per_unit(w.abs() * view.input_norms) for w in view.rows)
    cols = sum(per_unit(w.abs() * view.channel_norms[:, None, :]) for w in view.cols)
    return rows + cols
