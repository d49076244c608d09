"""Several structures at once to a parameter budget: enumerate the shapes, count them exactly, score, prune.

A shape is a sparsity per axis (layers, heads, channels, hidden; an axis absent is left whole). The candidates
are every combination of each listed axis's own shapes (`candidate_sparsities`: widths in steps of --round-to,
head counts, layer counts, hidden widths), whole included, whose exact parameter count lies within 2% of the
target. Counting every combination by building the model would be slow, so a count is composed from
one-layer builds on the meta device, exact for a decoder whose layers are alike:

    params = (embeddings, final norm, head at hidden width h) + layers_kept * per_layer(h, channels, heads)
    per_layer(h, c, q) = per_layer(h, c, 0) + per_layer(h, 0, q) - per_layer(h, 0, 0)

(no tensor of a layer depends on both the MLP width and the head count), and per_layer(h, c, 0) is affine in
the kept MLP width (rows of gate/up, columns of down, their biases), so two pruned widths per hidden size are
built and the others interpolated (the tests prune every candidate for real against its count).

Statistics: ONE calibration pass through the dense model (dense_pass.py) measures what every axis needs: the
channels' and heads' input moments (--method's scores, bias compensation's means), the norms' activations
(hidden), block influence and each layer's skip loss (layers). Every candidate is then pruned one-shot from
those dense statistics on a deep copy, with no further calibration pass, in the order of AXES: layers first,
then heads and channels within the layers that stay, the hidden size last. Pruning one shape axis by axis
with `prune_structured` alone would rank each later axis on the model the earlier axes already pruned (and
channels and heads on inputs their own pruned layers made); here every axis is ranked on the dense model, as
Minitron does.

Which layers go is chosen by score, not by one rule: a shape that removes n layers becomes up to three
candidates, one per distinct layer set (`layer_sets`): block influence lowest (ShortGPT), the n layers whose
removal alone costs the least calibration loss ("skip", measured from each layer's dense inputs on the first
--search-windows calibration windows), and the deepest contiguous block but the last layer ("block", as in
Gromov et al., The Unreasonable Ineffectiveness of the Deeper Layers). Influence alone can pick layers whose
removal is catastrophic on another family; here each set is scored like any other candidate, and the chosen
candidate's `layers_removed` prunes it again exactly (`prune_shape(..., layers_removed=...)`).

Rule that picks the best candidate: the smallest KL divergence from the dense model's next-token distribution,
averaged over every token of validation windows cut from the end of the calibration text (never the held-out
text). With more shapes than `limit`, `limit` of them evenly spread over the list ordered by shape are scored,
each with all its layer sets (the others are listed once, unscored).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import LLMPruneError
from ...inputs.models import decoder_layers
from ...runtime import parameter_count
from .config import AXES, StructuredConfig, axis_config
from .discovery import CONFIG_KEYS, PER_LAYER_LISTS, config_key, meta_model, planned_config

SLACK = 0.02  # a candidate's count is within this fraction of the target


@dataclass
class Candidate:
    shape: dict[str, float]  # axis -> sparsity of that axis (absent: left whole)
    params: int
    kl: float | None = None  # to the dense model, on the validation windows (None: not scored)
    kl_distilled: float | None = None  # the same after --search-steps of distillation (None: not distilled)
    config_changes: dict = field(default_factory=dict)
    layers_removed: list[int] | None = None  # dense indices of the decoder layers that go (None: by --layer-importance)
    layer_rule: str | None = None  # what chose them: influence, skip or block ("+" joins rules that agree)


class ShapeCounter:
    """Exact parameter counts of shapes of one dense model, from memoized one-layer meta builds."""

    def __init__(self, model: nn.Module, base: StructuredConfig):
        from .runner import plan_structure

        self.model, self.base, self._plan = model, base, plan_structure
        self.layers = len(decoder_layers(model)[1])
        self.layers_key = config_key(model.config, "layers")
        self._changes, self._built = {}, {}
        self.channel_options: list[float] = []  # the pruned channel sparsities, for the interpolation

    def changes(self, axis: str, sparsity: float) -> dict:
        if (axis, sparsity) not in self._changes:
            self._changes[axis, sparsity] = dict(self._plan(self.model, axis_config(self.base, axis, sparsity)).changes)
        return self._changes[axis, sparsity]

    def _one_layer(self, hidden: float, channels: float, heads: float) -> tuple[int, int]:
        """(parameters outside the layers, one layer's) at this hidden/channel/head shape."""
        key = (hidden, channels, heads)
        if key not in self._built:
            changes = {}
            for axis, sparsity in (("hidden", hidden), ("channels", channels), ("heads", heads)):
                if sparsity:
                    changes |= self.changes(axis, sparsity)
            changes[self.layers_key] = 1
            present = self.model.config.to_dict()
            for name in PER_LAYER_LISTS:
                if isinstance(present.get(name), list) and len(present[name]) == self.layers:
                    changes[name] = present[name][:1]
            try:
                built = meta_model(self.model, planned_config(self.model, changes))
            except Exception as err:  # the family's own validation: e.g. a hidden size its head count refuses
                raise LLMPruneError(f"{type(self.model.config).__name__} refuses this shape: {err}") from None
            layer = parameter_count(decoder_layers(built)[1][0].parameters())
            self._built[key] = (parameter_count(built.parameters()) - layer, layer)
        return self._built[key]

    def params(self, shape: dict[str, float]) -> int:
        hidden, channels, heads = (shape.get(axis, 0.0) for axis in ("hidden", "channels", "heads"))
        rest, base = self._one_layer(hidden, 0.0, 0.0)
        with_channels = self._with_channels(hidden, channels) if channels else base
        with_heads = self._one_layer(hidden, 0.0, heads)[1] if heads else base
        kept_layers = self.layers - round(self.layers * shape.get("layers", 0.0))
        return rest + kept_layers * (with_channels + with_heads - base)

    def _with_channels(self, hidden: float, channels: float) -> int:
        """One layer's count with the MLP at `channels`: built at the two smallest pruned widths, interpolated
        between them elsewhere (exact: affine in the kept width; a bias flag compensation adds is in both)."""
        references = self.channel_options[:2]
        if len(references) < 2 or channels in references:
            return self._one_layer(hidden, channels, 0.0)[1]
        (a, b), (ya, yb) = references, (self._one_layer(hidden, r, 0.0)[1] for r in references)
        return round(ya + (yb - ya) * (channels - a) / (b - a))

    def config_changes(self, shape: dict[str, float]) -> dict:
        changes = {}
        for axis in AXES:
            if shape.get(axis):
                changes |= self.changes(axis, shape[axis])
        return changes


def candidate_shapes(model: nn.Module, base: StructuredConfig, axes: list[str], target: float) -> list[Candidate]:
    """Every shape over `axes` (each axis whole or at one of its own sparsities, at least one pruned) whose
    exact count is within 2% of `target`, ordered by shape."""
    from itertools import product

    from .runner import candidate_sparsities

    counter = ShapeCounter(model, base)
    options = []
    for axis in axes:
        allowed = []
        for sparsity in candidate_sparsities(model, axis_config(base, axis, 0.5)):
            try:
                counter.changes(axis, sparsity)
            except LLMPruneError:  # a shape this family cannot express
                continue
            allowed.append(sparsity)
        if not allowed:  # asked for, yet never pruned: say so now rather than search without it
            raise LLMPruneError(no_shape_message(model, axis, base.round_to))
        options.append([0.0, *allowed])
        if axis == "channels":
            counter.channel_options = allowed
    found = []
    for values in product(*options):
        shape = {axis: value for axis, value in zip(axes, values) if value}
        if not shape:
            continue
        try:
            params = counter.params(shape)
        except LLMPruneError:
            continue
        if abs(params - target) <= SLACK * target:
            found.append(Candidate(shape, params, config_changes=counter.config_changes(shape)))
    if not found:
        raise LLMPruneError(f"no shape over --structure {','.join(axes)} (--round-to {base.round_to}) has "
                            f"{target:,.0f} parameters within {SLACK:.0%}: change the target, add a structure or "
                            "lower --round-to")
    return found


def no_shape_message(model: nn.Module, axis: str, round_to: int) -> str:
    """One line naming why `axis` has no shape to search and the --round-to that gives it some."""
    family = type(model.config).__name__
    if axis == "hidden":
        from .hidden import hidden_size, hidden_widths

        exact = hidden_widths(model, 1)
        step = math.gcd(*exact) if exact else None
        if step and step * 8 // math.gcd(step, 8) < hidden_size(model):
            return (f"--structure hidden: no hidden width of {family} is a multiple of --round-to {round_to} (its "
                    f"config takes multiples of {step}): use --round-to {step * 8 // math.gcd(step, 8)} or drop "
                    "hidden from --structure")
    return f"--structure {axis}: {family} has no {axis} shape at --round-to {round_to}: lower --round-to or drop it"


@torch.no_grad()
def prune_shape(model: nn.Module, calibration: torch.Tensor | None, base: StructuredConfig,
                shape: dict[str, float], progress: bool = False, layers_removed: list[int] | None = None,
                statistics=None) -> list:
    """Prune `model` in place to `shape`, axis by axis in AXES order, every axis from one set of dense
    statistics (`statistics`, or one pass over `calibration` made here); returns each axis's StructureRecord.
    `layers_removed`: the decoder layers that go (a candidate's), else the lowest by --layer-importance."""
    from .dense_pass import RULE_OF_IMPORTANCE, dense_statistics
    from .runner import prune_structured

    axes = [axis for axis in AXES if shape.get(axis)]
    if layers_removed is not None and "layers" not in axes:
        raise LLMPruneError(f"a shape without layers names layers to remove ({layers_removed}): give both or neither")
    if statistics is None:
        rules = () if layers_removed is not None else (RULE_OF_IMPORTANCE[base.layer_importance],)
        skip = len(calibration) if calibration is not None else None  # --layer-importance skip_loss: every window
        statistics = dense_statistics(model, calibration, base, axes, rules, skip, progress)
    records = []
    for axis in axes:
        drop = layers_removed if axis == "layers" else None
        records.append(prune_structured(model, calibration, axis_config(base, axis, shape[axis]), progress,
                                        dense=statistics, drop_layers=drop).structure)
        if axis == "layers":
            statistics = statistics.without(records[-1].removed_layers)
    return records


def layer_sets(statistics, count: int) -> list[tuple[str, list[int]]]:
    """(rule, the `count` layers it removes) for each distinct set: influence lowest, skip loss lowest, the
    deepest block but the last layer; rules that pick the same set are joined by "+"."""
    from .layer_importance import lowest

    layers = len(statistics.layers)
    found: dict[tuple[int, ...], list[str]] = {}
    for rule, scores in (("influence", statistics.influence), ("skip", statistics.skip)):
        if scores is not None:
            found.setdefault(tuple(lowest(scores, count)), []).append(rule)
    found.setdefault(tuple(range(layers - 1 - count, layers - 1)), []).append("block")
    return [("+".join(rules), list(removed)) for removed, rules in found.items()]


def layer_variants(candidate: Candidate, statistics) -> list[Candidate]:
    """The candidate once per layer set (`layer_sets`); a shape without layers is itself."""
    from .runner import round_half

    if not candidate.shape.get("layers"):
        return [candidate]
    count = round_half(len(statistics.layers) * candidate.shape["layers"])
    return [replace(candidate, shape=dict(candidate.shape), layers_removed=removed, layer_rule=rule)
            for rule, removed in layer_sets(statistics, count)]


@torch.no_grad()
def dense_log_probs(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.log_softmax(model(input_ids=w[None], use_cache=False).logits.float(), -1)
                      for w in windows])


