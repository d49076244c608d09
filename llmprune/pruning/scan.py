"""Per-layer sensitivity: the held-out loss when only one unit of the model is pruned, and an allocation of
per-layer sparsity from it.

A unit is one decoder layer (`by="layer"`) or one kind of linear across all layers (`by="linear"`, e.g.
every `mlp.down_proj`). A cell is one (unit, sparsity): the unit pruned as the runner would with --skip keeping
everything else dense, one loss evaluation, and the unit's dense weights restored.

By layer, every earlier layer is dense, so one dense pass serves all cells: layer i's calibration statistics
are gathered from the dense calibration states entering it while those states move on to layer i+1 (one
calibration pass per layer in all, solved once per sparsity), and the dense validation states entering
layer i are kept, so a cell's loss runs only layers i..N-1. Neither needs more than one layer's states at once.
By linear, every layer is pruned, so each cell is a whole prune by the runner.

Score the loss on windows that are not the ones results are reported on (e.g. validation windows cut from
the calibration text), or an allocation chosen from the scan flatters itself.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import PruneConfig
from ..errors import LLMPruneError
from ..evaluation.perplexity import perplexity
from ..inputs.models import decoder_layers, linears
from .methods import get_method, get_update
from .runner import (ModelLayers, PruneReport, capture_layer_calls, check_model, collect_statistics,
                     propagate, prunable_linears, prune, prune_group, share_groups)


@dataclass
class ScanTable:
    """loss[u][k]: mean held-out token NLL (nats) with only unit u pruned at sparsities[k]."""

    method: str
    by: str  # "layer" or "linear"
    units: list[str]  # "0", "1", ... for layers; "self_attn.q_proj", ... for linears
    sparsities: list[float]
    dense_loss: float
    loss: list[list[float]]
    sizes: list[int]  # prunable parameters of each unit (after the config's --skip)

    def save(self, path: Path | str) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path | str) -> "ScanTable":
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise LLMPruneError(f"cannot read the scan table {path} ({err}): write it with `llmprune scan`") from None

    def to_markdown(self) -> str:
        head = f"| {self.by} | params | " + " | ".join(f"loss @ {s:g}" for s in self.sparsities) + " |"
        lines = [head, "|" + "---|" * (len(self.sparsities) + 2), "| dense | | " + " | ".join(
            f"{self.dense_loss:.4f}" for _ in self.sparsities) + " |"]
        lines += [f"| {u} | {n} | " + " | ".join(f"{v:.4f}" for v in row) + " |"
                  for u, row, n in zip(self.units, self.loss, self.sizes)]
        return "\n".join(lines) + "\n"


def scan_units(model, by: str) -> list[tuple[str, str]]:
    """(unit, regex matching the full name of every linear *outside* the unit), in model order."""
    prefix, layers = decoder_layers(model)
    if by == "layer":
        return [(str(i), rf"^(?!{re.escape(prefix)}\.{i}\.)") for i in range(len(layers))]
    if by == "linear":
        kinds = list(dict.fromkeys(name for layer in layers for name in linears(layer)))
        return [(kind, rf"^(?!{re.escape(prefix)}\.\d+\.{re.escape(kind)}$)") for kind in kinds]
    raise LLMPruneError(f"scan by '{by}': choose layer or linear")


def scan_sensitivity(model, calibration: torch.Tensor | None, windows: torch.Tensor, config: PruneConfig,
                     sparsities: list[float], by: str = "layer", device=None, progress: bool = True) -> ScanTable:
    """Prune each unit alone at each sparsity with `config` (its method, pattern, update and knobs; uniform
    allocation), score the loss on `windows` (n, seqlen), restore the unit. The model is left dense."""
    device = device or config.device or "cpu"
    # validated here, up front
    configs = [replace(config, sparsity=s, allocation="uniform", allocation_config=None) for s in sparsities]
    check_model(model, configs[0])  # fails at once on a bad N:M width or a --skip that leaves nothing
    prefix, layers = decoder_layers(model)
    units = []  # (name, the configs of its cells, its linears by full name)
    for name, outside in scan_units(model, by):
        skip = f"(?:{config.skip})|{outside}" if config.skip else outside
        cell = replace(configs[0], skip=skip)
        targets = {n: m for i, layer in enumerate(layers)
                   for n, m in prunable_linears(layer, f"{prefix}.{i}", cell).items()}
        if not targets:
            if by == "layer":  # an allocation needs every layer
                raise LLMPruneError(f"--skip keeps all of layer {name} dense: scan by linear, or narrow --skip")
            continue  # a kind of linear that --skip keeps dense everywhere is not a unit
        units.append((name, [replace(c, skip=skip) for c in configs], targets))

    bar = tqdm(total=len(units) * len(sparsities), desc=f"scan by {by}", unit="prune", disable=not progress)
    scan = _scan_layers if by == "layer" else _scan_whole_prunes
    dense_loss, table = scan(model, layers, units, calibration, windows, config, device, bar)
    bar.close()
    sizes = [sum(m.weight.numel() for m in targets.values()) for _, _, targets in units]
    return ScanTable(config.method, by, [name for name, _, _ in units], [float(s) for s in sparsities], dense_loss,
                     table, sizes)


def _restore(modules, weights) -> None:
    with torch.no_grad():
        for module, weight in zip(modules, weights):
            module.weight.copy_(weight)


def _scan_whole_prunes(model, layers, units, calibration, windows, config, device, bar):
    """Each cell an ordinary prune of the whole model by the runner, then the model's own loss."""
    def loss() -> float:
        return math.log(perplexity(model, windows, device, progress=False, chunk=0))

    dense_loss = loss()
    table = []
    for name, cells, targets in units:
        modules = list(targets.values())
        dense = [m.weight.detach().clone() for m in modules]
        row = []
        for cell in cells:
            bar.set_postfix_str(f"{name} @ {cell.sparsity:g}")
            prune(model, calibration, cell, progress=False)
            row.append(loss())
            _restore(modules, dense)
            bar.update()
        table.append(row)
    return dense_loss, table


