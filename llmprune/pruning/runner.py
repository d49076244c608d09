"""The layer-by-layer runner: the whole data flow of a prune, in the order it happens.

    capture the inputs of layer 0, and the keyword arguments the model gives each layer
    for each decoder layer (each_layer):
        move it to the device
        pass 1: stream the calibration batches through it, hooks accumulating input statistics
        prune its linears from those statistics (one solve per group of linears sharing an input)
        pass 2: stream the batches through the pruned layer: its outputs are the next layer's inputs
        checkpoint it, move it back

Only the current layer is on the device; the rest of the model stays where it was loaded. Structured pruning
(structured/runner.py) walks the layers with the same each_layer, only its middle step differs. Three optional
hooks take this loop to models larger than memory, crashes and several processes (llmprune/scale/):
    store:      where layers live: load(i) -> the layer on the device, done(i, layer) puts it back
    checkpoint: restore(layers, calls, report[, reshape]) -> the first layer left to prune; save(i, layer, calls,
                report)
    parallel:   reduce(statistic) sums a statistic over ranks; rank 0 solves and broadcast(modules) shares it
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import PruneConfig
from ..errors import LLMPruneError
from ..report import StructureRecord
from ..runtime import elapsed, resolve_device
from .experts import ExpertPruning, kept_from_linears
from .masks import pruned_count
from .methods import LayerTarget, Method, get_method, get_update
from ..inputs.models import decoder_layers, linears, set_weight_matrix, weight_matrix
from .owl import outlier_ratio, owl_sparsities
from .statistics import new_statistic


PHASES = ("capture", "allocation", "statistics", "solve", "propagate")


class _StopForward(Exception):
    """Raised from a hook once everything needed from a forward pass has been seen."""


@dataclass
class LayerCalls:
    """What the model passes its decoder layers, batch by batch: layer 0's hidden states, and for every
    layer its own positional and keyword arguments (sliding-window models give layers different masks)."""

    hidden: torch.Tensor  # (nsamples, seqlen, hidden) on the device or in a file; overwritten layer by layer
    batches: list[slice]
    args: list[list[tuple]]  # [batch][layer] -> positional args after hidden_states
    kwargs: list[list[dict]]  # [batch][layer] -> keyword args
    device: torch.device | None = None  # where a batch of `hidden` is moved to run (it may be offloaded)


@dataclass
class PruneReport:
    """What a prune did: per-linear results, per-layer targets and wall time per phase."""

    method: str
    sparsity: float
    pattern: str
    allocation: str
    layers: list[dict] = field(default_factory=list)
    layer_sparsity: list[float] = field(default_factory=list)
    seconds: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    structure: StructureRecord | None = None  # what a structured prune removed (pruning/structured/runner.py)
    moe: dict | None = None  # experts pruned, tokens routed to each (pruning/experts.py); None without experts
    coverage: dict | None = None  # per kind of weight: pruned and left dense, and any weight left unaccounted
    tally: dict = field(default_factory=dict)  # pruning/experts.py's running record (expert matrices, routing,
    # every weight's accounting row), kept by a checkpoint

    @property
    def achieved_sparsity(self) -> float:
        pruned = self.layers + self.tally.get("experts", [])
        return sum(layer["zeros"] for layer in pruned) / max(1, sum(layer["numel"] for layer in pruned))

    def to_dict(self) -> dict:
        return {
            "method": self.method, "sparsity": self.sparsity, "pattern": self.pattern,
            "allocation": self.allocation, "achieved_sparsity": self.achieved_sparsity,
            "layer_sparsity": self.layer_sparsity,
            "layers": [{k: v for k, v in layer.items() if k not in ("zeros", "numel")} for layer in self.layers],
            "seconds": dict(self.seconds),
            "structure": self.structure.to_dict() if self.structure is not None else None,
            "moe": self.moe, "coverage": self.coverage,
        }

    def state(self) -> dict:
        """What a checkpoint keeps of the report so far (JSON)."""
        return {"layers": self.layers, "layer_sparsity": self.layer_sparsity, "seconds": self.seconds,
                "structure": self.structure.to_dict() if self.structure is not None else None, "tally": self.tally}

    def restore_state(self, saved: dict) -> None:
        """Back to what `state()` returned, in place (the record and dicts others hold stay the same objects)."""
        self.layers[:], self.layer_sparsity[:] = saved["layers"], saved["layer_sparsity"]
        self.seconds.update(saved["seconds"])
        for key, value in saved.get("tally", {}).items():  # in place: the runner's expert step holds these
            held = self.tally[key]
            if isinstance(held, dict):
                held.clear()
                held.update(value)
            else:
                held[:] = value
        if saved.get("structure") is not None:
            record = StructureRecord.from_dict(saved["structure"])
            for name in vars(record):
                setattr(self.structure, name, getattr(record, name))


@torch.inference_mode()
def prune(model: nn.Module, calibration: torch.Tensor | None, config: PruneConfig, progress: bool = True,
          checked: bool = False, store=None, checkpoint=None, parallel=None,
          offload_activations=None) -> PruneReport:
    """Prune `model` in place, layer by layer. `calibration` is (nsamples, seqlen) token ids (this rank's
    share under `parallel`); the magnitude method with uniform allocation needs none. `checked`: the caller
    already ran check_model (the pipeline does, right after loading), so every weight is not scanned twice.
    `offload_activations`: a directory where the calibration activations are kept in a file, not memory."""
    method = get_method(config.method)
    update = get_update(config.update) if config.update != "none" else None
    kinds = tuple(dict.fromkeys(k for k in (method.statistic, update and update.statistic) if k))
    device = resolve_device(config.device)
    layers, targets = find_targets(model, config, allow_none=True) if checked else check_model(model, config)
    report = PruneReport(method.name, config.sparsity, config.pattern, config.allocation)
    experts = ExpertPruning(model, config, kinds, report.tally)
    if not any(targets) and not experts.layers_with_experts:
        raise LLMPruneError("no linear layer is left to prune (check --skip)")
    if parallel is not None and experts.layers_with_experts:
        raise LLMPruneError("data-parallel pruning does not reach the experts of a mixture of experts yet: run it "
                            "in one process")
    store = store or ModelLayers(layers, device)
    reduce = parallel.reduce if parallel is not None else None
    if not kinds and config.allocation == "uniform":
        calls = None  # no data flows: every layer is pruned from its weights alone
    else:
        if calibration is None:
            raise LLMPruneError(f"method '{method.name}' needs calibration data")
        start = time.perf_counter()
        calls = capture_layer_calls(model, layers, calibration, config.batch_size, device, progress,
                                    offload_activations)
        report.seconds["capture"] += elapsed(start, device)
    first = checkpoint.restore(layers, calls, report) if checkpoint is not None else 0
    if first == 0:
        report.layer_sparsity = allocate_sparsity(store, targets, calls, config, device, report, progress, reduce)

    last = max(i for i, layer_targets in enumerate(targets)  # no data flows past it
               if layer_targets or i in experts.layers_with_experts)
    propagate_to = last if calls is not None and kinds else -1  # a layer --skip keeps whole still feeds the next
    for i, layer, bar in each_layer(store, len(layers), first, calls, propagate_to, checkpoint, report, device,
                                    progress):
        statistics = {}
        if calls is not None and kinds and targets[i]:
            bar.set_postfix_str(f"layer {i + 1}/{len(layers)}: statistics")
            start = time.perf_counter()
            statistics = collect_statistics(layer, i, calls, targets[i], kinds, reduce=reduce)
            report.seconds["statistics"] += elapsed(start, device)
        expert_statistics = experts.collect(layer, i, calls) if calls is not None else {}  # the dense layer's
        start = time.perf_counter()
        for group in share_groups(targets[i], statistics):
            bar.set_postfix_str(f"layer {i + 1}/{len(layers)}: {'+'.join(n.rsplit('.', 1)[-1] for n in group)}")
            if parallel is None or parallel.rank == 0:
                prune_group(group, targets[i], statistics.get(group[0], {}), method, update,
                            report.layer_sparsity[i], config, report, layer_index=i)
        experts.prune(layer, i, expert_statistics, method, update, report.layer_sparsity[i])
        experts.account(layer, i, targets[i])
        if parallel is not None:
            parallel.broadcast(list(targets[i].values()))
        report.seconds["solve"] += elapsed(start, device)
        del statistics, expert_statistics  # (a Hessian of the MLP width) not held while the outputs propagate
    report.moe, report.coverage = experts.summary(), experts.coverage()
    return report


def each_layer(store, count: int, first: int, calls, propagate_to: int, checkpoint, report, device, progress,
               desc: str = "pruning"):
    """The loop every prune shares: yields (i, layer on the device, progress bar) for layers first..count-1; once
    the caller has worked on the layer, its outputs become the next layer's inputs (for layers before
    `propagate_to`: no data flows further), it is checkpointed and given back to the store."""
    bar = tqdm(total=count, initial=first, desc=desc, unit="layer", disable=not progress)
    for i in range(first, count):
        layer = store.load(i)
        yield i, layer, bar
        if calls is not None and i < propagate_to:
            bar.set_postfix_str(f"layer {i + 1}/{count}: propagate")
            start = time.perf_counter()
            propagate(layer, i, calls)
            report.seconds["propagate"] = report.seconds.get("propagate", 0.0) + elapsed(start, device)
        if checkpoint is not None:
            checkpoint.save(i, layer, calls, report)
        store.done(i, layer)
        bar.update()
    bar.close()


class ModelLayers:
    """The default store: the layers of a model in memory, each moved to the device while it is worked on."""

    def __init__(self, layers: nn.ModuleList, device: torch.device):
        self.layers, self.device, self.homes = layers, device, {}

    def load(self, i: int) -> nn.Module:
        self.homes[i] = next(self.layers[i].parameters()).device
        return self.layers[i].to(self.device)

    def done(self, i: int, layer: nn.Module) -> None:
        layer.to(self.homes.pop(i))


def prunable_linears(layer: nn.Module, prefix: str, config: PruneConfig) -> dict[str, nn.Module]:
    """The layer's linears by full name, minus those --skip keeps dense."""
    skip = re.compile(config.skip) if config.skip else None
    found = {f"{prefix}.{name}": module for name, module in linears(layer).items()}
    return {name: m for name, m in found.items() if not (skip and skip.search(name)) and not kept_from_linears(name)}