@torch.no_grad()
def kl_to_dense(model: nn.Module, windows: torch.Tensor, dense: torch.Tensor) -> float:
    """KL(dense || model) of the next-token distributions, averaged over every position of `windows`."""
    total, count = 0.0, 0
    for index, window in enumerate(windows):
        pruned = F.log_softmax(model(input_ids=window[None], use_cache=False).logits.float(), -1)[0]
        reference = dense[index]
        total += float((reference.exp() * (reference - pruned)).sum())
        count += window.numel()
    return total / count


def evenly_spread(count: int, limit: int) -> list[int]:
    """`limit` indices spread evenly over range(count), first and last included (all when count <= limit)."""
    if count <= limit:
        return list(range(count))
    if limit == 1:
        return [count // 2]
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})


def search_shapes(model: nn.Module, calibration: torch.Tensor | None, validation: torch.Tensor,
                  base: StructuredConfig, axes: list[str], target: float, limit: int = 8,
                  progress: bool = False, summary: dict | None = None) -> list[Candidate]:
    """The candidates (`candidate_shapes`, the scored shapes once per layer set), the scored ones by KL to the
    dense model, best first, then the unscored ones. `model` stays dense. One dense calibration pass in all;
    `summary`, when given, receives its counts (DenseStatistics.summary)."""
    from .dense_pass import dense_statistics

    if limit < 1:
        raise LLMPruneError(f"--search-limit must be at least 1 (got {limit})")
    found = candidate_shapes(model, base, axes, target)
    used = [axis for axis in AXES if any(c.shape.get(axis) for c in found)]
    statistics = dense_statistics(model, calibration, base, used, progress=progress)
    dense = dense_log_probs(model, validation)
    chosen = set(evenly_spread(len(found), limit))
    listed = []
    for index, candidate in enumerate(found):
        if index not in chosen:
            listed.append(candidate)
            continue
        for variant in layer_variants(candidate, statistics):
            pruned = copy.deepcopy(model)
            prune_shape(pruned, None, base, variant.shape, False, variant.layers_removed, statistics)
            variant.kl = kl_to_dense(pruned, validation, dense)
            if not math.isfinite(variant.kl):
                variant.kl = math.inf
            del pruned
            listed.append(variant)
    if summary is not None:
        summary.update(statistics.summary())
    return sorted(listed, key=lambda c: (c.kl is None, c.kl if c.kl is not None else 0.0))