@torch.inference_mode()
def _scan_layers(model, layers, units, calibration, windows, config, device, bar):
    """Unit i is layer i, in order: gather layer i's statistics from the dense calibration states entering it
    (those states move on through the dense layer in the same pass), solve each sparsity, and score each from
    the kept dense validation states entering layer i. The dense loss comes last, from the states leaving the
    last layer, at no layer's cost."""
    method = get_method(config.method)
    update = get_update(config.update) if config.update != "none" else None
    kinds = tuple(dict.fromkeys(k for k in (method.statistic, update and update.statistic) if k))
    if kinds and calibration is None:
        raise LLMPruneError(f"method '{method.name}' needs calibration data")
    calls = capture_layer_calls(model, layers, calibration, config.batch_size, device, False) if kinds else None
    validation = capture_layer_calls(model, layers, windows, 1, device, False)  # one window a call, as perplexity
    store = ModelLayers(layers, device)
    report = PruneReport(method.name, config.sparsity, config.pattern, "uniform")  # prune_group's log, unused
    returns_tuple: dict[int, bool] = {}  # per layer: whether it returns (hidden, ...) rather than hidden
    table = []
    for i, (name, cells, targets) in enumerate(units):
        modules = list(targets.values())
        layer = store.load(i)
        statistics = collect_statistics(layer, i, calls, targets, kinds, write_outputs=True) if kinds else {}
        entering = validation.hidden.clone()
        def output_type(module, args, out, index=i):
            returns_tuple[index] = isinstance(out, (tuple, list))

        handle = layer.register_forward_hook(output_type)
        try:
            propagate(layer, i, validation)
        finally:
            handle.remove()
        dense = [m.weight.detach().clone() for m in modules]
        pruned = []  # solved while the layer is on the device, scored below with the whole model
        for cell in cells:
            for group in share_groups(targets, statistics):
                prune_group(group, targets, statistics.get(group[0], {}), method, update, cell.sparsity, cell,
                            report, layer_index=i)
            pruned.append([m.weight.detach().clone() for m in modules])
            _restore(modules, dense)
        store.done(i, layer)
        row = []
        for cell, weights in zip(cells, pruned):
            bar.set_postfix_str(f"layer {name} @ {cell.sparsity:g}")
            _restore(modules, weights)
            row.append(loss_from_layer(model, layers, i, entering, windows, device, returns_tuple))
            _restore(modules, dense)
            bar.update()
        table.append(row)
    dense_loss = loss_from_layer(model, layers, len(layers), validation.hidden, windows, device, returns_tuple)
    return dense_loss, table