def find_targets(model: nn.Module, config: PruneConfig, allow_none: bool = False
                 ) -> tuple[nn.ModuleList, list[dict[str, nn.Module]]]:
    """The decoder layers and, per layer, the linears to prune (routers stay dense). `allow_none`: the caller
    also prunes what is not a linear (fused experts) and checks that something is left."""
    prefix, layers = decoder_layers(model)
    targets = [prunable_linears(layer, f"{prefix}.{i}", config) for i, layer in enumerate(layers)]
    if not any(targets) and not allow_none:
        raise LLMPruneError("no linear layer is left to prune (check --skip)")
    return layers, targets


def check_model(model: nn.Module, config: PruneConfig) -> tuple[nn.ModuleList, list[dict[str, nn.Module]]]:
    """find_targets, and fail before any work on what cannot be pruned as asked (shapes, NaN or Inf weights)."""
    layers, targets = find_targets(model, config, allow_none=True)
    if not any(targets) and not ExpertPruning(model, config, ()).layers_with_experts:  # also checks the experts
        raise LLMPruneError("no linear layer is left to prune (check --skip)")
    for layer in targets:
        for name, module in layer.items():
            weight = weight_matrix(module)
            if config.nm and weight.shape[1] % config.nm[1]:
                raise LLMPruneError(
                    f"{name} has {weight.shape[1]} inputs, not divisible by M={config.nm[1]} of --pattern "
                    f"{config.pattern}: choose another pattern or --skip this module"
                )
            if weight.device.type != "meta" and not torch.isfinite(weight).all():  # streamed: checked on load
                raise LLMPruneError(f"{name} has NaN or Inf weights: the model file is damaged")
    return layers, targets


