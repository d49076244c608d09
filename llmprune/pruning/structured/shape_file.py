"""--shape FILE: the shape a prune run takes from a file instead of searching for it. Torch-free.

Accepted forms (JSON):

- a candidates.json written by `llmprune search`: its first candidate (the list is best first);
- one shape by hand: ``{"shape": {"channels": 0.25, "hidden": 0.125}}``, each axis (channels, heads, layers,
  hidden) mapped to the fraction of it removed, in (0, 1); an axis absent is left whole.

Either may name the decoder layers to remove (``"layers_removed": [3, 7]``, dense indices, as a search that
compares layer rules writes them); without it the layers are ranked as on any run (--layer-importance).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ...errors import LLMPruneError
from .config import AXES


@dataclass(frozen=True)
class ShapeFile:
    path: str
    shape: dict[str, float]  # axis -> sparsity, in AXES order
    params: int | None = None  # the candidate's exact count, when the file is a search's
    kl: float | None = None
    layers_removed: list[int] | None = None


def read_shape_file(path: str | Path, axes: list[str]) -> ShapeFile:
    """The shape `path` holds, checked against the run's --structure `axes`; one LLMPruneError line if not."""
    where = f"--shape {path}"
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LLMPruneError(f"{where}: no such file (write one with `llmprune search`, or by hand as "
                            '{"shape": {"channels": 0.25}})') from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise LLMPruneError(f"{where}: not a readable JSON file ({err})") from None
    if isinstance(data, dict) and "candidates" in data:
        candidates = data["candidates"]
        if not isinstance(candidates, list) or not candidates or not isinstance(candidates[0], dict):
            raise LLMPruneError(f"{where}: its candidates list is empty or malformed: run `llmprune search` again")
        data = candidates[0]
    if not isinstance(data, dict) or not isinstance(data.get("shape"), dict):
        raise LLMPruneError(f'{where}: expected a candidates.json from `llmprune search` or {{"shape": '
                            f'{{"channels": 0.25, ...}}}}')
    shape = data["shape"]
    unknown = [axis for axis in shape if axis not in AXES]
    if unknown:
        raise LLMPruneError(f"{where}: unknown structure {unknown[0]!r} (the shape's keys are {', '.join(AXES)})")
    missing = [axis for axis in shape if axis not in axes]
    if missing:
        raise LLMPruneError(f"{where} prunes {', '.join(missing)}, which --structure {','.join(axes)} leaves out: "
                            f"add it to --structure")
    for axis, value in shape.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not 0 <= value < 1:
            raise LLMPruneError(f"{where}: {axis} must be the fraction removed, in [0, 1) (got {value!r})")
    shape = {axis: float(shape[axis]) for axis in AXES if shape.get(axis)}
    if not shape:
        raise LLMPruneError(f"{where}: the shape removes nothing: give at least one structure a fraction above 0")
    layers = data.get("layers_removed")
    if layers is not None:
        if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                   for i in layers) or len(set(layers)) != len(layers):
            raise LLMPruneError(f"{where}: layers_removed must be a list of distinct layer indices (got {layers!r})")
        if "layers" not in shape and layers:
            raise LLMPruneError(f"{where}: layers_removed names layers but the shape removes none: give "
                                f'"layers" in the shape')
        layers = sorted(layers) or None
    params = data.get("params")
    kl = data.get("kl_distilled") if data.get("kl_distilled") is not None else data.get("kl")
    return ShapeFile(str(path), shape, params if isinstance(params, int) else None,
                     kl if isinstance(kl, (int, float)) else None, layers)
