"""First-order Taylor (LLM-Pruner, Ma et al. 2023, element-wise): the loss change from zeroing a weight is
about |w * dL/dw|, the gradient being the calibration loss's; a unit's score is the sum over its weights."""

from . import UnitView, per_unit, handles_importance


@handles_importance("taylor")
def taylor(view: UnitView):
    weights, grads = view.rows + view.cols, view.row_grads + view.col_grads
    return sum(per_unit((w * g).abs()) for w, g in zip(weights, grads))
