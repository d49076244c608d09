"""The structured runner: remove MLP channels, attention heads or whole decoder layers, in place, so that
the model stays an ordinary Hugging Face model of smaller shapes.

    plan: find the structure in every layer, the widths to keep, the config changes; build the model's own
          class from the planned config on the meta device and check it has the planned shapes (all bad
          input fails here, before any work)
    channels / heads:
        taylor only: the calibration loss's gradient of the structure's weights (one whole-model pass)
        capture the inputs of layer 0 and every layer's own arguments (the unstructured runner's code)
        for each decoder layer, on the device (the unstructured runner's each_layer):
            statistics of the inputs of its first input projection and of its output projection
            score the units, keep the best (the same number in every layer, and in every KV group)
            fold the removed units' mean contribution into the output projection's bias (compensation)
            slice the projections; set the attributes the module's forward reads
            propagate: the pruned layer's outputs are the next layer's inputs
    layers:
        block influence, measured while the dense layers propagate (each_layer), or the loss increase when skipped
        delete the least important layers; renumber the KV cache slots; shorten per-layer config lists
    hidden (hidden.py, the whole model in memory):
        the norms' activations over the calibration tokens (one model pass), or the weights' magnitude
        keep the best hidden channels in every tensor that holds them; rescale the norms' gains
    write the config, and check the model's own class built from it has exactly the model's shapes

The runner's hooks (store, checkpoint, parallel) work here as in an unstructured prune: a streamed model's
layers shrink as they are written, a resumed run re-cuts the finished layers from the record before reading
their weights, and under torchrun rank 0 chooses the units from the summed statistics and broadcasts them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ...errors import LLMPruneError
from ...options import check_finite
from ...inputs.models import decoder_layers, is_linear, weight_matrix
from ...report import StructureLayer, StructureRecord
from ...runtime import elapsed, parameter_count, resolve_device
from ..runner import ModelLayers, PruneReport, capture_layer_calls, collect_statistics, each_layer, run_layer
from .compensation import removed_mean_contribution
from .config import StructuredConfig, parse_param_target
from .discovery import (FUSED_QKV, HEAD_ATTRIBUTES, MLP_INPUTS, MLP_OUTPUTS, WIDTH_ATTRIBUTES, attention_shape,
                        bias_flag_for, config_key, find_parts, meta_model, planned_config)
from .importance import UnitView, get_importance
from .layer_importance import influence_terms, lowest
from .model_passes import loss_gradients, skip_losses
from .surgery import add_to_bias, keep_inputs, keep_outputs, remove_layers, set_present_attributes, \
    verify_against_config


def round_half(x: float) -> int:
    return int(x + 0.5)


@dataclass
class UnitSpec:
    """How every layer's projections split into removable units (all layers alike: uniform widths)."""

    rows: list[str]  # projections whose output features are units (gate/up; q, and k/v for whole KV groups)
    cols: list[str]  # the output projection, whose input features are units (down; o)
    units: int  # units per layer
    kept: int  # units kept per layer
    blocks: int = 1  # the same number is kept in each block of consecutive units (KV groups in query mode)
    attributes: dict = field(default_factory=dict)  # module attribute -> new value (num_key_value_groups...)
    owner: str = ""  # the module holding those attributes (the attention or MLP module)


@dataclass
class Plan:
    structure: str
    prefix: str
    layers: nn.ModuleList
    changes: dict  # config key -> new value
    spec: UnitSpec | None = None
    remove_count: int = 0  # layers
    layers_key: str = ""
    heads_mode: str | None = None
    compensate: bool = False
    compensation_note: str | None = None
    hidden: object = None  # hidden: where its channels are (hidden.HiddenPlan)

    @property
    def unit(self) -> str:
        if self.structure == "hidden":
            return "hidden_channels"
        if self.structure == "heads":
            return "heads" if self.heads_mode == "query" else "kv_groups"
        return self.structure

    @property
    def counts(self) -> tuple[int, int]:
        """(units before, units kept): per decoder layer, or decoder layers."""
        if self.spec is not None:
            return self.spec.units, self.spec.kept
        if self.hidden is not None:
            return self.hidden.hidden, self.hidden.width
        return len(self.layers), len(self.layers) - self.remove_count


