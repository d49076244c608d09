"""Pruning methods and weight updates: pure functions over tensors that know nothing of models, hooks or files.
Each is declared in pruning/registry.py (its name, summary, statistic and config class, torch-free) and its
kernel, in a file here, is bound to that config class with `@handles(ItsConfig)`:

    @handles(MineConfig)
    def mine(weight, statistic, target, my_knob) -> (new_weight, keep_mask)

- weight: float32 (rows, in_features). Rows may stack several linears that read the same input (q/k/v,
  gate/up): `target.segments` gives their row counts, so one statistic serves them all.
- statistic: what the runner accumulated over this linear's calibration inputs, of the kind the method
  names (see statistics.py: "input_norms", "hessian", ...); None for a method that needs no data.
- target: this layer's LayerTarget (its own sparsity, after any allocation such as OWL, and the N:M
  pattern). A method never sees the global sparsity, so it cannot read the wrong one.
- knobs: the fields of the method's config class (PruneConfig.method_config), as keywords.
- keep_mask: bool, True where a weight is kept. The runner verifies the exact count or N:M pattern.

An update (`--update`) re-fits the kept weights after any method's mask:

    @handles(UpdateConfig)
    def name(weight, statistic, keep, **knobs) -> new_weight   # zeros exactly where keep is False

A kernel file is imported the first time its handler is asked for, so this package imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..registry import METHODS, UPDATES, Method, Update, get_method, get_update, handles

__all__ = ["LayerTarget", "METHODS", "UPDATES", "Method", "Update", "get_method", "get_update", "handles"]


@dataclass(frozen=True)
class LayerTarget:
    """What one pruning call must achieve."""

    sparsity: float  # this layer's target (OWL or a scan may give every layer its own)
    nm: tuple[int, int] | None = None  # N:M: keep N of every M consecutive inputs of a row
    segments: tuple[int, ...] = ()  # row counts of the stacked linears; () means one matrix
