"""--structure hidden: remove embedding (hidden-size) channels of the residual stream, everywhere they appear.

A channel of the residual stream lives in the embeddings (tied to the head or not), every norm that reads the
stream, the input columns of every linear that reads a norm's output (q/k/v, gate/up, the head) and the output
rows of every linear that writes the stream (o, down). Which dimension of which tensor is such a channel is not
looked up by family: the model's own class is built on the meta device from its config with the smaller hidden
size (head_dim stated explicitly, so heads keep their width and rotary embeddings stay as they are), and every
dimension that shrank from hidden to the new width is one. A dimension that changes otherwise (a family that
derives the attention width from the hidden size) is refused with the reason.

Importance (higher = keep), over the same channel index everywhere:
- activation (Minitron): each norm's output |a| averaged over a window's tokens, then the L2 norm over the
  windows, summed over the norms;
- magnitude: the L2 norm of every weight in the channel, over all tensors that hold it.

RMS norms divide the sum of squares by the hidden size, so removing channels alone (even channels that are
exactly zero) scales every norm's output by sqrt(width / hidden). `rescale_norms` multiplies each norm's gain
by sqrt(hidden / width), which makes a model whose removed channels are zero in the residual stream compute
exactly what it computed before, up to the norms' epsilon (which would need the same factor; it is a config
value, left as it is, and negligible beside trained activations). A LayerNorm also subtracts the mean over the
hidden size: no gain restores it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import LLMPruneError
from ...inputs.models import is_linear
from .config import HIDDEN_IMPORTANCES
from .discovery import CONFIG_KEYS, meta_model, planned_config
from .surgery import verify_against_config

# Config keys that state the hidden size (each one present and equal to it is changed together).
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "word_embed_proj_dim")
# Module attributes copied from the hidden size at construction (a linear's in/out features follow its weight).
HIDDEN_ATTRIBUTES = ("hidden_size", "embed_dim", "embedding_dim", "d_model", "normalized_shape")
# Attributes and buffers equal to sqrt(hidden size) (Gemma's embedding scale): set as the saved config rebuilds them.
SQRT_HIDDEN_ATTRIBUTES = ("embed_scale", "scalar_embed_scale")
GAIN, OFFSET = "weight", "bias"  # a norm's parameters
HEAD_SIZE_ATTRIBUTE = "head_dim"  # attention modules' width per head, which must not change
IMPORTANCES = HIDDEN_IMPORTANCES


class _StopForward(Exception):
    pass


@dataclass
class HiddenPlan:
    """Where the hidden channels are: {tensor name: its channel dimensions} and the norms reading the stream."""

    hidden: int
    width: int
    dims: dict[str, tuple[int, ...]]
    norms: list[str]  # modules (not linear, not embedding) whose gain is one hidden channel per entry
    config_changes: dict


def hidden_size(model: nn.Module) -> int:
    key = config_key_of(model.config)
    return int(getattr(model.config, key))


def config_key_of(config) -> str:
    present = config.to_dict()
    key = next((k for k in HIDDEN_KEYS if isinstance(present.get(k), int)), None)
    if key is None:
        raise LLMPruneError(f"the config states no hidden size ({', '.join(HIDDEN_KEYS)}): --structure hidden "
                            "does not understand this model")
    return key


def hidden_config_changes(model: nn.Module, width: int) -> dict:
    """Config keys -> values for hidden size `width`: every key holding the hidden size, and head_dim stated
    (the attention's width per head, as it is now) so that it is not derived from the new hidden size."""
    hidden, present = hidden_size(model), model.config.to_dict()
    changes = {k: width for k in HIDDEN_KEYS if present.get(k) == hidden}
    heads = next((present[k] for k in CONFIG_KEYS["heads"] if isinstance(present.get(k), int)), None)
    if heads:
        changes["head_dim"] = present.get("head_dim") or hidden // heads
    return changes


def check_width(model: nn.Module, width: int) -> None:
    """The family's own config validation must accept the width, as from_pretrained will run it."""
    hidden = hidden_size(model)
    if not 0 < width < hidden:
        raise LLMPruneError(f"a hidden width of {width} removes nothing or everything of {hidden}: choose one "
                            f"in [1, {hidden - 1}]")
    try:
        planned_config(model, hidden_config_changes(model, width))
    except LLMPruneError:
        raise
    except Exception as err:
        cause = getattr(err, "__cause__", None) or err
        raise LLMPruneError(f"{type(model.config).__name__} refuses hidden size {width} "
                            f"({str(cause).splitlines()[0]}): choose another width or --round-to") from None


def hidden_widths(model: nn.Module, round_to: int) -> list[int]:
    """Every width below the hidden size, a multiple of `round_to`, that the family's config accepts."""
    if round_to < 1:
        raise LLMPruneError(f"--round-to must be at least 1 (got {round_to})")
    widths = []
    for width in range(round_to, hidden_size(model), round_to):
        try:
            check_width(model, width)
        except LLMPruneError:
            continue
        widths.append(width)
    return widths


def choose_width(model: nn.Module, keep_fraction: float | None = None, width: int | None = None,
                 round_to: int = 64) -> int:
    """The width to keep: `width` as given (it must be allowed), or the allowed width nearest to
    keep_fraction * hidden (the larger on a tie)."""
    if (keep_fraction is None) == (width is None):
        raise LLMPruneError("give the hidden width to keep either as a fraction or as a width, not both")
    if keep_fraction is not None and not 0 < keep_fraction < 1:
        raise LLMPruneError(f"the kept fraction of the hidden size must be in (0, 1) (got {keep_fraction:g})")
    allowed = hidden_widths(model, round_to)
    family = type(model.config).__name__
    if not allowed:  # e.g. Llama's config wants a multiple of the head count, which --round-to may never meet
        raise LLMPruneError(f"no hidden width below {hidden_size(model)} is a multiple of --round-to {round_to} "
                            f"that {family} accepts: lower --round-to")
    if width is not None:
        if width not in allowed:
            near = [w for w in (max((w for w in allowed if w < width), default=None),
                                min((w for w in allowed if w > width), default=None)) if w is not None]
            raise LLMPruneError(f"hidden width {width} is not a multiple of --round-to {round_to} that {family} "
                                f"accepts; nearest: {', '.join(map(str, near))}")
        return width
    target = keep_fraction * hidden_size(model)
    return min(allowed, key=lambda w: (abs(w - target), -w))


def plan_hidden(model: nn.Module, width: int) -> HiddenPlan:
    """Read the hidden channels' places off the model's own class built for `width` (see the module's text)."""
    check_width(model, width)
    hidden = hidden_size(model)
    changes = hidden_config_changes(model, width)
    fresh = meta_model(model, planned_config(model, changes))
    shapes = {name: tuple(t.shape) for name, t in [*fresh.named_parameters(), *fresh.named_buffers()]}
    ours = {name: tuple(t.shape) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    if shapes.keys() != ours.keys():
        odd = sorted(shapes.keys() ^ ours.keys())[:3]
        raise LLMPruneError(f"{type(model).__name__} built with hidden size {width} has other tensors ({', '.join(odd)}): "
                            "--structure hidden cannot shrink it")
    dims = {}
    for name, old in ours.items():
        new = shapes[name]
        changed = tuple(k for k, (a, b) in enumerate(zip(old, new)) if a != b)
        if len(old) != len(new) or any((old[k], new[k]) != (hidden, width) for k in changed):
            raise LLMPruneError(f"{type(model).__name__} ties {name} {old} to the hidden size otherwise than "
                                f"channel for channel ({new} at hidden size {width}): --structure hidden cannot "
                                "keep its heads (does the config derive the head size from the hidden size?)")
        if changed:
            dims[name] = changed
    fresh_modules = dict(fresh.named_modules())
    for name, module in model.named_modules():
        size = vars(module).get(HEAD_SIZE_ATTRIBUTE)
        if isinstance(size, int) and vars(fresh_modules[name]).get(HEAD_SIZE_ATTRIBUTE) != size:
            raise LLMPruneError(f"{type(model).__name__} derives the head size of {name} from the hidden size: "
                                "--structure hidden cannot keep its heads")
    norms = []
    for name, module in model.named_modules():
        gain = getattr(module, GAIN, None)
        owned = f"{name}.{GAIN}" if name else GAIN
        if (not is_linear(module) and not isinstance(module, nn.Embedding) and isinstance(gain, nn.Parameter)
                and gain.dim() == 1 and owned in dims):
            norms.append(name)
    if not norms:
        raise LLMPruneError(f"{type(model).__name__} has no norm over the hidden size: --structure hidden does not "
                            "understand it")
    return HiddenPlan(hidden, width, dims, norms, changes)


def parameters_at_width(model: nn.Module, width: int) -> int:
    """The parameter count (tied tensors once) the model would have at hidden size `width`: its own class built
    on the meta device, nothing pruned (for a search over shapes against a parameter budget)."""
    check_width(model, width)
    fresh = meta_model(model, planned_config(model, hidden_config_changes(model, width)))
    return sum(p.numel() for p in fresh.parameters())


# ---- importance: pure functions over tensors ---------------------------------------------------------------

def magnitude_importance(tensors: list[tuple[torch.Tensor, tuple[int, ...]]], hidden: int) -> torch.Tensor:
    """(hidden,): the L2 norm of every entry in each channel, over (tensor, its channel dimensions) pairs."""
    total = torch.zeros(hidden, dtype=torch.float64)
    for tensor, dims in tensors:
        squares = tensor.detach().double() ** 2
        for dim in dims:
            others = [k for k in range(squares.dim()) if k != dim]
            total += (squares.sum(dim=others) if others else squares).cpu()
    return total.sqrt()


def activation_importance(norm_outputs_sumsq: list[torch.Tensor]) -> torch.Tensor:
    """(hidden,): per norm, the L2 norm over windows of each channel's mean |activation| over a window's tokens
    (given as that norm's sum of squares over windows), summed over the norms."""
    return torch.stack([s.double().sqrt() for s in norm_outputs_sumsq]).sum(0)


def window_mean_abs(activation: torch.Tensor) -> torch.Tensor:
    """(windows, hidden): mean |a| over each window's tokens of a (windows, tokens, hidden) activation."""
    return activation.detach().float().abs().mean(dim=1)


def kept_channels(importance: torch.Tensor, width: int) -> torch.Tensor:
    """The `width` most important channels, in their original order (ties: the lower index)."""
    order = torch.sort(-importance.double(), stable=True).indices
    return order[:width].sort().values


# ---- calibration pass ----------------------------------------------------------------------------------------

@torch.inference_mode()
def norm_activation_importance(model: nn.Module, plan: HiddenPlan, calibration: torch.Tensor,
                               batch_size: int = 8) -> torch.Tensor:
    """Run the calibration windows through the model, hooks on every norm of the stream; stop a batch once
    every norm has produced its output (the head is not needed)."""
    modules = [model.get_submodule(name) for name in plan.norms]
    sumsq = [torch.zeros(plan.hidden, dtype=torch.float64) for _ in modules]
    seen = [0]

    def hook(index):
        def record(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            sumsq[index] += (window_mean_abs(out).double() ** 2).sum(0).cpu()
            seen[0] += 1
            if seen[0] == len(modules):
                raise _StopForward

        return record

    device = next(model.parameters()).device
    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    try:
        for start in range(0, len(calibration), batch_size):
            seen[0] = 0
            try:
                model(input_ids=calibration[start:start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return activation_importance(sumsq)


def hidden_scores(model: nn.Module, plan: HiddenPlan, calibration: torch.Tensor | None, importance: str,
                  batch_size: int = 8) -> torch.Tensor:
    """(hidden,): each hidden channel's importance, "activation" (over `calibration`) or "magnitude"."""
    if importance == "activation":
        return norm_activation_importance(model, plan, calibration, batch_size)
    tensors = dict(model.named_parameters())
    return magnitude_importance([(tensors[n], d) for n, d in plan.dims.items() if n in tensors], plan.hidden)


# ---- surgery -------------------------------------------------------------------------------------------------

@torch.no_grad()
def _gain_offset(norm: nn.Module, width: int) -> float:
    """a / b where the norm's gain is a + b * weight: 0 for weight * x / rms, 1 for Gemma's (1 + weight)."""
    gain = getattr(norm, GAIN)
    offset = getattr(norm, OFFSET, None)
    saved = [gain.data.clone(), None if offset is None else offset.data.clone()]
    x = torch.randn(4, width, generator=torch.Generator().manual_seed(0)).to(gain.device, gain.dtype)
    try:
        if offset is not None:
            offset.data.zero_()
        gain.data.zero_()
        at_zero = norm(x).double()
        gain.data.fill_(1)
        at_one = norm(x).double()
    finally:
        gain.data.copy_(saved[0])
        if offset is not None:
            offset.data.copy_(saved[1])
    slope = at_one - at_zero
    return float((at_zero * slope).sum() / (slope * slope).sum())


@torch.no_grad()
def remove_hidden_channels(model: nn.Module, plan: HiddenPlan, keep: torch.Tensor,
                           rescale_norms: bool = True) -> None:
    """Keep only hidden channels `keep` (sorted indices) in every tensor of the plan, in place; tied tensors
    stay tied (each Parameter keeps its identity). Then the module attributes and the config follow."""
    if keep.numel() != plan.width or keep.unique().numel() != plan.width:
        raise LLMPruneError(f"internal error: {keep.numel()} distinct channels for a width of {plan.width}")
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, dims in plan.dims.items():
        tensor = tensors[name]
        data = tensor.data
        for dim in dims:
            data = data.index_select(dim, keep.to(data.device))
        tensor.data = data.contiguous()
    for module in model.modules():
        if is_linear(module):
            matrix = module.weight.shape if isinstance(module, nn.Linear) else module.weight.shape[::-1]
            for attribute, value in zip(("out_features", "in_features"), matrix):
                if attribute in vars(module):
                    setattr(module, attribute, value)
            for attribute, value in zip(("nf", "nx"), matrix):  # GPT-2's Conv1D
                if attribute in vars(module):
                    setattr(module, attribute, value)
            continue
        for attribute in HIDDEN_ATTRIBUTES:
            value = vars(module).get(attribute)
            if value == plan.hidden:
                setattr(module, attribute, plan.width)
            elif value == (plan.hidden,):
                setattr(module, attribute, (plan.width,))
        for attribute in SQRT_HIDDEN_ATTRIBUTES:
            value = getattr(module, attribute, None)
            if isinstance(value, torch.Tensor) and value.dim() == 0 and math.isclose(value, plan.hidden ** 0.5,
                                                                                      rel_tol=1e-3):
                value.fill_(plan.width ** 0.5)
            elif isinstance(value, float) and math.isclose(value, plan.hidden ** 0.5):
                setattr(module, attribute, plan.width ** 0.5)
    if rescale_norms:
        factor = math.sqrt(plan.hidden / plan.width)
        for name in plan.norms:
            norm = model.get_submodule(name)
            gain = getattr(norm, GAIN)
            offset = _gain_offset(norm, plan.width)  # the gain a + b w becomes factor (a + b w)
            gain.data.copy_(gain.data.float().mul(factor).add((factor - 1) * offset).to(gain.dtype))
    for key, value in plan.config_changes.items():
        setattr(model.config, key, value)
    verify_against_config(model)  # the saved config rebuilds exactly these shapes


def prune_hidden(model: nn.Module, calibration: torch.Tensor | None, keep_fraction: float | None = None,
                 width: int | None = None, round_to: int = 64, importance: str = "activation", batch_size: int = 8,
                 rescale_norms: bool = True) -> dict:
    """Shrink the hidden size of `model` in place to `width`, or to the allowed width nearest keep_fraction of it
    (a multiple of `round_to` that the family's config accepts), keeping the channels of highest `importance`
    ("activation": over the `calibration` token windows (n, seqlen); "magnitude": weights alone). Returns what
    was done: {"structure", "hidden", "width", "kept"}."""
    if importance not in IMPORTANCES:
        raise LLMPruneError(f"hidden-channel importance '{importance}': choose {' or '.join(IMPORTANCES)}")
    if importance == "activation" and calibration is None:
        raise LLMPruneError("activation importance needs calibration windows; or use magnitude")
    width = choose_width(model, keep_fraction, width, round_to)
    plan = plan_hidden(model, width)
    keep = kept_channels(hidden_scores(model, plan, calibration, importance, batch_size), width)
    remove_hidden_channels(model, plan, keep, rescale_norms)
    return {"structure": "hidden", "hidden": plan.hidden, "width": width, "kept": keep.tolist()}