def capture_layer_calls(model, layers, calibration, batch_size, device, progress, offload=None) -> LayerCalls:
    """Run the model's own forward with every decoder layer replaced by a recorder, so that only the
    embeddings run: layer 0's inputs and each layer's own arguments are kept, and the last layer stops it.
    With `offload` (a directory) layer 0's inputs are written into a file-backed tensor there instead."""
    batches = [slice(s, min(s + batch_size, len(calibration))) for s in range(0, len(calibration), batch_size)]
    hidden, all_args, all_kwargs = [], [], []
    moved: dict[int, object] = {}  # tensors shared between layers are moved to the device once

    def recorder(index):
        def forward(hidden_states, *args, **kwargs):
            if index == 0 and offload is not None:
                if not hidden:
                    hidden.append(_file_tensor(offload, (len(calibration), *hidden_states.shape[1:]),
                                               hidden_states.dtype))
                hidden[0][batches[len(all_args) - 1]] = hidden_states
            elif index == 0:
                hidden.append(hidden_states.to(device))
            all_args[-1].append(_to_device(args, device, moved))
            all_kwargs[-1].append(_to_device(kwargs, device, moved))
            if index == len(layers) - 1:
                raise _StopForward
            return hidden_states

        return forward

    # where the embeddings are: a streamed model's are on the CPU, by rows (StreamedModel.input_rows), not parameters
    model_device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        for batch in tqdm(batches, desc="capturing layer inputs", unit="batch", disable=not progress):
            all_args.append([])
            all_kwargs.append([])
            try:
                model(input_ids=calibration[batch].to(model_device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward
    return LayerCalls(hidden[0] if offload is not None else torch.cat(hidden), batches, all_args, all_kwargs, device)


def _file_tensor(directory, shape, dtype) -> torch.Tensor:
    """A CPU tensor backed by a file (shared mmap): the kernel pages it out instead of holding it in RAM."""
    import tempfile
    from pathlib import Path

    Path(directory).mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix="activations-", suffix=".bin") as handle:
        numel = 1
        for size in shape:
            numel *= size
        return torch.from_file(handle.name, shared=True, size=numel, dtype=dtype).view(shape)  # unlinked on close


def _to_device(value, device, moved):
    if isinstance(value, torch.Tensor):
        if id(value) not in moved:
            moved[id(value)] = (value, value.to(device))  # keep the source alive so its id stays unique
        return moved[id(value)][1]
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device, moved) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device, moved) for k, v in value.items()}
    return value