def candidates_markdown(candidates: list[Candidate], target: float, dense_params: int,
                        distillation: dict | None = None) -> str:
    rule = ("Best first: smallest KL to the dense model on the validation windows (unscored shapes last).")
    if distillation:
        rule = (f"Best first. Distilled from the dense model: the best {distillation['candidates']} by one-shot "
                f"KL, {distillation['steps']} steps each ({distillation['params']}, {distillation['batch']} x "
                f"{distillation['seqlen']} tokens a step, on the calibration text), ranked by their KL after it; "
                f"then the other scored shapes by one-shot KL; unscored shapes last.")
    lines = [f"# Candidate shapes for {target:,.0f} parameters (dense: {dense_params:,})", "", rule, "",
             "| rank | shape | parameters | KL (nats/token) | KL distilled | config |", "|---|---|---|---|---|---|"]
    for rank, c in enumerate(candidates, 1):
        shape = ", ".join(f"{axis} {sparsity:.3g}" for axis, sparsity in c.shape.items())
        if c.layers_removed is not None:  # which layers go, and the rule that chose them
            shape += f" (layers {', '.join(map(str, c.layers_removed))} by {c.layer_rule})"
        kl = f"{c.kl:.5f}" if c.kl is not None else "-"
        distilled = f"{c.kl_distilled:.5f}" if c.kl_distilled is not None else "-"
        config = ", ".join(f"{k}={v}" for k, v in c.config_changes.items() if k in sum(CONFIG_KEYS.values(), ())
                           or k in ("hidden_size",))
        lines.append(f"| {rank} | {shape} | {c.params:,} | {kl} | {distilled} | {config} |")
    return "\n".join(lines) + "\n"


