"""One calibration pass through the dense model that gathers what every axis of a shape needs to be pruned, so
that a search prunes any number of candidate shapes without another pass (Minitron computes all importances
once, on the dense model).

    capture the inputs of layer 0 and every layer's own arguments (the unstructured runner's code)
    for each decoder layer, dense, in order (each_layer):
        channels / heads: the input moments of the first input projection and of the output projection
                          (--method's statistics; their mean is what bias compensation folds in)
        hidden:           each norm's mean |output| per channel, per window (Minitron's activation importance)
        the dense layer's outputs become the next layer's inputs
        layers:           block influence 1 - cos(input, output) (ShortGPT); and the loss increase with this
                          layer alone skipped, from its dense inputs on the first `skip_windows` windows: the
                          model's own forward runs only the layers after it (scan.loss_from_layer)
    the norms after the last layer (the final norm) read the last layer's outputs
    taylor only: the calibration loss's gradient of the channels' and heads' weights (one whole-model pass)

`without(removed)` is the same statistics for the model once decoder layers are gone, so a shape is pruned
axis by axis (layers, heads, channels, hidden) from one pass. Unlike `prune_structured`, which propagates each
pruned layer's outputs to the next layer and so scores a layer's units on inputs the pruned layers before it
made, every statistic here is the dense model's; for one axis alone, layer scores and hidden scores equal
`prune_structured`'s, and channel or head scores equal its first layer's (the later layers' differ by what
pruning the earlier ones changed in their inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ...errors import LLMPruneError
from ...inputs.models import decoder_layers
from ...runtime import resolve_device
from ..runner import ModelLayers, capture_layer_calls, collect_statistics, each_layer, propagate
from .config import StructuredConfig, axis_config
from .importance import get_importance
from .layer_importance import influence_terms

LAYER_RULES = ("influence", "skip", "block")  # how a candidate's removed layers are chosen (search.py)
RULE_OF_IMPORTANCE = {"influence": "influence", "skip_loss": "skip"}  # --layer-importance -> its rule


@dataclass
class DenseStatistics:
    """What a dense calibration pass measured, per decoder layer still present (`layers`: their dense indices)."""

    axes: tuple[str, ...]
    layers: list[int]
    units: list[dict] | None = None  # per layer: {linear: {"input_moments": {...}}} (channels, heads)
    gradients: list[dict] | None = None  # per layer: {linear: d loss / d weight} (taylor)
    influence: list[float] | None = None  # per layer: block influence
    skip: list[float] | None = None  # per layer: loss increase (nats/token) when it alone is skipped
    norms: list[tuple[int | None, torch.Tensor]] = field(default_factory=list)  # (layer or None, sum of squares)
    passes: int = 0  # whole passes over the calibration windows
    layer_forwards: int = 0  # decoder-layer forwards, each over one batch of windows
    skip_windows: int = 0

    def check(self, structure: str, layers: int) -> None:
        if structure not in self.axes or layers != len(self.layers):
            raise LLMPruneError(f"internal error: statistics of {','.join(self.axes)} over {len(self.layers)} layers "
                                f"cannot prune {structure} of a model of {layers}; please report this")

    def without(self, removed: list[int]) -> "DenseStatistics":
        """The statistics of the layers left once those at positions `removed` are gone."""
        gone = set(removed)
        keep = [k for k in range(len(self.layers)) if k not in gone]

        def pick(values):
            return None if values is None else [values[k] for k in keep]

        position = {dense: k for k, dense in enumerate(self.layers)}
        norms = [(layer, s) for layer, s in self.norms if layer is None or position[layer] not in gone]
        return replace(self, layers=pick(self.layers), units=pick(self.units), gradients=pick(self.gradients),
                       influence=pick(self.influence), skip=pick(self.skip), norms=norms)

    def gradient_map(self) -> dict[str, torch.Tensor]:
        """{"i.linear": gradient} as the runner's taylor step names them (i: the layer's position now)."""
        return {f"{i}.{name}": g for i, layer in enumerate(self.gradients) for name, g in layer.items()}

    def hidden_scores(self) -> torch.Tensor:
        """Minitron's activation importance over the norms still present (hidden.activation_importance)."""
        from .hidden import activation_importance

        return activation_importance([s for _, s in self.norms])

    def layer_scores(self, importance: str) -> list[float]:
        scores = {"influence": self.influence, "skip_loss": self.skip}[importance]
        if scores is None:
            raise LLMPruneError(f"internal error: no {importance} scores were measured; please report this")
        return scores

    def summary(self) -> dict:
        return {"statistics_passes": self.passes, "layer_forwards": self.layer_forwards,
                "skip_windows": self.skip_windows}