def plan_structure(model: nn.Module, config: StructuredConfig) -> Plan:
    """Everything that can be wrong with the request, found from shapes and config alone."""
    prefix, layers = decoder_layers(model)
    family = type(model).__name__
    if config.structure == "layers":
        key = config_key(model.config, "layers")
        count = round_half(len(layers) * config.sparsity)
        if key is None:
            raise LLMPruneError(f"{family}'s config states no layer count (looked for num_hidden_layers, n_layer): "
                                f"--structure layers cannot write a loadable config")
        if count == 0:
            raise LLMPruneError(f"--sparsity {config.sparsity:g} of {len(layers)} layers removes none: "
                                f"use at least {0.5 / len(layers):.3g}")
        if count >= len(layers):
            raise LLMPruneError(f"--sparsity {config.sparsity:g} removes all {len(layers)} layers: lower it")
        return Plan("layers", prefix, layers, {key: len(layers) - count}, remove_count=count, layers_key=key)
    if config.structure == "hidden":
        from .hidden import choose_width, plan_hidden

        hidden = plan_hidden(model, choose_width(model, keep_fraction=1 - config.sparsity, round_to=config.round_to))
        return Plan("hidden", prefix, layers, dict(hidden.config_changes), hidden=hidden)

    parts = [find_parts(layer) for layer in layers]
    first = layers[0]
    if config.structure == "channels":
        spec, changes = _channel_spec(model, layers, parts, config)
        heads_mode = None
    else:
        spec, changes, heads_mode, shape = _head_spec(model, layers, parts, config)
    try:
        _check_family_expresses(model, prefix, spec, changes, first)
    except LLMPruneError as err:
        options = _expressible_head_sparsities(model, shape, heads_mode) if config.structure == "heads" else []
        if options:
            raise LLMPruneError(f"{err}; --sparsity values it can express here: "
                                f"{', '.join(f'{o:g}' for o in options)}") from None
        raise
    plan = Plan(config.structure, prefix, layers, changes, spec, heads_mode=heads_mode)
    plan.compensate = config.compensate
    if plan.compensate:
        flag = bias_flag_for(model, f"{prefix}.0", spec.cols[0], changes)
        if flag is None:
            note = (f"{family} has no bias on {spec.cols[0]} and no config flag that adds one, so a compensated "
                    f"model would not load as a standard {family}")
            if config.bias_compensation == "on":
                raise LLMPruneError(f"{note}: drop --bias-compensation")
            plan.compensate, plan.compensation_note = False, note + "; bias compensation is off"
        elif isinstance(flag, str):
            changes[flag] = True
            plan.compensation_note = f"config {flag}=true adds the bias (zero biases on the other projections it governs)"
    return plan


def _channel_spec(model, layers, parts, config):
    family = type(model).__name__
    for index, p in enumerate(parts):
        if not p.mlp_inputs or p.mlp_output is None:
            raise LLMPruneError(f"{family} layer {index} has no MLP this tool recognizes (inputs named "
                                f"{', '.join(MLP_INPUTS)}; output {', '.join(MLP_OUTPUTS)}): --structure channels "
                                f"does not apply; try --structure layers")
    widths = {weight_matrix(layer.get_submodule(name)).shape[0] for layer, p in zip(layers, parts) for name in p.mlp_inputs}
    widths |= {weight_matrix(layer.get_submodule(p.mlp_output)).shape[1] for layer, p in zip(layers, parts)}
    if len(widths) != 1 or any(p.mlp_inputs != parts[0].mlp_inputs for p in parts):
        raise LLMPruneError(f"{family}'s MLPs differ in width or layout across layers ({sorted(widths)}): "
                            f"--structure channels keeps widths uniform and needs them uniform to begin with")
    width = widths.pop()
    key = config_key(model.config, "intermediate")
    if key is None:
        raise LLMPruneError(f"{family}'s config states no MLP width (looked for intermediate_size, ffn_dim, n_inner): "
                            f"--structure channels cannot write a loadable config")
    kept = width - round_half(width * config.sparsity)
    if config.round_to > 1:
        kept = min(width, max(config.round_to, round_half(kept / config.round_to) * config.round_to))
    if kept >= width:
        raise LLMPruneError(f"--sparsity {config.sparsity:g} removes no MLP channel of {width} once kept widths are "
                            f"multiples of --round-to {config.round_to}: raise --sparsity or lower --round-to")
    if kept < 1:
        raise LLMPruneError(f"--sparsity {config.sparsity:g} removes every MLP channel: lower it")
    owner = parts[0].mlp_output.rpartition(".")[0]
    spec = UnitSpec(parts[0].mlp_inputs, [parts[0].mlp_output], width, kept,
                    attributes=dict.fromkeys(WIDTH_ATTRIBUTES, kept), owner=owner)
    return spec, {key: kept}


