"""Pruning methods, registered by name. Adding one is adding one module here that calls `register`.

A method is a pure function over tensors:
    fn(weight, statistic, sparsity, config, segments) -> (new_weight, keep_mask)
- weight: float32 (rows, in_features); rows may stack several linears that read the same input
  (q/k/v, gate/up), `segments` giving their row counts, so one statistic serves them all.
- statistic: what the runner accumulated over the calibration inputs, by the method's `statistic`
  kind: None, "input_norms" (||X_j||_2 per input feature) or "hessian" (2/n * X X^T).
- sparsity: this layer's target; config: the PruneConfig (pattern, blocksize, percdamp...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ...errors import LLMPruneError


@dataclass(frozen=True)
class Method:
    name: str
    statistic: str | None
    compares: str  # unstructured selection group: "row" (each output row) or "matrix" (each stacked matrix)
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    summary: str


METHODS: dict[str, Method] = {}


def register(name: str, statistic: str | None, summary: str, compares: str = "row"):
    def decorate(fn):
        METHODS[name] = Method(name, statistic, compares, fn, summary)
        return fn

    return decorate


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise LLMPruneError(f"unknown method '{name}': choose one of {', '.join(METHODS)}")
    return METHODS[name]


from . import magnitude, wanda, sparsegpt  # noqa: E402,F401  (registration)