def run_layer(layer, index, calls, batch) -> torch.Tensor:
    """Layer `index`'s output hidden states for one batch of its captured inputs."""
    hidden = calls.hidden[calls.batches[batch]].to(calls.device)
    out = layer(hidden, *calls.args[batch][index], **calls.kwargs[batch][index])
    return out[0] if isinstance(out, (tuple, list)) else out


def collect_statistics(layer, index, calls, targets, kinds, write_outputs=False, reduce=None) -> dict[str, dict]:
    """Pass 1: {linear: {kind: statistic}}. Linears that read the very same input tensor (q/k/v, gate/up)
    share one dict of statistics, accumulated once. The forward stops as soon as the last linear has seen its input, unless the
    outputs are wanted too (`write_outputs`: a dense layer's outputs are the next layer's inputs).
    `reduce(statistic)`, when given, sums each statistic over the ranks before it is finalized."""
    names = {module: name for name, module in targets.items()}
    statistics: dict[str, dict] = {}
    leader: dict[str, str] = {}  # linear -> the linear whose statistic it shares
    previous: list = [None, None]  # (input tensor, name) of the linear called just before
    order: list[str] = []

    def hook(module, args):
        name, x = names[module], args[0]
        if name not in leader:
            order.append(name)
            leader[name] = leader[previous[1]] if x is previous[0] else name
        if leader[name] == name:
            for kind, statistic in statistics.setdefault(
                    name, {k: new_statistic(k, x.shape[-1], x.device) for k in kinds}).items():
                statistic.add(x)
        previous[:] = [x, name]
        if stop_after and name == stop_after:
            raise _StopForward

    stop_after = None
    handles = [module.register_forward_pre_hook(hook) for module in targets.values()]
    try:
        for batch in range(len(calls.batches)):
            try:
                out = run_layer(layer, index, calls, batch)
                if write_outputs:
                    calls.hidden[calls.batches[batch]] = out
            except _StopForward:
                pass
            previous[:] = [None, None]
            if not write_outputs:
                stop_after = order[-1] if order else None  # learnt from the first, complete, batch
    finally:
        for handle in handles:
            handle.remove()
    for stats in statistics.values():
        for stat in stats.values():
            if reduce is not None:
                reduce(stat)
    finals = {name: {kind: stat.finalize() for kind, stat in stats.items()} for name, stats in statistics.items()}
    for name, value in finals.items():
        tensors = [t for v in value.values() for t in (v.values() if isinstance(v, dict) else [v])]
        if not all(bool(torch.isfinite(t).all()) for t in tensors):
            raise LLMPruneError(f"the calibration statistics of {name} hold NaN or Inf: the activations "
                                f"overflow in this dtype; try --dtype float32")
    return {name: finals[leader[name]] for name in leader}


