"""Mixture-of-experts layers: find the fused experts of a decoder layer, gather each expert's input statistics over
the tokens routed to it, prune each expert's matrices with the ordinary methods, and account for every weight.

Experts are stored as 3-D parameters (experts, out, in), or (experts, in, out) when transposed, which the runner's
search for nn.Linear never sees. A family's layout is data:
    - the parameter names below, each known to read the experts' input or their intermediate activation;
    - the flags transformers' experts classes carry (`is_transposed`, `is_concatenated`: gate and up rows
      concatenated or interleaved, `has_gate`, `has_bias`), with the shapes deciding where a flag is missing;
    - the module's own gate function (`_apply_gate`, else `act_fn(gate) * up`) for the intermediate activation.
A layout read wrongly cannot pass unnoticed: on the first batch the experts' output is recomputed from these
views and compared with the module's own output (`check_reconstruction`).

Routers are never pruned; shared experts are ordinary MLPs (nn.Linear) that the runner prunes as such. Older
layouts keep a list of per-expert modules of nn.Linear (`ExpertList`): the same path prunes them, each expert's
own module computing its intermediate activation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import LLMPruneError
from .statistics import new_statistic

# Fused expert matrices by parameter name: what each reads ("hidden": the experts' input; "intermediate": the
# gated activation between the expert's two halves).
EXPERT_MATRICES = {"gate_up_proj": "hidden", "gate_proj": "hidden", "up_proj": "hidden", "w1": "hidden",
                   "w3": "hidden", "w13": "hidden", "down_proj": "intermediate", "w2": "intermediate"}
FUSED_GATE_UP = ("gate_up_proj", "w13")  # one matrix holding the gate rows and the up rows
GATE_NAMES, UP_NAMES = ("gate_proj", "w1"), ("up_proj", "w3")
EXPERT_LISTS = ("experts",)  # older layouts: a ModuleList of per-expert MLPs by this name
LISTED_EXPERT = re.compile(r"\.experts\.\d+\.")  # a linear inside such a list

# Weights of a decoder layer by kind, from their full names: the first pattern that matches names the kind.
# Routers decide which experts run; they are kept dense.
ROUTER = re.compile(r"\.(gate|router|shared_expert_gate|gating)(\.weight)?$")
KIND_PATTERNS = (("router", ROUTER), ("shared", re.compile(r"shared_expert")),
                 ("experts", re.compile(r"\.experts(\.|$)")),
                 ("attention", re.compile(r"attn|attention")),
                 ("mlp", re.compile(r"mlp|feed_forward|ffn|\.fc\d|dense_h_to_4h|dense_4h_to_h")))


def weight_kind(name: str) -> str:
    """attention, mlp, experts, shared, router, or other."""
    return next((kind for kind, pattern in KIND_PATTERNS if pattern.search(name)), "other")


def is_router(name: str) -> bool:
    return bool(ROUTER.search(name))


def kept_from_linears(name: str) -> bool:
    """Linears the runner's own loop leaves alone: routers (never pruned) and listed experts (pruned here)."""
    return is_router(name) or bool(LISTED_EXPERT.search(name))


@dataclass(frozen=True)
class ExpertMatrix:
    """One fused parameter: its name in the experts module, what it reads, how it is stored."""

    param: str
    reads: str  # "hidden" or "intermediate"
    transposed: bool  # stored (experts, in, out)
    interleaved: bool = False  # gate and up rows alternate (gate0, up0, gate1, ...) instead of [gate; up]

    @property
    def fused_gate_up(self) -> bool:
        return self.param in FUSED_GATE_UP