def loss_from_layer(model, layers, first: int, entering: torch.Tensor, windows: torch.Tensor, device,
                    returns_tuple: dict[int, bool]) -> float:
    """Mean token NLL on `windows` by the model's own forward (embeddings, masks, the layers from `first` on,
    final norm, head), with the layers before `first` replaced by stubs: the last stub hands on `entering`
    (the hidden states entering layer `first`, one row per window), so those layers cost nothing.
    `returns_tuple[j]`: layer j's output type, which its stub mimics."""
    feed = iter(entering)
    fed = [0]

    def stub(index):
        def forward(hidden_states, *args, **kwargs):
            if index == first - 1:
                hidden_states = next(feed).unsqueeze(0)
                fed[0] += 1
            return (hidden_states,) if returns_tuple[index] else hidden_states

        return forward

    for j in range(first):
        layers[j].forward = stub(j)
    try:
        # logits whole (chunk=0): the chunked path first probes the model on a short window, which the stubs
        # would answer with a window's entering states
        loss = math.log(perplexity(model, windows, device, progress=False, chunk=0))
    finally:
        for j in range(first):
            del layers[j].forward  # back to the class's forward
    if first and fed[0] != len(windows):
        raise LLMPruneError(f"internal error: the model ran layer {first - 1} {fed[0]} times for {len(windows)} "
                            "windows; please report this")
    return loss


