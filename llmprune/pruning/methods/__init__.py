"""Pruning methods and weight updates, registered by name. Adding one is adding one file here.

A method is a pure function over tensors; it knows nothing of models, hooks or files:

    @register("name", statistic="input_norms", summary="...", knobs=("my_knob",))
    def name(weight, statistic, target, my_knob) -> (new_weight, keep_mask)

- weight: float32 (rows, in_features). Rows may stack several linears that read the same input (q/k/v,
  gate/up): `target.segments` gives their row counts, so one statistic serves them all.
- statistic: what the runner accumulated over this linear's calibration inputs, of the kind the method
  names (see statistics.py: "input_norms", "hessian", ...); None for a method that needs no data.
- target: this layer's LayerTarget (its own sparsity, after any allocation such as OWL, and the N:M
  pattern). A method never sees the global sparsity, so it cannot read the wrong one.
- knobs: the method's own settings, by name, taken from fields of PruneConfig with the same names.
- keep_mask: bool, True where a weight is kept. The runner verifies the exact count or N:M pattern.

An update (`--update`) re-fits the kept weights after any method's mask:

    @register_update("name", statistic="hessian", summary="...", knobs=(...))
    def name(weight, statistic, keep, **knobs) -> new_weight   # zeros exactly where keep is False

A new statistic is one class registered in statistics.py; a new method or update is one file here,
imported at the bottom of this module, and any knob it reads is one field of PruneConfig.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...errors import LLMPruneError


@dataclass(frozen=True)
class LayerTarget:
    """What one pruning call must achieve."""

    sparsity: float  # this layer's target (OWL or a scan may give every layer its own)
    nm: tuple[int, int] | None = None  # N:M: keep N of every M consecutive inputs of a row
    segments: tuple[int, ...] = ()  # row counts of the stacked linears; () means one matrix


@dataclass(frozen=True)
class Method:
    name: str
    statistic: str | None
    compares: str  # unstructured selection group: "row" (each output row) or "matrix" (each stacked matrix)
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    summary: str
    knobs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Update:
    name: str
    statistic: str
    fn: Callable[..., torch.Tensor]
    summary: str
    knobs: tuple[str, ...] = ()


METHODS: dict[str, Method] = {}
UPDATES: dict[str, Update] = {}


def register(name: str, statistic: str | None, summary: str, compares: str = "row", knobs: tuple[str, ...] = ()):
    def decorate(fn):
        METHODS[name] = Method(name, statistic, compares, fn, summary, tuple(knobs))
        return fn

    return decorate


def register_update(name: str, statistic: str, summary: str, knobs: tuple[str, ...] = ()):
    def decorate(fn):
        UPDATES[name] = Update(name, statistic, fn, summary, tuple(knobs))
        return fn

    return decorate


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise LLMPruneError(f"unknown --method '{name}': choose one of {', '.join(METHODS)} (see --help)")
    return METHODS[name]


def get_update(name: str) -> Update:
    if name not in UPDATES:
        raise LLMPruneError(f"unknown --update '{name}': choose one of none, {', '.join(UPDATES)} (see --help)")
    return UPDATES[name]


from . import magnitude, wanda, sparsegpt, ria, admm, dsnot  # noqa: E402,F401  (registration)