@dataclass
class ExpertBlock:
    """A module holding every routed expert of one MoE layer as fused parameters."""

    name: str  # full module name
    module: nn.Module
    num_experts: int
    matrices: list[ExpertMatrix]
    skipped: frozenset[str] = frozenset()  # parameter names --skip keeps dense

    @property
    def targets(self) -> list[ExpertMatrix]:
        return [m for m in self.matrices if m.param not in self.skipped]

    def _parameter(self, matrix: ExpertMatrix) -> torch.Tensor:
        return getattr(self.module, matrix.param)

    def weight(self, matrix: ExpertMatrix, expert: int) -> torch.Tensor:
        """Expert `expert`'s matrix as (out, in); a fused gate/up as [gate rows; up rows] whatever its storage.
        A view of the parameter, except for an interleaved layout (a copy in the canonical order)."""
        w = self._parameter(matrix).data[expert]
        w = w.t() if matrix.transposed else w
        if matrix.interleaved:
            w = torch.cat([w[0::2], w[1::2]])
        return w

    def set_weight(self, matrix: ExpertMatrix, expert: int, new: torch.Tensor) -> None:
        stored = self._parameter(matrix).data[expert]
        if matrix.interleaved:
            half = new.shape[0] // 2
            new = torch.stack([new[:half], new[half:]], dim=1).reshape(new.shape)
        (stored.t() if matrix.transposed else stored).copy_(new.to(stored.dtype))

    def segments(self, matrix: ExpertMatrix, expert: int) -> tuple[int, ...]:
        rows = self.weight(matrix, expert).shape[0]
        return (rows // 2, rows // 2) if matrix.fused_gate_up else (rows,)

    def _bias(self, matrix: ExpertMatrix, expert: int):
        bias = getattr(self.module, f"{matrix.param}_bias", None)
        return None if bias is None else bias[expert]

    def _project(self, matrix: ExpertMatrix, expert: int, x: torch.Tensor) -> torch.Tensor:
        w = self._parameter(matrix)[expert]
        out = x @ w if matrix.transposed else x @ w.t()
        bias = self._bias(matrix, expert)
        return out if bias is None else out + bias

    def intermediate(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """The activation expert `expert` feeds its output matrix, for inputs `x` (tokens, hidden): the module's own
        gate function on the fused gate/up output, or act(gate) * up from separate matrices, or act(up)."""
        by_name = {m.param: m for m in self.matrices if m.reads == "hidden"}
        fused = next((m for m in by_name.values() if m.fused_gate_up), None)
        if fused is not None:
            out = self._project(fused, expert, x)
            if hasattr(self.module, "_apply_gate"):
                return self.module._apply_gate(out)
            gate, up = out.chunk(2, dim=-1)
            return self.module.act_fn(gate) * up
        gate = next((by_name[n] for n in GATE_NAMES if n in by_name), None)
        up = next((by_name[n] for n in UP_NAMES if n in by_name), None)
        if up is None:
            raise LLMPruneError(f"{self.name}: no up projection among {', '.join(by_name)}: an experts layout "
                                "llmprune does not know")
        if gate is None:
            return self.module.act_fn(self._project(up, expert, x))
        return self.module.act_fn(self._project(gate, expert, x)) * self._project(up, expert, x)

    def output(self, x: torch.Tensor, expert: int, inner: torch.Tensor | None = None) -> torch.Tensor:
        """Expert `expert`'s output for inputs `x` (before its routing weight)."""
        inner = self.intermediate(x, expert) if inner is None else inner
        down = next(m for m in self.matrices if m.reads == "intermediate")
        out = self._project(down, expert, inner)
        if getattr(self.module, "has_post_expert_norm", False):
            out = self.module.post_expert_norm(out)
        return out

    @property
    def stop_module(self) -> nn.Module:
        """The module whose end is the end of this block's work in a forward pass."""
        return self.module

    def stored(self, matrix: ExpertMatrix) -> list[torch.Tensor]:
        return [self._parameter(matrix)]

    def weight_names(self, params) -> set[str]:
        return {f"{self.name}.{param}" for param in params}

    def watch(self, statistics: "ExpertStatistics", rare: list[int] | None):
        """Hooks feeding `statistics`: each expert's routed tokens, or (given `rare`) all tokens to those experts.
        The experts module is called with (hidden_states, top-k indices, top-k weights)."""
        if rare is not None:
            def all_tokens(module, args, kwargs):
                statistics.add_all_tokens(_routing(args, kwargs)[0], rare)

            return [self.module.register_forward_pre_hook(all_tokens, with_kwargs=True)]

        def routed(module, args, kwargs, output):
            hidden, chosen, weights = _routing(args, kwargs)
            statistics.add_routed(hidden, chosen, weights, None if statistics.checked else output)

        return [self.module.register_forward_hook(routed, with_kwargs=True)]


@dataclass
class ExpertList:
    """Routed experts as a list of modules holding nn.Linear (older layouts): each expert's module computes its own
    intermediate activation, seen as the input of its output linear."""

    name: str  # full name of the list
    module: nn.ModuleList
    num_experts: int
    matrices: list[ExpertMatrix]
    parent: nn.Module  # the MoE block: its input is every token of the layer
    skipped: frozenset[str] = frozenset()

    targets = ExpertBlock.targets

    def _linear(self, matrix: ExpertMatrix, expert: int) -> nn.Module:
        return self.module[expert].get_submodule(matrix.param)

    def weight(self, matrix: ExpertMatrix, expert: int) -> torch.Tensor:
        from ..inputs.models import weight_matrix

        return weight_matrix(self._linear(matrix, expert))

    def set_weight(self, matrix: ExpertMatrix, expert: int, new: torch.Tensor) -> None:
        from ..inputs.models import set_weight_matrix

        set_weight_matrix(self._linear(matrix, expert), new)

    def segments(self, matrix: ExpertMatrix, expert: int) -> tuple[int, ...]:
        return (self.weight(matrix, expert).shape[0],)

    def _down(self, expert: int) -> nn.Module:
        return self._linear(next(m for m in self.matrices if m.reads == "intermediate"), expert)

    def intermediate(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        seen = []
        handle = self._down(expert).register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            self.module[expert](x)
        finally:
            handle.remove()
        return seen[0]

    @property
    def stop_module(self) -> nn.Module:
        return self.parent

    def stored(self, matrix: ExpertMatrix) -> list[torch.Tensor]:
        return [self._linear(matrix, e).weight for e in range(self.num_experts)]

    def weight_names(self, params) -> set[str]:
        return {f"{self.name}.{e}.{param}.weight" for param in params for e in range(self.num_experts)}

    def watch(self, statistics: "ExpertStatistics", rare: list[int] | None):
        """Hooks feeding `statistics`: each expert module sees only its routed tokens and its output linear their
        intermediate activation; all of the layer's tokens are the MoE block's input."""
        if rare is not None:
            return [self.parent.register_forward_pre_hook(
                lambda module, args: statistics.add_all_tokens(args[0], rare))]
        handles = []
        for expert in range(self.num_experts):
            handles.append(self.module[expert].register_forward_pre_hook(
                lambda module, args, e=expert: statistics.add_expert_input(e, args[0])))
            handles.append(self._down(expert).register_forward_pre_hook(
                lambda module, args, e=expert: statistics.add(e, "intermediate", args[0])))
        return handles


def expert_count(module: nn.Module) -> int | None:
    """The number of experts a module holds as fused 3-D parameters (their shared leading size), or None."""
    sizes = {p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 3}
    if len(sizes) != 1:
        return None
    declared = getattr(module, "num_experts", None)
    count = sizes.pop()
    return count if declared in (None, count) else None


def find_expert_blocks(layer: nn.Module, prefix: str, hidden_size: int | None) -> list[ExpertBlock]:
    """The fused experts modules of a decoder layer, their matrices read from the names table and the
    module's own flags (shapes against `hidden_size` where a flag is missing)."""
    blocks = []
    for name, module in layer.named_modules():
        count = expert_count(module)
        if count is None:
            continue
        full = f"{prefix}.{name}" if name else prefix
        matrices = []
        for param, tensor in module.named_parameters(recurse=False):
            if tensor.dim() != 3 or param not in EXPERT_MATRICES:
                continue  # an unknown 3-D parameter stays dense and is reported as unaccounted
            reads = EXPERT_MATRICES[param]
            transposed = getattr(module, "is_transposed", None)
            if transposed is None:
                transposed = _transposed_from_shape(tensor.shape, reads, hidden_size)
            interleaved = param in FUSED_GATE_UP and getattr(module, "is_concatenated", True) is False
            matrices.append(ExpertMatrix(param, reads, bool(transposed), interleaved))
        if not any(m.reads == "intermediate" for m in matrices) or not any(m.reads == "hidden" for m in matrices):
            continue
        blocks.append(ExpertBlock(full, module, count, matrices))
    return blocks + find_expert_lists(layer, prefix)


def find_expert_lists(layer: nn.Module, prefix: str) -> list[ExpertList]:
    """Lists of per-expert modules named as EXPERT_LISTS says, whose linears are named in EXPERT_MATRICES."""
    from ..inputs.models import linears

    found = []
    for name, module in layer.named_modules():
        if not (isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in EXPERT_LISTS and len(module) > 1
                and len({type(expert) for expert in module}) == 1):
            continue
        inner = linears(module[0])
        matrices = [ExpertMatrix(local, EXPERT_MATRICES[local], False) for local in inner if local in EXPERT_MATRICES]
        if {m.reads for m in matrices} != {"hidden", "intermediate"}:
            continue
        parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
        found.append(ExpertList(f"{prefix}.{name}", module, len(module), matrices, parent))
    return found


def _transposed_from_shape(shape, reads, hidden_size) -> bool:
    """Without the module's own flag: a matrix reading the hidden states has `hidden_size` inputs; one writing
    them has `hidden_size` outputs. Stored (experts, out, in) unless the shapes say otherwise."""
    if hidden_size is None:
        return False
    axis_in, axis_out = (1, 2)  # positions of (in, out) when transposed
    side = axis_in if reads == "hidden" else axis_out
    other = axis_out if reads == "hidden" else axis_in
    if shape[side] == hidden_size and shape[other] != hidden_size:
        return True
    if shape[other] == hidden_size and shape[side] != hidden_size:
        return False
    return False  # square: the check of the reconstructed output decides whether this reading is right


# ------------------------------------------------------------------------------------------ statistics


@dataclass
class ExpertStatistics:
    """What calibration saw of one experts block: tokens routed to each expert and, per expert, the statistics
    of its two inputs; `source[e]` says where an expert's statistics come from."""

    block: ExpertBlock
    kinds: tuple[str, ...]
    tokens: list[int] = field(default_factory=list)
    routed: dict = field(default_factory=dict)  # (expert, reads) -> {kind: statistic}
    source: list[str] = field(default_factory=list)  # "routed", "all-tokens" or "magnitude" per expert
    checked: bool = False

    def __post_init__(self):
        self.tokens = [0] * self.block.num_experts
        self.source = ["routed"] * self.block.num_experts

    def add(self, expert: int, reads: str, x: torch.Tensor) -> None:
        stats = self.routed.setdefault((expert, reads), {k: new_statistic(k, x.shape[-1], x.device)
                                                         for k in self.kinds})
        for statistic in stats.values():
            statistic.add(x)

    def add_expert_input(self, expert: int, x: torch.Tensor) -> None:
        """Tokens an expert's own module received (a listed expert is called with its routed tokens only)."""
        self.tokens[expert] += x.numel() // x.shape[-1]
        self.add(expert, "hidden", x)

    def add_routed(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                   output: torch.Tensor | None) -> None:
        """One batch: each expert's own tokens. With the module's `output`, also check the layout reading."""
        hidden = hidden.reshape(-1, hidden.shape[-1])
        index = index.reshape(hidden.shape[0], -1)
        rebuilt = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if output is not None else None
        for expert in range(self.block.num_experts):
            token, slot = torch.where(index == expert)
            self.tokens[expert] += len(token)
            if not len(token):
                continue
            x = hidden[token]
            try:
                inner = self.block.intermediate(x, expert)
                if rebuilt is not None:
                    out = self.block.output(x, expert, inner).float()
                    rebuilt.index_add_(0, token, out * weights.reshape(len(hidden), -1)[token, slot, None])
            except RuntimeError as err:  # shapes that do not fit: the layout was read wrongly
                raise LLMPruneError(f"{self.block.name}: llmprune cannot read this experts layout "
                                    f"({str(err).splitlines()[0]})") from None
            if self.kinds:
                self.add(expert, "hidden", x)
                self.add(expert, "intermediate", inner)
        if rebuilt is not None:
            check_reconstruction(self.block, rebuilt, output)
            self.checked = True

    def add_all_tokens(self, hidden: torch.Tensor, experts: list[int]) -> None:
        """One batch: every token of the layer, as the inputs of the given (rare) experts."""
        hidden = hidden.reshape(-1, hidden.shape[-1])
        for expert in experts:
            self.add(expert, "hidden", hidden)
            self.add(expert, "intermediate", self.block.intermediate(hidden, expert))

    def finalize(self) -> dict:
        """{(expert, reads): {kind: value}}, checked finite."""
        finals = {key: {kind: stat.finalize() for kind, stat in stats.items()} for key, stats in self.routed.items()}
        for (expert, reads), value in finals.items():
            tensors = [t for v in value.values() for t in (v.values() if isinstance(v, dict) else [v])]
            if not all(bool(torch.isfinite(t).all()) for t in tensors):
                raise LLMPruneError(f"the calibration statistics of expert {expert} of {self.block.name} hold NaN or "
                                    "Inf: the activations overflow in this dtype; try --dtype float32")
        return finals


def check_reconstruction(block: ExpertBlock, rebuilt: torch.Tensor, output: torch.Tensor) -> None:
    """The experts' output recomputed from llmprune's reading of the layout must be the module's own."""
    exact = output.dtype == torch.float32 and all(p.dtype == torch.float32 for p in block.module.parameters())
    tolerance = 1e-4 if exact else 5e-2  # half precision: rounding differs with the order of the sums
    output = output.reshape(rebuilt.shape).float()
    error = float((rebuilt - output).norm() / output.norm().clamp_min(1e-12))
    if error > tolerance:
        raise LLMPruneError(f"{block.name}: llmprune's reading of this experts layout recomputes its output with "
                            f"relative error {error:.2g}; this family's experts are not supported yet (--skip "
                            f"'{re.escape(block.name.rsplit('.', 1)[-1])}' keeps them dense)")


def _routing(args, kwargs):
    """(hidden_states, top-k expert indices, top-k routing weights) from an experts module's call."""
    values = list(args) + list(kwargs.values())
    if len(values) < 3:
        raise LLMPruneError("an experts module was called without (hidden_states, indices, weights): an experts "
                            "interface llmprune does not know")
    return values[0], values[1], values[2]


def collect_expert_statistics(layer, index, calls, blocks: list[ExpertBlock], kinds, min_tokens: int,
                              rare_policy: str) -> dict[str, tuple[ExpertStatistics, dict]]:
    """Pass 1 of an MoE layer, on its dense weights: {block name: (ExpertStatistics, finalized statistics)}.
    Experts routed fewer than `min_tokens` tokens take their statistics from all of the layer's tokens (a second
    pass, over those experts only) or are pruned by magnitude, as `rare_policy` says."""
    from .runner import _StopForward, run_layer

    collected = {block.name: ExpertStatistics(block, kinds) for block in blocks}
    rare: dict[str, list[int]] = {}

    def stop(module, args, output):
        raise _StopForward

    def run(all_tokens: bool):
        handles = [h for block in blocks if not all_tokens or block.name in rare
                   for h in block.watch(collected[block.name], rare[block.name] if all_tokens else None)]
        handles.append(blocks[-1].stop_module.register_forward_hook(stop))
        try:
            for batch in range(len(calls.batches)):
                try:
                    run_layer(layer, index, calls, batch)
                except _StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()

    run(all_tokens=False)
    for name, statistics in collected.items():
        few = [e for e, n in enumerate(statistics.tokens) if n < min_tokens]
        for expert in few:
            statistics.source[expert] = rare_policy
            for reads in ("hidden", "intermediate"):
                statistics.routed.pop((expert, reads), None)
        if few and rare_policy == "all-tokens" and kinds:
            rare[name] = few
    if rare:
        run(all_tokens=True)
    return {name: (statistics, statistics.finalize()) for name, statistics in collected.items()}


# ------------------------------------------------------------------------------------------ pruning


def prune_expert_block(block: ExpertBlock, statistics: ExpertStatistics | None, finals: dict, method, update,
                       sparsity: float, config, layer_index: int) -> list[dict]:
    """Prune every expert's matrices, each from its own statistics (or by magnitude for a rare expert under
    --rare-experts magnitude); returns one record per expert matrix."""
    from .methods import LayerTarget, get_method
    from .runner import verify_mask

    magnitude = get_method("magnitude")
    records = []
    for expert in range(block.num_experts):
        source = statistics.source[expert] if statistics is not None else "weights"
        tokens = statistics.tokens[expert] if statistics is not None else None
        for matrix in block.targets:
            weight = block.weight(matrix, expert).float()
            stats = finals.get((expert, matrix.reads), {})
            chosen = magnitude if source == "magnitude" else method
            segments = block.segments(matrix, expert)
            target = LayerTarget(sparsity, config.nm, segments if len(segments) > 1 else ())
            knobs = config.method_config.knobs() if chosen is method and config.method_config is not None else {}
            new_weight, keep = chosen.fn(weight, stats.get(chosen.statistic), target, **knobs)
            if update is not None and source != "magnitude":
                new_weight = update.fn(weight, stats[update.statistic], keep, **config.update_config.knobs())
            label = f"{block.name}.{matrix.param}[{expert}]"
            verify_mask([label], new_weight, keep, list(segments), chosen, sparsity, config)
            block.set_weight(matrix, expert, new_weight)
            stored = block.weight(matrix, expert)
            if not bool(torch.isfinite(stored).all()):
                raise LLMPruneError(f"{label}: the pruned weights overflow {stored.dtype}; use --dtype float32")
            zeros = int((stored == 0).sum())
            records.append({"name": f"{block.name}.{matrix.param}", "expert": expert, "layer": layer_index,
                            "shape": list(stored.shape), "sparsity": sparsity, "achieved_sparsity": zeros / stored.numel(),
                            "tokens": tokens, "statistics": source, "zeros": zeros, "numel": stored.numel()})
    return records


def check_expert_blocks(blocks: list[ExpertBlock], config) -> None:
    """Before any work: N:M needs every expert matrix's input width divisible by M; weights must be finite."""
    for block in blocks:
        for matrix in block.targets:
            weight = block.weight(matrix, 0)
            if config.nm and weight.shape[1] % config.nm[1]:
                raise LLMPruneError(f"{block.name}.{matrix.param} has {weight.shape[1]} inputs per expert, not "
                                    f"divisible by M={config.nm[1]} of --pattern {config.pattern}: choose another "
                                    "pattern or --skip these experts")
            if any(t.device.type != "meta" and not bool(torch.isfinite(t).all()) for t in block.stored(matrix)):
                raise LLMPruneError(f"{block.name}.{matrix.param} has NaN or Inf weights: the model file is damaged")


# ------------------------------------------------------------------------------------------ accounting


def account_layer(layer: nn.Module, prefix: str, pruned: set[str], skipped: set[str]) -> list[dict]:
    """Every weight of two or more dimensions in a decoder layer, with its kind and status: pruned, dense by design
    (routers, biases), skipped (--skip) or unaccounted (left dense by nothing that asked for it)."""
    rows = []
    for name, parameter in layer.named_parameters():
        if parameter.dim() < 2:
            continue
        full = f"{prefix}.{name}"
        owner = full.removesuffix(".weight")
        if full in pruned:
            status = "pruned"
        elif is_router(owner) or is_router(full):
            status = "router"
        elif name.endswith("bias"):
            status = "bias"
        elif owner in skipped or full in skipped:
            status = "skipped"
        else:
            status = "unaccounted"
        kind = "router" if status == "router" else weight_kind(full)
        # count_nonzero: (parameter == 0).sum() widens the mask to int64, 8 bytes per weight of 128 experts
        zeros = parameter.numel() - int(torch.count_nonzero(parameter)) \
            if status == "pruned" and parameter.device.type != "meta" else 0
        rows.append({"name": full, "kind": kind, "status": status, "numel": parameter.numel(), "zeros": zeros})
    return rows


def coverage_of(rows: list[dict]) -> dict:
    """Per kind: parameters pruned and their zeros, and parameters left dense by status; plus every unaccounted
    weight by name (a silent skip made visible)."""
    kinds: dict[str, dict] = {}
    for row in rows:
        entry = kinds.setdefault(row["kind"], {"pruned": 0, "zeros": 0, "dense": 0, "dense_by": {}})
        if row["status"] == "pruned":
            entry["pruned"] += row["numel"]
            entry["zeros"] += row["zeros"]
        else:
            entry["dense"] += row["numel"]
            entry["dense_by"][row["status"]] = entry["dense_by"].get(row["status"], 0) + row["numel"]
    return {"kinds": kinds, "unaccounted": [row["name"] for row in rows if row["status"] == "unaccounted"]}


# ------------------------------------------------------------------------------------------ the runner's step


class ExpertPruning:
    """The runner's MoE step for one prune: finds each layer's experts (minus --skip), collects their statistics on
    the dense layer, prunes them after the layer's linears, and accounts for every weight of the layer."""

    def __init__(self, model: nn.Module, config, kinds: tuple[str, ...], tally: dict | None = None):
        from ..inputs.models import decoder_layers

        self.prefix, layers = decoder_layers(model)
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.hidden = getattr(text, "hidden_size", None)
        self.config, self.kinds = config, kinds
        self.skip = re.compile(config.skip) if config.skip else None
        # What the prune found so far, in one plain dict a checkpoint can save and a resumed run continue:
        # the expert matrices pruned, the tokens routed per block, and every weight's accounting row.
        self.tally = tally if tally is not None else {}
        for key, empty in (("experts", list), ("routing", dict), ("weights", list)):
            self.tally.setdefault(key, empty())
        self.records, self.routing, self.rows = self.tally["experts"], self.tally["routing"], self.tally["weights"]
        self.layers_with_experts = []
        for i, layer in enumerate(layers):
            blocks = self.blocks(layer, i)
            check_expert_blocks(blocks, config)
            if any(block.targets for block in blocks):
                self.layers_with_experts.append(i)

    def blocks(self, layer: nn.Module, i: int) -> list[ExpertBlock]:
        found = find_expert_blocks(layer, f"{self.prefix}.{i}", self.hidden)
        for block in found:
            if self.skip:
                block.skipped = frozenset(m.param for m in block.matrices
                                          if self.skip.search(f"{block.name}.{m.param}"))
        return found

    def collect(self, layer, i, calls) -> dict:
        blocks = [b for b in self.blocks(layer, i) if b.targets]
        if not blocks or calls is None or not self.kinds:
            return {}
        return collect_expert_statistics(layer, i, calls, blocks, self.kinds, self.config.min_expert_tokens,
                                         self.config.rare_experts)

    def prune(self, layer, i, collected: dict, method, update, sparsity: float) -> None:
        for block in self.blocks(layer, i):
            if not block.targets:
                continue
            statistics, finals = collected.get(block.name, (None, {}))
            self.records += prune_expert_block(block, statistics, finals, method, update, sparsity, self.config, i)
            if statistics is not None:
                self.routing[block.name] = {
                    "layer": i, "experts": block.num_experts, "tokens": list(statistics.tokens),
                    "rare": [e for e, source in enumerate(statistics.source) if source != "routed"]}

    def account(self, layer, i, linear_targets: dict[str, nn.Module]) -> None:
        prefix = f"{self.prefix}.{i}"
        pruned = {f"{name}.weight" for name in linear_targets}
        skipped = set()
        for block in self.blocks(layer, i):
            pruned |= block.weight_names(m.param for m in block.targets)
            skipped |= block.weight_names(block.skipped)
        if self.skip:
            skipped |= {f"{prefix}.{name}" for name, _ in layer.named_parameters() if self.skip.search(f"{prefix}.{name}")
                        or self.skip.search(f"{prefix}.{name}".removesuffix(".weight"))}
        self.rows += account_layer(layer, prefix, pruned, skipped)

    def coverage(self) -> dict:
        return coverage_of(self.rows)

    def summary(self) -> dict | None:
        """The report's `moe` record, or None for a model without experts."""
        if not self.records:
            return None
        return {"min_expert_tokens": self.config.min_expert_tokens, "rare_experts": self.config.rare_experts,
                "blocks": self.routing,
                "experts": [{k: v for k, v in r.items() if k not in ("zeros", "numel")} for r in self.records]}