def share_groups(targets: dict[str, nn.Module], statistics: dict[str, torch.Tensor]) -> list[list[str]]:
    """Group linears that share one statistic object (and so one solve); each alone without statistics."""
    groups: dict[int, list[str]] = {}
    for name in targets:
        key = id(statistics[name]) if name in statistics else id(name)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def prune_group(group, targets, statistics, method: Method, update, sparsity, config, report, layer_index=None) -> None:
    """Stack the group's weights (same input width), prune them in one call, re-fit them if an update is
    asked for, verify, write back. The method sees only this layer's target and its own knobs."""
    modules = [targets[name] for name in group]
    weights = [weight_matrix(m) for m in modules]
    rows = [w.shape[0] for w in weights]
    stacked = torch.cat([w.float() for w in weights]) if len(weights) > 1 else weights[0].float()
    target = LayerTarget(sparsity, config.nm, tuple(rows))
    new_weight, keep = method.fn(stacked, statistics.get(method.statistic), target, **config.method_config.knobs())
    if update is not None:
        new_weight = update.fn(stacked, statistics[update.statistic], keep, **config.update_config.knobs())
    verify_mask(group, new_weight, keep, rows, method, sparsity, config)
    for name, module, new in zip(group, modules, new_weight.split(rows)):
        set_weight_matrix(module, new)
        zeros = int((weight_matrix(module) == 0).sum())  # after the cast: a low-precision dtype may add zeros
        if not bool(torch.isfinite(weight_matrix(module)).all()):  # a value beyond the model's dtype's range
            raise LLMPruneError(f"{name}: the pruned weights overflow {module.weight.dtype}; use --dtype float32")
        report.layers.append({"name": name, "layer": layer_index, "shape": list(new.shape), "sparsity": sparsity,
                              "achieved_sparsity": zeros / new.numel(), "zeros": zeros, "numel": new.numel()})


def verify_mask(group, weight, keep, rows, method: Method, sparsity, config) -> None:
    """Every pruned linear carries exactly the requested pattern; anything else is a bug, said loudly."""
    cols = keep.shape[1]
    if config.nm:
        n, m = config.nm
        exact = bool((keep.view(-1, cols // m, m).sum(-1) == n).all())
    elif (config.method_config.compares(method.compares) if isinstance(config.method_config, method.config)
          else method.compares) == "row":
        exact = bool((keep.sum(1) == cols - pruned_count(cols, sparsity)).all())
    else:
        kept = keep.sum(1).split(rows)
        exact = all(int(k.sum()) == r * cols - pruned_count(r * cols, sparsity) for k, r in zip(kept, rows))
    if not exact or bool(weight.masked_fill(keep, 0).any()) or not bool(torch.isfinite(weight).all()):
        raise LLMPruneError(f"internal error: {', '.join(group)} do not carry the requested {config.pattern} "
                            f"pattern at sparsity {sparsity:g}; please report this")


def propagate(layer, index, calls) -> None:
    """Pass 2: each batch's output replaces its input in place; it is the next layer's input."""
    for batch, rows in enumerate(calls.batches):
        calls.hidden[rows] = run_layer(layer, index, calls, batch)


def allocate_sparsity(store, targets, calls, config, device, report, progress, reduce=None) -> list[float]:
    """Per-layer sparsity: the same everywhere, or OWL's outlier-weighted allocation, which needs the
    dense model's statistics of every layer: one extra pass, then layer 0's inputs are restored."""
    if config.allocation == "uniform":
        return [config.sparsity] * len(targets)
    if config.allocation.startswith("scan:"):  # measured sensitivities: no pass needed here
        from .scan import ScanTable, scan_allocation

        sizes = [sum(weight_matrix(m).numel() for m in layer_targets.values()) for layer_targets in targets]
        table = ScanTable.load(config.allocation.removeprefix("scan:"))
        return scan_allocation(table, config.sparsity, sizes, config.allocation_config.scan_max_shift)
    start = time.perf_counter()
    layer0_inputs = calls.hidden.clone()
    ratios, sizes = [], []
    for i in tqdm(range(len(targets)), desc="OWL: dense statistics", unit="layer", disable=not progress):
        layer = store.load(i)
        stats = collect_statistics(layer, i, calls, targets[i], ("input_norms",), write_outputs=True, reduce=reduce)
        scores = torch.cat([(weight_matrix(m).float().abs() * stats[name]["input_norms"]).flatten()
                            for name, m in targets[i].items()])
        ratios.append(outlier_ratio(scores, config.allocation_config.owl_m))
        sizes.append(scores.numel())
        store.done(i, layer)
    calls.hidden.copy_(layer0_inputs)
    report.seconds["allocation"] += elapsed(start, device)
    sparsities = owl_sparsities(ratios, sizes, config.sparsity, config.allocation_config.owl_lambda)
    achieved = sum(s * n for s, n in zip(sparsities, sizes)) / sum(sizes)
    if abs(achieved - config.sparsity) > 1e-6:  # the clamp to [0, 0.99] cut a layer's share
        raise LLMPruneError(f"OWL's layer sparsities had to be clamped, which moves the model to {achieved:.4f} "
                            f"instead of {config.sparsity:g}: lower --owl-lambda")
    return sparsities