def candidates_json(candidates: list[Candidate], target: float, dense_params: int, axes: list[str],
                    distillation: dict | None = None, statistics: dict | None = None) -> dict:
    """`statistics`: the dense pass's counts (search_shapes' `summary`)."""
    rule = "smallest KL(dense || pruned) per token on validation windows cut from the calibration text"
    if distillation:
        rule = ("the best --search-topk by that KL distilled from the dense model for --search-steps steps on the "
                "calibration text, then the smallest KL after distillation (kl_distilled); " + rule)
    return {"target_params": round(target), "dense_params": dense_params, "structures": axes, "rule": rule,
            "distillation": distillation or None, **({"statistics": statistics} if statistics is not None else {}),
            "candidates": [asdict(c) for c in candidates]}


def search_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int, val_windows: int):
    """(calibration, validation) windows: validation from the END of the calibration text, calibration from
    the rest (never the held-out text)."""
    from ...inputs.data import calibration_windows

    split = tokens.numel() - val_windows * seqlen
    if split < seqlen:
        raise LLMPruneError(f"the calibration text holds {tokens.numel()} tokens, too few for {val_windows} "
                            f"validation windows of {seqlen} and calibration: lower --search-windows or --seqlen")
    return calibration_windows(tokens[:split], nsamples, seqlen, seed), tokens[split:].view(val_windows, seqlen)


