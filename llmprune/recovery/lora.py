"""LoRA recovery fine-tuning that keeps the pruned sparsity pattern exactly.

Plain LoRA adds a dense low-rank delta ``s * B @ A``; merging it refills every pruned zero. Design choice: each
LoRA layer masks its delta with the pruning mask both while training and when peft merges it, so the model
trained is exactly the sparse model returned (``W + M * sBA``, ``W`` already zero off the mask) and the reported
loss is that model's loss. The alternative, plain LoRA then masking after the merge, trains a dense model and
silently drops the pruned part of the delta at the end. The price is one extra dense weight-gradient matmul per
linear in the backward pass (the forward stays one matmul with the effective weight); per step the perplexity is
about the same (docs/results.md): what masking buys is that the loss optimised and reported is the loss of the
model that ships.

Memory: the effective weight ``W + M * sBA`` is a full-size tensor per linear. Left to autograd, the matmul keeps
it for the backward pass, a copy of every adapted weight per step (1.1 GB on Qwen2.5-0.5B's channel prune, as much
as its activations); :class:`MaskedLoraMatmul` keeps only the input and the adapters and forms the effective weight
again, one linear at a time, in the backward pass. A structurally pruned (smaller, dense) model has no pattern to
keep: its linears get peft's plain LoRA, whose forward never forms a full-size delta at all.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import transpose
from torch import nn
from transformers.pytorch_utils import Conv1D

from llmprune.config import RecoverConfig
from llmprune.errors import LLMPruneError
from llmprune.inputs.models import is_linear


class MaskedLoraLinear(PeftLoraLinear):
    """peft's LoRA linear whose delta is restricted to the base weight's non-zeros (the pruning mask).

    Registered through ``LoraConfig._register_custom_module``, so peft still owns init, saving and merging; only
    the delta (used by peft's merge) and the training forward change. Wraps nn.Linear and GPT-2's Conv1D.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, **kwargs)
        # peft's own dispatch sets this per layer type; a custom module must (Conv1D stores weights as (in, out)).
        self.fan_in_fan_out = isinstance(self.get_base_layer(), Conv1D)
        # Wrapping happens before training, so this is the pruned pattern. Not persistent: adapters stay plain LoRA.
        self.register_buffer("keep_mask", self.get_base_layer().weight != 0, persistent=False)

    def masked_delta(self, adapter: str) -> torch.Tensor:
        delta = masked_lora_delta(self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                                  transpose(self.keep_mask, self.fan_in_fan_out), self.scaling[adapter],
                                  self.get_base_layer().weight.dtype)
        return transpose(delta, self.fan_in_fan_out)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The delta peft merges. A kept weight that would land exactly on 0 (an exact cancellation, plausible in
        bf16) would change the pattern: it keeps its value instead. Merge-time only: in the forward it costs time."""
        delta = self.masked_delta(adapter)
        return delta.masked_fill((self.get_base_layer().weight + delta) == 0, 0)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        (adapter,) = self.active_adapters
        base = self.get_base_layer()
        dropout = self.lora_dropout[adapter]
        if isinstance(dropout, nn.Identity):
            # One matmul with the effective sparse weight, which is not kept for the backward pass (the class below).
            return MaskedLoraMatmul.apply(x, transpose(base.weight, self.fan_in_fan_out), base.bias,
                                          self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                                          transpose(self.keep_mask, self.fan_in_fan_out), self.scaling[adapter])
        # LoRA dropout applies to the adapter's input only, so the delta needs its own matmul.
        delta = self.masked_delta(adapter)
        return base(x, *args, **kwargs) + F.linear(dropout(x), transpose(delta, self.fan_in_fan_out))


def masked_lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, mask: torch.Tensor, scale: float,
                      dtype: torch.dtype) -> torch.Tensor:
    """``M * (s B A)`` in ``dtype``, all [out, in]: the one place the masked delta is formed (merge, dropout
    path, and the fused forward and backward below)."""
    return (torch.mm(lora_b, lora_a) * scale * mask).to(dtype)


def effective_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """``W + M * (s B A)`` in the weight's dtype, all [out, in]."""
    return weight + masked_lora_delta(lora_a, lora_b, mask, scale, weight.dtype)