def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower convex hull of points sorted by x (monotone chain)."""
    hull: list[tuple[float, float]] = []
    for p in points:
        while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                  - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) <= 0:
            hull.pop()
        hull.append(p)
    return hull


def _cost_curve(sparsities: list[float], increases: list[float], low: float, high: float) -> list[tuple[float, float]]:
    """A layer's loss increase as a function of its sparsity on [low, high]: 0 when dense, the scanned points,
    linear between them and continued at the last slope beyond them; monotone, then convexified."""
    xs = [0.0] + list(sparsities)
    ys = [0.0] + [max(0.0, v) for v in increases]
    for k in range(1, len(ys)):
        ys[k] = max(ys[k], ys[k - 1])  # pruning more never helps: a dip is noise

    def at(s: float) -> float:
        k = next((k for k in range(1, len(xs)) if s <= xs[k]), len(xs) - 1)
        return ys[k - 1] + (ys[k] - ys[k - 1]) * (s - xs[k - 1]) / (xs[k] - xs[k - 1])

    grid = sorted({low, high, *[x for x in xs if low < x < high]})
    return _lower_hull([(s, at(s)) for s in grid])


def scan_allocation(table: ScanTable, target: float, sizes: list[int] | None = None,
                    max_shift: float = 0.1) -> list[float]:
    """Per-layer sparsities from a by-layer scan: each layer stays within target +/- max_shift (and [0, 0.99]),
    the parameter-weighted mean is exactly `target`, and the total loss increase, modelled as the sum of each
    layer's scanned increase (interpolated, convexified), is least: the least sensitive layers, per parameter,
    are pruned most. Scan a sparsity at or above target + max_shift for the top of that range to be measured
    rather than extrapolated."""
    if table.by != "layer":
        raise LLMPruneError(f"--allocation scan needs a scan by layer (this one is by {table.by})")
    sizes = list(table.sizes if sizes is None else sizes)
    if len(sizes) != len(table.units):
        raise LLMPruneError(f"the scan has {len(table.units)} layers but the model has {len(sizes)}: "
                            f"scan this model")
    if min(sizes) <= 0:
        raise LLMPruneError("--allocation scan gives every layer a sparsity, but --skip keeps a whole layer dense: "
                            "narrow --skip")
    if not 0 <= target < 1 or max_shift < 0:
        raise LLMPruneError(f"--sparsity {target:g} must be in [0, 1) and the shift {max_shift:g} not negative")
    if sorted(table.sparsities) != table.sparsities or not table.sparsities or min(table.sparsities) <= 0:
        raise LLMPruneError("the scan's sparsities must be positive and increasing")
    low, high = max(0.0, target - max_shift), min(0.99, target + max_shift)
    # Each convex curve is a run of segments of rising slope; filling the cheapest loss per pruned parameter
    # first, across layers, is optimal for a sum of convex costs under one linear budget.
    segments = []
    for i, row in enumerate(table.loss):
        hull = _cost_curve(table.sparsities, [v - table.dense_loss for v in row], low, high)
        for (s0, c0), (s1, c1) in zip(hull, hull[1:]):
            segments.append(((c1 - c0) / (s1 - s0) / sizes[i], i, s0, s1))
    sparsity = [low] * len(sizes)
    budget = target * sum(sizes) - low * sum(sizes)  # parameters still to prune beyond `low` everywhere
    for _, i, s0, s1 in sorted(segments):
        if budget <= 0:
            break
        step = min(s1 - s0, budget / sizes[i])
        sparsity[i] = s0 + step
        budget -= step * sizes[i]
    # Float rounding: put the last crumb of the budget on the largest layer still inside its range.
    total = sum(sizes)
    residue = target - sum(s * n for s, n in zip(sparsity, sizes)) / total
    movable = [i for i in range(len(sizes)) if low <= sparsity[i] + residue * total / sizes[i] <= high]
    if movable:
        i = max(movable, key=lambda k: sizes[k])
        sparsity[i] += residue * total / sizes[i]
    return sparsity


def write_heatmap(table: ScanTable, path: Path | str) -> None:
    """A PNG: one row per sparsity, one column per unit, colour = loss increase over the dense model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    increase = [[table.loss[u][k] - table.dense_loss for u in range(len(table.units))]
                for k in range(len(table.sparsities))]
    figure = Figure(figsize=(max(6.0, 0.3 * len(table.units) + 2), 1.0 + 0.5 * len(table.sparsities)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(increase, aspect="auto", cmap="viridis", interpolation="nearest")
    axes.set_xticks(range(len(table.units)), table.units, rotation=90 if table.by == "linear" else 0, fontsize=7)
    axes.set_yticks(range(len(table.sparsities)), [f"{s:g}" for s in table.sparsities])
    axes.set_xlabel(table.by)
    axes.set_ylabel("sparsity")
    axes.set_title(f"{table.method}: held-out loss increase when only this {table.by} is pruned")
    figure.colorbar(image, ax=axes, label="loss - dense loss (nats)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def run_scan(run, prune_config: PruneConfig, sparsities: list[float], by: str, val_windows: int, output,
             overwrite: bool = False, progress: bool = True) -> Path:
    """The `scan` command: load, cut validation windows from the END of the calibration text and calibration
    windows from the rest (never the held-out part, so an allocation does not flatter itself), scan, and write
    scan.json, scan.md and scan.png into `output` atomically. Returns the table's path."""
    from ..inputs.data import calibration_windows, check_source, load_text, tokenize
    from ..inputs.models import load_model, resolve_model
    from ..output.atomic import atomic_directory, check_output
    from ..runtime import resolve_device, resolve_dtype

    if not sparsities or any(not 0 < s < 1 for s in sparsities):
        raise LLMPruneError(f"--sparsities must lie in (0, 1) (got {sparsities})")
    if val_windows < 1:
        raise LLMPruneError("--val-windows must be at least 1")
    check_output(output, overwrite)
    resolve_model(run.model)
    pc = prune_config
    check_source(run.calib, "calib", (pc.nsamples + val_windows) * pc.seqlen, "--nsamples, --seqlen or --val-windows")
    device = resolve_device(pc.device)
    model, tokenizer, _ = load_model(run.model, resolve_dtype(run.dtype, device), run.trust_remote_code)
    tokens = tokenize(tokenizer, load_text(run.calib, "calib"))
    split = tokens.numel() - val_windows * pc.seqlen
    windows = tokens[split:].view(val_windows, pc.seqlen)
    calibration = calibration_windows(tokens[:split], pc.nsamples, pc.seqlen, pc.seed)
    table = scan_sensitivity(model, calibration, windows, pc, sparsities, by, device, progress)
    with atomic_directory(output, overwrite) as staging:
        table.save(staging / "scan.json")
        (staging / "scan.md").write_text(table.to_markdown())
        write_heatmap(table, staging / "scan.png")
    return Path(output) / "scan.json"
