"""Importance of removable units (MLP channels, attention heads, KV groups), registered by name.

An importance is a pure function over tensors: `fn(view: UnitView) -> scores (units,)`, higher = keep.
It knows nothing of models or hooks: the runner fills in the view, and only the parts the importance
`needs` ("statistics": calibration moments of the layer's inputs; "gradients": the calibration loss's
gradient of the unit's weights; None: weights alone). Adding one is its declaration in pruning/registry.py
(name, needs, summary) and one file here, imported at the bottom.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ... import registry


@dataclass
class UnitView:
    """One layer's weights grouped by removable unit, float32. A unit is an MLP channel (rows of gate/up,
    a column of down), a query head (head_dim rows of q, head_dim columns of o) or a KV group (its query
    heads' rows of q, its head's rows of k and v, the matching columns of o)."""

    rows: list[torch.Tensor]  # each (units, rows_per_unit, in_features): projections that read the layer input
    cols: list[torch.Tensor]  # each (units, out_features, cols_per_unit): the projection that writes the output
    input_norms: torch.Tensor | None = None  # (in_features,) ||X_j||_2 over calibration tokens of the layer input
    channel_norms: torch.Tensor | None = None  # (units, cols_per_unit) ||Z_j||_2 of the output projection's inputs
    channel_variance: torch.Tensor | None = None  # (units, cols_per_unit) variance of those inputs over tokens
    row_grads: list[torch.Tensor] | None = None  # d loss / d rows, summed over the calibration windows
    col_grads: list[torch.Tensor] | None = None


@dataclass(frozen=True)
class Importance:
    name: str
    needs: str | None  # "statistics", "gradients" or None
    fn: Callable[[UnitView], torch.Tensor]
    summary: str


IMPORTANCES: dict[str, Importance] = {}


def handles_importance(name: str):
    """Bind a scoring function to the importance declared under `name` in pruning/registry.py."""
    def decorate(fn):
        declared = registry.get_importance(name)
        IMPORTANCES[name] = Importance(name, declared.needs, fn, declared.summary)
        return fn

    return decorate


def get_importance(name: str) -> Importance:
    registry.get_importance(name)  # an unknown name fails with the registry's message
    return IMPORTANCES[name]


def per_unit(tensor: torch.Tensor) -> torch.Tensor:
    """Sum everything but the unit axis."""
    return tensor.reshape(tensor.shape[0], -1).sum(1)


from . import magnitude, wanda, flap, taylor  # noqa: E402,F401  (registration)