def run_search(run, base: StructuredConfig, axes: list[str], target, nsamples: int, seqlen: int, seed: int,
               output, overwrite: bool = False, progress: bool = True, recovery=None):
    """The `search` command: load, cut validation windows from the END of the calibration text and calibration
    windows from the rest, search, with --search-topk distil the best candidates (search_distill.py; `recovery`:
    a RecoverConfig whose LoRA/full, lr, batch and seqlen it uses, default RecoverConfig()), and write
    candidates.json, candidates.md and candidates.png into `output` atomically. Returns the path of
    candidates.json."""
    from pathlib import Path

    from ...inputs.data import check_source, load_text, tokenize
    from ...inputs.models import load_model, resolve_model
    from ...output.atomic import check_output
    from ...runtime import resolve_device, resolve_dtype
    from .runner import target_count

    val_windows = base.search_windows
    check_output(output, overwrite)
    resolve_model(run.model)
    check_source(run.calib, "calib", (nsamples + val_windows) * seqlen, "--nsamples, --seqlen or --search-windows")
    if base.search_topk:
        from .search_distill import search_recovery_config

        recovery = search_recovery_config(recovery, base.search_steps, seed)
    model, tokenizer, _ = load_model(run.model, resolve_dtype(run.dtype, resolve_device(base.device)),
                                     run.trust_remote_code)
    count = target_count(model, target)
    tokens = tokenize(tokenizer, load_text(run.calib, "calib"))
    calibration, validation = search_windows(tokens, nsamples, seqlen, seed, val_windows)
    train = None
    if base.search_topk:  # cut now: a text too short fails before the search's work
        from .search_distill import distill_windows

        train = distill_windows(tokens[: tokens.numel() - val_windows * seqlen], recovery.steps, recovery.batch,
                                recovery.seqlen, seed)
    summary = {}  # the dense pass's counts
    found = search_shapes(model, calibration, validation, base, axes, count, base.search_limit, progress, summary)
    distillation = None
    if base.search_topk:
        from .search_distill import distill_candidates

        distillation = distill_candidates(model, calibration, validation, train, base, found, base.search_topk,
                                          recovery, progress)
    dense = parameter_count(model.parameters())
    write_search(output, overwrite, found, count, dense, axes, distillation, summary)
    return Path(output) / "candidates.json"


def write_search(output, overwrite: bool, found: list[Candidate], count: int, dense: int, axes: list[str],
                 distillation: dict | None = None, statistics: dict | None = None) -> None:
    """candidates.json, candidates.md and the plot candidates.png, into `output` atomically."""
    import json

    from ...output.atomic import atomic_directory
    from ...output.plots import plot_candidates

    with atomic_directory(output, overwrite) as staging:
        table = candidates_json(found, count, dense, axes, distillation, statistics)
        (staging / "candidates.json").write_text(json.dumps(table, indent=2) + "\n")
        (staging / "candidates.md").write_text(candidates_markdown(found, count, dense, distillation))
        (staging / "candidates.png").write_bytes(plot_candidates(found, count, dense))


def combined_report(records: list, target: int | None):
    """One PruneReport for a shape pruned axis by axis: its record counts parameters (unit "parameters"),
    and each axis's own record is in `stages`."""
    from ...report import StructureRecord
    from ..runner import PruneReport

    first, last = records[0], records[-1]
    seconds = {}
    changes = {}
    for record in records:
        changes |= record.config_changes
        for key, value in record.seconds.items():
            seconds[key] = seconds.get(key, 0.0) + value
    removed = 1 - last.params_after / first.params_before
    record = StructureRecord(",".join(r.kind for r in records), ",".join(r.method for r in records), removed,
                             "parameters", removed, first.params_before, last.params_after,
                             params_before=first.params_before, params_after=last.params_after,
                             params_removed_fraction=removed, decoder_params_before=first.decoder_params_before,
                             decoder_params_after=last.decoder_params_after,
                             decoder_params_removed_fraction=1 - last.decoder_params_after / first.decoder_params_before,
                             config_changes=changes, seconds=seconds, stages=list(records), target_params=target)
    return PruneReport(record.method, removed, "structured", "uniform", seconds=seconds, structure=record)
