"""FLAP (An et al. 2024, arXiv:2312.11983): the fluctuation metric. A channel whose input barely varies over
the calibration tokens can be replaced by its mean (folded into the bias, see compensation.py) at little
cost: score = Var(Z_j) * ||W[:, j]||^2 for each input channel j of the output projection, summed over the
unit's channels, then standardized over the layer's units (FLAP's step to compare across layers)."""

from . import UnitView, per_unit, handles_importance


@handles_importance("flap")
def flap(view: UnitView):
    fluctuation = sum(per_unit(w.square() * view.channel_variance[:, None, :]) for w in view.cols)
    std = fluctuation.std()
    return (fluctuation - fluctuation.mean()) / (std if std > 0 else 1)