def unit_spec(model: nn.Module, base: StructuredConfig, axis: str):
    """The runner's UnitSpec of channels or heads (which projections, by name); None where the family has none."""
    from .runner import candidate_sparsities, plan_structure

    try:
        sparsities = candidate_sparsities(model, axis_config(base, axis, 0.5))
    except LLMPruneError:
        return None
    for sparsity in sparsities:
        try:
            return plan_structure(model, axis_config(base, axis, sparsity)).spec
        except LLMPruneError:
            continue
    return None


@torch.no_grad()
def dense_statistics(model: nn.Module, calibration: torch.Tensor | None, base: StructuredConfig, axes: list[str],
                     layer_rules: tuple[str, ...] = ("influence", "skip"), skip_windows: int | None = None,
                     progress: bool = False) -> DenseStatistics:
    """Everything `axes` need, from one pass of `calibration` (n, seqlen) through the dense `model` (see the
    module's text). `layer_rules`: the layer scores to measure ("influence", "skip"); `skip_windows`: how many of
    the calibration windows the skip losses run on (default: base.search_windows)."""
    prefix, layers = decoder_layers(model)
    stats = DenseStatistics(tuple(axes), list(range(len(layers))))
    specs = {axis: spec for axis in ("heads", "channels") if axis in axes
             for spec in [unit_spec(model, base, axis)] if spec is not None}
    if base.method and get_importance(base.method).needs == "gradients" and specs:
        stats.gradients = _gradients(model, layers, calibration, specs, base, progress)
        stats.passes += 1
        stats.layer_forwards += len(layers) * -(-len(calibration) // base.batch_size)
    watched = sorted({name for axis, spec in specs.items() if _needs_moments(base, axis)
                      for name in (spec.rows[0], spec.cols[0])})
    rules = tuple(rule for rule in layer_rules if rule in ("influence", "skip")) if "layers" in axes else ()
    norms = _hidden_norms(model, base) if "hidden" in axes and base.hidden_importance == "activation" else []
    if not (watched or rules or norms):
        return stats  # weights alone: no pass
    if calibration is None:
        raise LLMPruneError(f"--structure {','.join(axes)} with these importances needs calibration data")
    skip = min(len(calibration), skip_windows or base.search_windows) if "skip" in rules else 0
    _pass(stats, model, prefix, layers, calibration, base, watched, rules, norms, skip, progress)
    return stats


def _needs_moments(base: StructuredConfig, axis: str) -> bool:
    config = axis_config(base, axis, 0.5)
    return get_importance(config.method).needs == "statistics" or config.compensate


def _gradients(model, layers, calibration, specs, base, progress) -> list[dict]:
    from .model_passes import loss_gradients

    if calibration is None:
        raise LLMPruneError("--method taylor needs calibration data")
    names = sorted({name for spec in specs.values() for name in spec.rows + spec.cols})
    modules = {f"{i}.{name}": layer.get_submodule(name) for i, layer in enumerate(layers) for name in names}
    with torch.enable_grad():
        found = loss_gradients(model, calibration, modules, base.batch_size, progress)
    return [{name: found[f"{i}.{name}"] for name in names} for i in range(len(layers))]


def _hidden_norms(model, base) -> list[str]:
    """The norms reading the residual stream (hidden.plan_hidden; the same at every width)."""
    from .hidden import choose_width, plan_hidden

    return plan_hidden(model, choose_width(model, keep_fraction=0.5, round_to=base.round_to)).norms


class _NormRecorder:
    """Forward hooks on the stream's norms, summing each window's mean |output| squared per channel, as
    hidden.norm_activation_importance does; `active` is off while the skip losses run the model."""

    def __init__(self, model, names: list[str], prefix: str):
        from .hidden import window_mean_abs

        self.mean_abs, self.active, self.handles = window_mean_abs, True, []
        self.modules = [model.get_submodule(name) for name in names]
        self.layer = [int(name[len(prefix) + 1:].split(".")[0]) if name.startswith(prefix + ".") else None
                      for name in names]
        self.sums: list[torch.Tensor | None] = [None] * len(names)
        self.calls = [0] * len(names)
        for index, module in enumerate(self.modules):
            self.handles.append(module.register_forward_hook(self._hook(index)))

    def _hook(self, index):
        def record(module, args, output):
            if self.active:
                out = output[0] if isinstance(output, (tuple, list)) else output
                squares = (self.mean_abs(out).double() ** 2).sum(0).cpu()
                self.sums[index] = squares if self.sums[index] is None else self.sums[index] + squares
                self.calls[index] += 1

        return record

    def finish(self, calls) -> list[tuple[int | None, torch.Tensor]]:
        """Run the norms that read the last layer's outputs (none of their calls came before), then unhook."""
        try:
            for index, module in enumerate(self.modules):
                if self.calls[index] == 0:
                    for rows in calls.batches:
                        module(calls.hidden[rows].to(calls.device))
                if self.calls[index] != len(calls.batches):
                    raise LLMPruneError(f"internal error: a norm ran {self.calls[index]} times over "
                                        f"{len(calls.batches)} batches; please report this")
        finally:
            self.remove()
        return list(zip(self.layer, self.sums))

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _pass(stats, model, prefix, layers, calibration, base, watched, rules, norms, skip, progress) -> None:
    """The one dense pass (see the module's text); fills `stats` in place."""
    from ..scan import loss_from_layer

    device = resolve_device(base.device)
    recorder = _NormRecorder(model, norms, prefix) if norms else None
    returns_tuple: dict[int, bool] = {}  # per layer: its output type, which loss_from_layer's stubs mimic
    units, influence, skip_loss = [], [], []
    try:
        calls = capture_layer_calls(model, layers, calibration, base.batch_size, device, progress)
        windows = calibration[:skip]
        for i, layer, _ in each_layer(ModelLayers(layers, device), len(layers), 0, calls, -1, None, None, device,
                                      progress, desc="dense statistics"):
            entering = calls.hidden.clone() if rules else None
            handle = layer.register_forward_hook(
                lambda module, args, out, index=i: returns_tuple.__setitem__(index, isinstance(out, (tuple, list))))
            try:
                if watched:
                    units.append(collect_statistics(layer, i, calls, {n: layer.get_submodule(n) for n in watched},
                                                    ("input_moments",), write_outputs=True))
                else:
                    propagate(layer, i, calls)
            finally:
                handle.remove()
            stats.layer_forwards += len(calls.batches)
            if "influence" in rules:
                influence.append(_influence(entering, calls))
            if skip:  # layer i skipped: its dense inputs enter layer i + 1
                skip_loss.append(_quietly(recorder, loss_from_layer, model, layers, i + 1, entering[:skip], windows,
                                          device, returns_tuple))
                stats.layer_forwards += skip * (len(layers) - 1 - i)
        if skip:
            dense_loss = _quietly(recorder, loss_from_layer, model, layers, len(layers), calls.hidden[:skip],
                                  windows, device, returns_tuple)
            stats.skip, stats.skip_windows = [loss - dense_loss for loss in skip_loss], skip
        if recorder is not None:
            stats.norms = recorder.finish(calls)
    finally:
        if recorder is not None:
            recorder.remove()
    stats.passes += 1
    stats.units = units or None
    stats.influence = influence or None


def _quietly(recorder, fn, *args):
    """fn(*args) with the norms' hooks off (the skip losses are no part of the hidden importance)."""
    if recorder is not None:
        recorder.active = False
    try:
        return fn(*args)
    finally:
        if recorder is not None:
            recorder.active = True


def _influence(entering: torch.Tensor, calls) -> float:
    """Mean over every calibration token of 1 - cos(the layer's input, its output), as the runner sums it."""
    total = torch.zeros(2, dtype=torch.float64)
    for rows in calls.batches:
        terms = influence_terms(entering[rows], calls.hidden[rows])
        total += torch.tensor([float(terms.sum()), terms.numel()], dtype=torch.float64)
    return float(total[0] / total[1])