class MaskedLoraMatmul(torch.autograd.Function):
    """``y = x (W + M * sBA)^T + b`` whose backward pass forms the effective weight again instead of keeping it.

    Saved: the input and references to tensors the layer holds anyway (W, M, A, B); the effective weight and the
    weight-sized gradient live one linear at a time. Gradients flow to ``x``, ``A`` and ``B`` only (W and b are
    frozen). The backward pass runs under the forward's autocast state, so its matmuls are the ones autograd would
    have run through autocast (bf16 training), and each gradient comes back in its input's dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, mask, scale):
        ctx.save_for_backward(x, weight, lora_a, lora_b, mask)
        ctx.scale = scale
        device = x.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
        return F.linear(x, effective_weight(weight, lora_a, lora_b, mask, scale), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b, mask = ctx.saved_tensors
        device, dtype = ctx.autocast or (x.device.type, None)
        grad_x = grad_a = grad_b = None
        with torch.autocast(device, dtype=dtype, enabled=ctx.autocast is not None):
            if ctx.needs_input_grad[0]:
                effective = effective_weight(weight, lora_a, lora_b, mask, ctx.scale)
                grad_x = torch.matmul(grad_out, effective).to(x.dtype)
                del effective
            if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
                # The effective weight's gradient, masked (d loss / d sBA), then through the product.
                grad_weight = torch.mm(grad_out.reshape(-1, grad_out.shape[-1]).t(), x.reshape(-1, x.shape[-1]))
                grad_delta = grad_weight.to(lora_a.dtype).mul_(mask).mul_(ctx.scale)
                del grad_weight
                if ctx.needs_input_grad[3]:
                    grad_a = torch.mm(lora_b.t(), grad_delta).to(lora_a.dtype)
                if ctx.needs_input_grad[4]:
                    grad_b = torch.mm(grad_delta, lora_a.t()).to(lora_b.dtype)
        return grad_x, None, None, grad_a, grad_b, None, None


def masked_lora_config(config: RecoverConfig, target_names: list[str], masked: bool = True) -> LoraConfig:
    """A peft LoraConfig on exactly these module names, with every linear wrapped as a MaskedLoraLinear
    (``masked``), or peft's plain LoRA linear (a structurally pruned model, which has no zeros to keep)."""
    lora_config = LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=target_names, bias="none"
    )
    if masked:
        lora_config._register_custom_module({nn.Linear: MaskedLoraLinear, Conv1D: MaskedLoraLinear})
    return lora_config


@contextmanager
def masked_lora(model: nn.Module, pruned_linears: dict[str, nn.Module], config: RecoverConfig,
                adapter_dir: str | Path | None = None, masked: bool = True) -> Iterator[tuple[nn.Module, list[str]]]:
    """Wrap ``pruned_linears`` (those named in ``config.targets``) in masked LoRA and yield ``(peft model, the
    target leaf names)`` to train; on leaving, keep the raw adapter in ``adapter_dir`` (if given), merge, and
    check every zero pattern. ``masked=False`` (a structurally pruned, dense model): plain LoRA, and no pattern
    to check (a dequantized weight's exact zero may move like any other weight).

    On any failure, interruption included, the untouched pruned model is handed back unwrapped. Only ``r``,
    ``alpha``, ``dropout`` and ``targets`` of ``config`` are read here: the training is the caller's. peft
    initialises the adapters from the global RNG: seed it (in a fork) before entering for a reproducible run.
    """
    names = _module_names(model, pruned_linears)
    masks = {name: module.weight != 0 for name, module in zip(names, pruned_linears.values())} if masked else {}
    targets = _resolve_targets(names, config.targets)
    target_names = [name for name in names if name.rsplit(".", 1)[-1] in targets]

    lora_config = masked_lora_config(config, target_names, masked)
    had_peft_config = hasattr(model, "peft_config")
    try:
        with warnings.catch_warnings():  # peft 0.21 calls a property transformers 5 deprecates: not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            peft_model = get_peft_model(model, lora_config)
        try:
            yield peft_model, targets
            if adapter_dir is not None:
                peft_model.save_pretrained(str(adapter_dir))
        except BaseException:
            peft_model.unload()  # hand back the untouched pruned model
            raise
        peft_model.merge_and_unload()  # swaps the original (now merged) linears back into `model`
    finally:
        if not had_peft_config and hasattr(model, "peft_config"):
            del model.peft_config  # peft's note on the model it wrapped; nothing wraps it any more
    _check_patterns(model, masks)


def _module_names(model: nn.Module, linears: dict[str, nn.Module]) -> list[str]:
    """Names of ``linears`` inside ``model``, matched by identity so the caller's key style does not matter."""
    name_of = {id(module): name for name, module in model.named_modules()}
    missing = [key for key, module in linears.items() if id(module) not in name_of]
    if missing:
        raise LLMPruneError(f"pruned linears {missing[:3]} are not modules of this model: pass the runner's "
                            f"pruned_linears for this very model object")
    names = [name_of[id(module)] for module in linears.values()]
    if not names:
        raise LLMPruneError("no pruned linear layers found: prune the model before recovery")
    not_linear = [name for name, module in zip(names, linears.values()) if not is_linear(module)]
    if not_linear:
        raise LLMPruneError(f"LoRA recovery supports linear layers (nn.Linear, Conv1D) only, got {not_linear[:3]}")
    return names


def _resolve_targets(names: list[str], requested: list[str] | None) -> list[str]:
    """The requested leaf names (all pruned leaf names when None), checked against the pruned linears."""
    valid = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in names))
    if requested is None:
        return valid
    unknown = [t for t in requested if t not in valid]
    if unknown:
        raise LLMPruneError(f"unknown LoRA target(s) {', '.join(unknown)}: valid pruned linears are {', '.join(valid)}")
    return list(requested)


def _check_patterns(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """A loud error unless the wrappers are gone and every zero pattern is exactly as before. The mask is not
    re-applied first: a merge that wrote into a pruned weight must show here, not be hidden."""
    modules = dict(model.named_modules())
    leftovers = [name for name, module in modules.items() if isinstance(module, BaseTunerLayer)]
    if leftovers:
        raise LLMPruneError(f"peft layers remain after merging: {leftovers[:3]}")
    for name, mask in masks.items():
        weight = modules[name].weight
        if not torch.equal(weight != 0, mask):
            raise LLMPruneError(f"sparsity pattern of {name} changed during LoRA recovery "
                                f"({int((weight != 0).sum())} non-zeros, expected {int(mask.sum())}); "
                                f"this is a bug, please report it")