def _head_spec(model, layers, parts, config):
    family = type(model).__name__
    p = parts[0]
    if p.fused_qkv:
        raise LLMPruneError(f"{family} fuses q, k and v in one projection ({p.fused_qkv}) and its config ties the "
                            f"head size to the hidden size, so it cannot be saved with fewer heads: use "
                            f"--structure channels or layers")
    if None in (p.query, p.key, p.value, p.attention_output) or any(q != p for q in parts):
        raise LLMPruneError(f"{family}'s attention has no separate q/k/v/o projections this tool recognizes "
                            f"(fused ones: {', '.join(FUSED_QKV)}): --structure heads does not apply")
    shape = attention_shape(model, layers[0], p)
    mode = config.heads_mode if shape.groups > 1 else "groups"  # one query head per KV head: a head is a group
    if mode == "query":
        removed = round_half(shape.groups * config.sparsity)
        if removed == 0:
            raise LLMPruneError(f"--sparsity {config.sparsity:g} removes no query head of each KV group of "
                                f"{shape.groups}: use at least {0.5 / shape.groups:.3g}")
        if removed >= shape.groups:
            raise LLMPruneError(f"--sparsity {config.sparsity:g} removes every query head of each KV group of "
                                f"{shape.groups}: lower it, or remove whole groups with --heads-mode groups")
        spec = UnitSpec([p.query], [p.attention_output], shape.heads, shape.heads - removed * shape.kv_heads,
                        blocks=shape.kv_heads)
    else:
        removed = round_half(shape.kv_heads * config.sparsity)
        what = "KV groups" if shape.groups > 1 else "heads"
        if removed == 0:
            raise LLMPruneError(f"--sparsity {config.sparsity:g} removes none of the {shape.kv_heads} {what}: use at "
                                f"least {0.5 / shape.kv_heads:.3g}"
                                + (" or --heads-mode query" if shape.groups > 1 else ""))
        if removed >= shape.kv_heads:
            raise LLMPruneError(f"--sparsity {config.sparsity:g} removes all {shape.kv_heads} {what}: lower it")
        spec = UnitSpec([p.query, p.key, p.value], [p.attention_output], shape.kv_heads, shape.kv_heads - removed)
    spec.owner = p.attention
    heads, kv_heads, changes = _head_changes(model, shape, mode, removed)
    values = {"heads": heads, "kv_heads": kv_heads, "groups": heads // kv_heads}
    spec.attributes = {attr: values[role] for attr, role in HEAD_ATTRIBUTES.items()}
    return spec, changes, mode, shape


def _head_changes(model, shape, mode: str, removed: int) -> tuple[int, int, dict]:
    """(query heads, KV heads, config changes) once `removed` query heads of each KV group (query mode) or
    `removed` whole KV groups (groups mode) are gone. head_dim is written explicitly: it no longer follows
    from hidden_size / num_attention_heads."""
    if mode == "query":
        heads, kv_heads = shape.kv_heads * (shape.groups - removed), shape.kv_heads
    else:
        kv_heads = shape.kv_heads - removed
        heads = kv_heads * shape.groups
    changes = {config_key(model.config, "heads"): heads, "head_dim": shape.head_dim}
    kv_key = config_key(model.config, "kv_heads")
    if kv_key:
        changes[kv_key] = kv_heads
    elif kv_heads != heads:
        raise LLMPruneError(f"{type(model).__name__}'s config has no num_key_value_heads, so it cannot state "
                            f"{heads} query heads over {kv_heads} KV heads")
    return heads, kv_heads, changes


def _expressible_head_sparsities(model, shape, mode: str) -> list[float]:
    """The head sparsities whose configs the family's own validation accepts (for the error message)."""
    per = shape.groups if mode == "query" else shape.kv_heads
    found = []
    for removed in range(1, per):
        try:
            planned_config(model, _head_changes(model, shape, mode, removed)[2])
            found.append(round(removed / per, 3))
        except Exception:  # the family's validation: this count is not expressible
            continue
    return found


def _check_family_expresses(model, prefix, spec: UnitSpec, changes: dict, layer) -> None:
    """The model's own class, built from the planned config, must have the planned widths."""
    family = type(model).__name__
    why = (f"{family} cannot be saved with {', '.join(f'{k}={v}' for k, v in changes.items())}: its modeling code "
           f"derives these shapes otherwise (e.g. the head size from hidden_size / num_attention_heads), so the "
           f"pruned model would not load")
    try:
        built = meta_model(model, planned_config(model, changes)).get_submodule(f"{prefix}.0")
    except Exception as err:  # the family's own constructor rejects the shape (e.g. head size from hidden size)
        raise LLMPruneError(f"{why}: {str(err).splitlines()[0] if str(err) else type(err).__name__}; "
                            f"try another --structure") from None
    for name in spec.rows:
        planned = weight_matrix(layer.get_submodule(name)).shape[0] // spec.units * spec.kept
        if weight_matrix(built.get_submodule(name)).shape[0] != planned:
            raise LLMPruneError(f"{why}; try another --structure")
    for name in spec.cols:
        planned = weight_matrix(layer.get_submodule(name)).shape[1] // spec.units * spec.kept
        if weight_matrix(built.get_submodule(name)).shape[1] != planned:
            raise LLMPruneError(f"{why}; try another --structure")


def parameter_counts(model: nn.Module, layers: nn.ModuleList) -> tuple[int, int]:
    """(all parameters, decoder-layer parameters); a tied embedding counts once."""
    return parameter_count(model.parameters()), parameter_count(layers.parameters())


def stage_sparsity(previous: StructureRecord, target: float) -> float:
    """A --schedule stage's sparsity for `prune_structured`, which removes a fraction of what the model has now:
    the fraction that brings the structure to `target` of the dense count, given the record of the prunes so far."""
    return 1 - previous.units_before * (1 - target) / previous.units_kept


def chain_records(previous: StructureRecord, stage: StructureRecord, target: float) -> StructureRecord:
    """The record of a schedule so far: `stage` pruned the model that `previous` left, towards `target` of the
    dense structure. Counts are against the dense model, removed layers are named by their dense index, and every
    stage's own record (its counts against the model it pruned) is kept in `stages`."""
    from dataclasses import replace

    removed = None
    if stage.removed_layers is not None:
        survivors = previous.kept_layers() or list(range(previous.units_before))
        removed = sorted([*(previous.removed_layers or ()), *(survivors[i] for i in stage.removed_layers)])
    seconds = {key: previous.seconds.get(key, 0.0) + stage.seconds.get(key, 0.0)
               for key in previous.seconds.keys() | stage.seconds.keys()}
    return replace(stage, sparsity=target, units_before=previous.units_before,
                   achieved_sparsity=1 - stage.units_kept / previous.units_before,
                   params_before=previous.params_before,
                   params_removed_fraction=1 - stage.params_after / previous.params_before,
                   decoder_params_before=previous.decoder_params_before,
                   decoder_params_removed_fraction=1 - stage.decoder_params_after / previous.decoder_params_before,
                   config_changes=previous.config_changes | stage.config_changes, seconds=seconds,
                   layers=[], layer_scores=None, removed_layers=removed,
                   stages=[*(previous.stages or [previous]), stage])


def sparsity_for_params(model: nn.Module, config: StructuredConfig, fraction: float) -> float:
    """--remove-params: the structure's sparsity that removes about `fraction` of the decoder layers'
    parameters, as a parameter target (`sparsity_for_target`): all parameters less that share."""
    return sparsity_for_target(model, config, remove_params_target(model, fraction), f"--remove-params {fraction:g}")[0]


def remove_params_target(model: nn.Module, fraction: float) -> int:
    """--remove-params as a parameter target: all of `model`'s parameters less `fraction` of its decoder layers'."""
    check_finite(fraction, "--remove-params", positive=True)
    params, decoder = parameter_counts(model, decoder_layers(model)[1])
    if not fraction < 1:
        raise LLMPruneError(f"--remove-params {fraction:g} removes every decoder parameter: give a fraction below 1")
    return round(params - fraction * decoder)


def target_count(model: nn.Module, target) -> int:
    """--target-params as a parameter count of `model` (a fraction is of all its parameters, embeddings
    included), checked to remove something and keep something."""
    kind, value = parse_param_target(target)
    params = parameter_count(model.parameters())
    count = round(value * params) if kind == "fraction" else round(value)
    if not 0 < count < params:
        raise LLMPruneError(f"--target-params {target} is {count:,} parameters, but {type(model).__name__} has "
                            f"{params:,}: give a smaller count, or a fraction in (0, 1)")
    return count


def candidate_sparsities(model: nn.Module, config: StructuredConfig) -> list[float]:
    """Every sparsity of the structure that gives a distinct shape: each kept width (a multiple of --round-to),
    number of heads or KV groups, or of decoder layers, as the exact fraction removed."""
    layers = decoder_layers(model)[1]
    if config.structure == "hidden":
        from .hidden import hidden_size, hidden_widths

        hidden = hidden_size(model)
        return [1 - width / hidden for width in hidden_widths(model, config.round_to)]
    if config.structure == "layers":
        return [removed / len(layers) for removed in range(1, len(layers))]
    probe = plan_structure(model, replace(config, sparsity=0.5, round_to=1, bias_compensation="off")).spec
    if config.structure == "channels":
        step = config.round_to
        return [(probe.units - kept) / probe.units for kept in range(step, probe.units, step)]
    per = probe.units // probe.blocks  # query heads per KV group, or KV groups
    return [removed / per for removed in range(1, per)]


def params_at_sparsity(model: nn.Module, config: StructuredConfig) -> int:
    """The exact parameter count (tied tensors once) after a prune at config.sparsity: the model's own class built
    on the meta device from the planned config (layers: less the removed layers' own parameters, all alike)."""
    plan = plan_structure(model, config)
    if plan.structure == "layers":
        return parameter_count(model.parameters()) - plan.remove_count * parameter_count(plan.layers[0].parameters())
    return parameter_count(meta_model(model, planned_config(model, plan.changes)).parameters())


def sparsity_for_target(model: nn.Module, config: StructuredConfig, target: float,
                        asked: str | None = None) -> tuple[float, int]:
    """(sparsity, parameters after): of the structure's shapes (`candidate_sparsities`) whose exact count is at
    most 2% over `target` parameters, the one nearest to it (the smaller on a tie). Counts fall as the sparsity
    rises, so a bisection finds where they cross the target and only a few shapes are built; a shape the family
    refuses is no candidate. `asked`: the flag and value to name in an error."""
    asked = asked or f"--target-params {target:,.0f}"
    candidates = sorted(candidate_sparsities(model, config))
    counts = {}

    def count(index: int) -> int | None:  # None: the family refuses this shape
        if index not in counts:
            try:
                counts[index] = params_at_sparsity(model, replace(config, sparsity=candidates[index]))
            except LLMPruneError:
                counts[index] = None
        return counts[index]

    low, high = 0, len(candidates)  # the first index whose count is at most the target
    while low < high:
        middle = (low + high) // 2
        if count(middle) is None:  # refused shapes break the order: count them all
            for index in range(len(candidates)):
                count(index)
            break
        low, high = (low, middle) if count(middle) <= target else (middle + 1, high)
    else:
        for index in (low - 1, low):
            if 0 <= index < len(candidates):
                count(index)
    allowed = [(abs(c - target), -candidates[i], c) for i, c in counts.items() if c is not None and c <= target * 1.02]
    if not allowed:
        known = [c for c in counts.values() if c is not None]
        smallest = f"; the smallest shape it allows has {min(known):,}" if known and low >= len(candidates) else ""
        rounded = f" (--round-to {config.round_to})" if config.structure in ("channels", "hidden") else ""
        raise LLMPruneError(f"{asked}: no --structure {config.structure} shape{rounded} of "
                            f"{type(model).__name__} has at most {target * 1.02:,.0f} parameters{smallest}: "
                            "give a larger target or another structure" + (" or a lower --round-to" if rounded else ""))
    _, negative, found = min(allowed)
    return -negative, found


def check_layer_by_layer(config: StructuredConfig, streamed: bool, parallel: bool, checkpointed: bool = False) -> None:
    """Taylor importance and skip-loss layer importance run the whole model over all calibration windows, which
    neither a streamed model (never whole in memory) nor a rank's share of the windows allows; --structure
    hidden changes every tensor of the model at once, so it has no layers to stream, share or checkpoint."""
    if config.structure == "hidden" and (streamed or parallel or checkpointed):
        raise LLMPruneError("--structure hidden changes every tensor of the model at once: run it in one process, "
                            "in memory (no --stream, --checkpoint, --resume or torchrun)")
    if config.structure == "hidden":
        return
    whole_model = config.layer_importance == "skip_loss" if config.structure == "layers" else \
        get_importance(config.method).needs == "gradients"
    if whole_model and (streamed or parallel):
        raise LLMPruneError(f"{config.layer_importance if config.structure == 'layers' else config.method} runs the "
                            f"whole model over all calibration windows: run it in one process, in memory (no "
                            f"--stream, no torchrun), or choose another importance")


@torch.no_grad()
def prune_structured(model: nn.Module, calibration: torch.Tensor | None, config: StructuredConfig,
                     progress: bool = True, store=None, checkpoint=None, parallel=None,
                     offload_activations=None, dense=None, drop_layers: list[int] | None = None) -> PruneReport:
    """Prune `model` in place; the returned PruneReport's `structure` is the report's record. `calibration`:
    (nsamples, seqlen) token ids (this rank's share under `parallel`); only magnitude without bias compensation
    needs none. With config.target_params, the sparsity is the one `sparsity_for_target` chooses for it.
    `store`, `checkpoint`, `parallel`, `offload_activations`: as for the unstructured `prune`.
    Internal (structured/search.py): `dense`, a DenseStatistics of this model's layers (dense_pass.py): every
    score comes from it, no calibration pass runs; `drop_layers`: the decoder layers that go (--structure
    layers), unscored."""
    if (dense is not None or drop_layers is not None) and (store, checkpoint, parallel) != (None, None, None):
        raise LLMPruneError("internal error: shared dense statistics prune in memory, in one process")
    target = None
    if config.target_params is not None:
        target = target_count(model, config.target_params)
        config = replace(config, sparsity=sparsity_for_target(model, config, target,
                                                              f"--target-params {config.target_params}")[0])
    plan = plan_structure(model, config)
    check_layer_by_layer(config, any(p.device.type == "meta" for p in model.parameters()), parallel is not None,
                         checkpoint is not None)
    if dense is not None:
        dense.check(plan.structure, len(plan.layers))
    if plan.hidden is not None:
        report = _prune_hidden(model, calibration, config, plan, dense)
        report.structure.target_params = target
        return report
    importance = get_importance(config.method) if plan.spec else None
    needs_data = plan.structure == "layers" or importance.needs is not None or plan.compensate
    if needs_data and calibration is None and dense is None and drop_layers is None:
        raise LLMPruneError(f"--structure {plan.structure} with {config.method or config.layer_importance}"
                            f"{' and bias compensation' if plan.compensate else ''} needs calibration data")
    device = resolve_device(config.device)
    params_before, decoder_before = parameter_counts(model, plan.layers)
    before, kept = plan.counts
    record = StructureRecord(plan.structure, config.method if plan.spec else
                             "given" if drop_layers is not None else config.layer_importance,
                             config.sparsity, plan.unit, 1 - kept / before, before, kept, plan.compensate,
                             plan.compensation_note)
    if plan.structure == "channels":
        record.round_to = config.round_to
    elif plan.structure == "heads":
        record.heads_mode = plan.heads_mode
        record.heads_after = plan.spec.attributes["num_heads"]
        record.kv_heads_after = plan.spec.attributes["num_key_value_heads"]
    report = PruneReport(record.method, config.sparsity, "structured", "uniform", seconds={}, structure=record)
    store = store or ModelLayers(plan.layers, device)
    hooks = {"store": store, "checkpoint": checkpoint, "parallel": parallel, "offload": offload_activations}
    if plan.spec:
        _prune_units(model, calibration, config, plan, importance, report, device, progress, dense=dense, **hooks)
    else:
        _prune_layers(model, calibration, config, plan, report, device, progress, dense=dense, drop=drop_layers,
                      **hooks)
    for key, value in plan.changes.items():
        setattr(model.config, key, value)
    start = time.perf_counter()
    verify_against_config(model)
    report.seconds["verify"] = time.perf_counter() - start
    record.seconds = report.seconds  # one dict: the report's phases are the record's
    record.target_params = target
    _count_after(model, plan, record, params_before, decoder_before)
    return report


def _count_after(model, plan: Plan, record: StructureRecord, params_before: int, decoder_before: int) -> None:
    params_after, decoder_after = parameter_counts(model, plan.layers)
    record.params_before, record.params_after = params_before, params_after
    record.params_removed_fraction = 1 - params_after / params_before
    record.decoder_params_before, record.decoder_params_after = decoder_before, decoder_after
    record.decoder_params_removed_fraction = 1 - decoder_after / decoder_before
    record.config_changes = dict(plan.changes)


def _prune_hidden(model, calibration, config: StructuredConfig, plan: Plan, dense=None) -> PruneReport:
    """--structure hidden (hidden.py) where the model is; its record counts hidden sizes. With `dense`, the
    activation importance is the dense pass's (magnitude reads the weights as they are now either way)."""
    from .hidden import hidden_scores, kept_channels, remove_hidden_channels

    from_dense = dense is not None and config.hidden_importance == "activation"
    if config.hidden_importance == "activation" and calibration is None and not from_dense:
        raise LLMPruneError("--structure hidden with --hidden-importance activation needs calibration data")
    hidden = plan.hidden
    params_before, decoder_before = parameter_counts(model, plan.layers)
    record = StructureRecord("hidden", config.hidden_importance, config.sparsity, plan.unit,
                             1 - hidden.width / hidden.hidden, hidden.hidden, hidden.width, round_to=config.round_to)
    report = PruneReport(record.method, config.sparsity, "structured", "uniform", seconds={}, structure=record)
    start = time.perf_counter()
    scores = dense.hidden_scores() if from_dense else hidden_scores(model, hidden, calibration,
                                                                    config.hidden_importance, config.batch_size)
    report.seconds["score"] = time.perf_counter() - start
    start = time.perf_counter()
    remove_hidden_channels(model, hidden, kept_channels(scores, hidden.width))  # checks the config's shapes too
    report.seconds["prune"] = time.perf_counter() - start
    record.seconds = report.seconds
    _count_after(model, plan, record, params_before, decoder_before)
    return report


def _prune_units(model, calibration, config, plan: Plan, importance, report, device, progress, store, checkpoint,
                 parallel, offload, dense=None):
    spec, layers, record, seconds = plan.spec, plan.layers, report.structure, report.seconds
    gradients = None
    if dense is not None:
        gradients = dense.gradient_map() if importance.needs == "gradients" else None
    elif importance.needs == "gradients":
        start = time.perf_counter()
        modules = {f"{i}.{name}": layer.get_submodule(name) for i, layer in enumerate(layers)
                   for name in spec.rows + spec.cols}
        with torch.enable_grad():
            gradients = loss_gradients(model, calibration, modules, config.batch_size, progress)
        seconds["gradients"] = time.perf_counter() - start
    calls = None
    if dense is None and (importance.needs == "statistics" or plan.compensate):
        start = time.perf_counter()
        calls = capture_layer_calls(model, layers, calibration, config.batch_size, device, progress, offload)
        seconds["capture"] = elapsed(start, device)
    planned = meta_model(model, planned_config(model, plan.changes))  # the shapes each layer is cut to
    planned_layers = decoder_layers(planned)[1]

    def recut(i, layer):  # a layer the interrupted run finished: its shapes again, from the record
        removed = set(record.layers[i].removed)
        keep = torch.tensor([u for u in range(spec.units) if u not in removed], device=weight_matrix(
            layer.get_submodule(spec.cols[0])).device)
        cut_units(layer, spec, keep, None, planned_layers[i])

    first = checkpoint.restore(layers, calls, report, reshape=recut) if checkpoint is not None else 0
    for phase in ("statistics", "prune", "propagate"):
        seconds.setdefault(phase, 0.0)
    for i, layer, bar in each_layer(store, len(layers), first, calls, len(layers) - 1 if calls else -1, checkpoint,
                                    report, device, progress, desc=f"pruning {plan.structure}"):
        start = time.perf_counter()
        statistics = {}
        if calls is not None:
            bar.set_postfix_str(f"layer {i + 1}/{len(layers)}: statistics")
            watched = {name: layer.get_submodule(name) for name in (spec.rows[0], spec.cols[0])}
            statistics = collect_statistics(layer, i, calls, watched, ("input_moments",),
                                            reduce=parallel.reduce if parallel is not None else None)
        elif dense is not None:
            statistics = dense.units[i] if dense.units else {}
        seconds["statistics"] += elapsed(start, device)
        start = time.perf_counter()
        if parallel is None or parallel.rank == 0:
            layer_gradients = gradients and {name: gradients[f"{i}.{name}"].to(device) for name in spec.rows + spec.cols}
            scores = importance.fn(unit_view(layer, spec, statistics, layer_gradients))
            keep = select_units(scores, spec.blocks, spec.kept // spec.blocks)
        else:
            keep = torch.empty(spec.kept, dtype=torch.long, device=device)
        if parallel is not None:
            parallel.decide(keep)
        channel_mean = statistics[spec.cols[0]]["input_moments"]["mean"] if plan.compensate else None
        cut_units(layer, spec, keep, channel_mean, planned_layers[i])
        seconds["prune"] += elapsed(start, device)
        record.layers.append(StructureLayer(i, spec.kept, sorted(set(range(spec.units)) - set(keep.tolist()))))


def cut_units(layer: nn.Module, spec: UnitSpec, keep: torch.Tensor, channel_mean: torch.Tensor | None,
              planned: nn.Module) -> None:
    """Keep the units `keep` of one layer (remove_units), give its linears the zero biases the planned layer
    (`planned`, the model's own class built from the new config) has where they have none, and set the
    attributes its modules' forward reads: the layer is then final, ready to be written."""
    remove_units(layer, spec, keep, channel_mean)
    twins = dict(planned.named_modules())
    for name, module in layer.named_modules():
        if is_linear(module) and module.bias is None and getattr(twins.get(name), "bias", None) is not None:
            add_to_bias(module, torch.zeros((), device=module.weight.device))
    set_present_attributes(layer.get_submodule(spec.owner), spec.attributes)


def unit_view(layer: nn.Module, spec: UnitSpec, statistics: dict, gradients: dict | None) -> UnitView:
    """The layer's weights (and gradients, statistics) grouped by unit, for an importance function."""

    def rows(matrix):  # (units * per, in) -> (units, per, in)
        return matrix.float().reshape(spec.units, -1, matrix.shape[1])

    def cols(matrix):  # (out, units * per) -> (units, out, per)
        return matrix.float().reshape(matrix.shape[0], spec.units, -1).transpose(0, 1)

    view = UnitView([rows(weight_matrix(layer.get_submodule(n))) for n in spec.rows],
                    [cols(weight_matrix(layer.get_submodule(n))) for n in spec.cols])
    if statistics:
        inputs, channels = statistics[spec.rows[0]]["input_moments"], statistics[spec.cols[0]]["input_moments"]
        view.input_norms = inputs["norms"]
        view.channel_norms = channels["norms"].reshape(spec.units, -1)
        view.channel_variance = channels["variance"].reshape(spec.units, -1)
    if gradients:
        view.row_grads = [rows(gradients[n]) for n in spec.rows]
        view.col_grads = [cols(gradients[n]) for n in spec.cols]
    return view


def select_units(scores: torch.Tensor, blocks: int, kept_per_block: int) -> torch.Tensor:
    """Indices of the highest scores, `kept_per_block` in each block of consecutive units, ascending."""
    if not bool(torch.isfinite(scores).all()):
        raise LLMPruneError("internal error: importance scores hold NaN or Inf; please report this")
    grouped = scores.reshape(blocks, -1)
    top = grouped.topk(kept_per_block, dim=1).indices.sort(dim=1).values
    return (top + torch.arange(blocks, device=scores.device)[:, None] * grouped.shape[1]).flatten()


def _expand(units: torch.Tensor, per: int) -> torch.Tensor:
    """Unit indices -> the feature indices they cover (each unit `per` consecutive features)."""
    return (units[:, None] * per + torch.arange(per, device=units.device)).flatten()


def remove_units(layer: nn.Module, spec: UnitSpec, keep: torch.Tensor, channel_mean: torch.Tensor | None) -> None:
    """Slice the kept units out of the layer's projections; with `channel_mean` (the output projection's
    mean input over the calibration tokens), fold the removed units' mean contribution into its bias."""
    for name in spec.rows:
        module = layer.get_submodule(name)
        keep_outputs(module, _expand(keep, weight_matrix(module).shape[0] // spec.units))
    for name in spec.cols:
        module = layer.get_submodule(name)
        columns = _expand(keep, weight_matrix(module).shape[1] // spec.units)
        if channel_mean is not None:
            mask = torch.zeros(weight_matrix(module).shape[1], dtype=torch.bool, device=columns.device)
            mask[columns] = True
            add_to_bias(module, removed_mean_contribution(weight_matrix(module), channel_mean, mask))
        keep_inputs(module, columns)


def _prune_layers(model, calibration, config, plan: Plan, report, device, progress, store, checkpoint, parallel,
                  offload, dense=None, drop=None):
    layers, record = plan.layers, report.structure
    if drop is not None:
        _remove_given_layers(model, plan, record, drop)
        return
    start = time.perf_counter()
    if dense is not None:
        scores = record.layer_scores = list(dense.layer_scores(config.layer_importance))
    elif config.layer_importance == "influence":
        calls = capture_layer_calls(model, layers, calibration, config.batch_size, device, progress, offload)
        first = checkpoint.restore(layers, calls, report) if checkpoint is not None else 0
        record.layer_scores = record.layer_scores or []
        for i, layer, _ in each_layer(store, len(layers), first, calls, -1, checkpoint, report, device, progress,
                                      desc="block influence"):
            total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum over tokens of 1 - cos, tokens)
            for batch, rows in enumerate(calls.batches):
                out = run_layer(layer, i, calls, batch)
                terms = influence_terms(calls.hidden[rows], out)
                total += torch.tensor([float(terms.sum()), terms.numel()], dtype=torch.float64, device=device)
                calls.hidden[rows] = out  # the dense layer's outputs feed the next
            if parallel is not None:
                parallel.sum(total)
            record.layer_scores.append(float(total[0] / total[1]))
        scores = record.layer_scores
    else:
        scores = skip_losses(model, layers, calibration, config.batch_size, progress)
        record.layer_scores = scores
    report.seconds["score"] = report.seconds.get("score", 0.0) + elapsed(start, device)
    removed = torch.tensor(lowest(scores, plan.remove_count), device=device)  # on the device: NCCL's collectives
    if parallel is not None:
        parallel.decide(removed)
    record.removed_layers = removed.tolist()
    remove_layers(layers, record.removed_layers, model.config, plan.layers_key)


def _remove_given_layers(model, plan: Plan, record: StructureRecord, drop: list[int]) -> None:
    """Remove exactly the layers `drop` (a searched candidate's, which its score was measured with)."""
    count = len(plan.layers)
    if sorted(set(drop)) != sorted(drop) or not all(isinstance(i, int) and 0 <= i < count for i in drop) \
            or len(drop) != plan.remove_count:
        raise LLMPruneError(f"the layers to remove {list(drop)} must be {plan.remove_count} distinct indices in "
                            f"[0, {count - 1}] for --sparsity {record.sparsity:g} of {count} layers: take them "
                            "from the same candidate as its shape")
    record.removed_layers = sorted(drop)
    remove_layers(plan.layers, record.removed_layers, model.config, plan.layers_key)
