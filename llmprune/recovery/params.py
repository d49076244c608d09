"""What recovery trains, and how the pruned zeros are kept while it does.

``lora``: masked LoRA adapters on the pruned linears (recovery/lora.py), merged into them at the end. ``full``:
every weight and bias of every pruned linear, its gradient masked so pruned zeros stay exactly zero; for a
structurally smaller model, which has no mask, every weight of the model.

Why a gradient mask and nothing else keeps the zeros: a masked weight's gradient is 0, so AdamW's moments for it
stay 0 and its update is 0 / (sqrt(0) + eps) = 0; decoupled weight decay scales the weight, and 0 scaled is 0. The
mask is not re-applied after training, so the check that follows can catch a leak.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from llmprune.config import RecoverConfig
from llmprune.errors import LLMPruneError
from llmprune.inputs.models import decoder_layers, is_linear, linears
from llmprune.runtime import available_memory_bytes, parameter_count


@dataclass
class Trainee:
    """What the training loop runs: ``model`` (the peft wrapper for LoRA, the model itself for full) and the
    ``params`` the optimiser updates."""

    model: nn.Module
    params: list[nn.Parameter]
    lora_targets: list[str] = field(default_factory=list)  # the leaf names LoRA adapts (LoRA only)


def resolve_masks(model: nn.Module, masks: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """``masks`` as given, or, when None, found from the exact zeros of the decoder's linears (a fallback: prefer
    the runner's own list, since a dequantized dense layer can hold exact zeros too, which then merely stay 0)."""
    if masks is not None:
        return masks
    prefix, layers = decoder_layers(model)
    found = {f"{prefix}.{name}": module.weight != 0 for name, module in layers.named_modules()
             if is_linear(module) and bool((module.weight == 0).any())}
    if not found:
        raise LLMPruneError("no pruned linear layers found (no exact zeros): prune the model before recovery, or "
                            "pass masks={} for a structurally pruned model")
    return found


def masked_modules(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
    """The modules named in ``masks``, each checked against its mask: the same shape, and zero wherever the mask
    drops a weight (a mask the weights do not hold is a wiring error, not something to train around)."""
    modules = {}
    for name, mask in masks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise LLMPruneError(f"masked module {name} is not in this model: pass the masks of this very model") from None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or mask.shape != weight.shape or mask.dtype != torch.bool:
            raise LLMPruneError(f"the mask of {name} must be a bool tensor of its weight's shape "
                                f"{list(weight.shape) if isinstance(weight, torch.Tensor) else None}, got "
                                f"{mask.dtype} {list(mask.shape)}")
        if bool((weight.detach()[~mask.to(weight.device)] != 0).any()):
            raise LLMPruneError(f"{name} has non-zero weights where its mask prunes them: the mask is not this "
                                f"model's (pass the masks taken right after pruning)")
        modules[name] = module
    return modules


def all_decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    prefix, layers = decoder_layers(model)
    return {f"{prefix}.{name}": module for name, module in linears(layers).items()}


def full_parameters(model: nn.Module, modules: dict[str, nn.Module]) -> list[nn.Parameter]:
    """What full fine-tuning trains: the masked linears' weights and biases, or, with no masks (a structurally
    smaller model), every parameter. Each must be a float tensor the optimiser can update in place."""
    if modules:
        params = [p for module in modules.values() for p in module.parameters(recurse=False)]
    else:
        params = list(dict.fromkeys(model.parameters()))  # tied weights once
    bad = [p.dtype for p in params if not p.dtype.is_floating_point]
    if bad:
        raise LLMPruneError(f"--recover-params full needs float weights, but this model holds {bad[0]} ones "
                            f"(quantized): use --recover-params lora")
    return params


def check_full_fits(params: list[nn.Parameter], mask_numel: int, device: torch.device) -> None:
    """Full fine-tuning adds, per trained weight, a gradient and AdamW's two moments (same dtype), plus one byte of
    mask per masked weight: fail now, not mid-run, when that cannot be held."""
    needed = sum(3 * p.numel() * p.element_size() for p in params) + mask_numel
    available = available_memory_bytes(device)
    if available is not None and needed > available:
        raise LLMPruneError(f"--recover-params full needs about {needed / 2**30:.1f} GiB more on {device} (gradients, "
                            f"optimizer state, masks) but {available / 2**30:.1f} GiB are free: use --recover-params "
                            f"lora, or --gradient-checkpointing on a larger device")


def check_params(model: nn.Module, config: RecoverConfig, modules: dict[str, nn.Module]) -> None:
    """For ``params="full"``: float weights, and room for their gradients, optimizer state and masks."""
    if config.params == "full":
        check_full_fits(full_parameters(model, modules), parameter_count(m.weight for m in modules.values()),
                        next(model.parameters()).device)


@contextmanager
def trainee(model: nn.Module, config: RecoverConfig, masks: dict[str, torch.Tensor], modules: dict[str, nn.Module],
            adapter_dir: str | Path | None = None) -> Iterator[Trainee]:
    """Make ``model`` trainable as ``config.params`` says and yield what to train; on leaving, the model holds the
    result (LoRA merged) with exactly the zeros ``masks`` say (checked), in eval mode, without grad flags.

    ``masks``/``modules``: the pruned linears (:func:`masked_modules`); empty for a structurally smaller model
    (LoRA then adapts every decoder linear, unmasked; full trains every weight). The global RNG (LoRA's initialisation,
    dropout) is seeded with ``config.seed`` in a fork, so the caller's RNG stays untouched. On failure the
    untouched pruned model is handed back.
    """
    device = next(model.parameters()).device
    try:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(config.seed)
            if config.params == "lora":
                from llmprune.recovery.lora import masked_lora

                with masked_lora(model, modules or all_decoder_linears(model), config, adapter_dir,
                                 masked=bool(modules)) as (wrapped, names):
                    yield Trainee(wrapped, [p for p in wrapped.parameters() if p.requires_grad], names)
            else:  # adapter_dir: LoRA only (train_recovery refuses it for full before any work)
                with masked_gradients(model, modules, masks) as params:
                    yield Trainee(model, params)
    finally:
        model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
            param.grad = None


@contextmanager
def masked_gradients(model: nn.Module, modules: dict[str, nn.Module],
                     masks: dict[str, torch.Tensor]) -> Iterator[list[nn.Parameter]]:
    """Full fine-tuning: only :func:`full_parameters` require grad, and each masked weight's gradient is masked as
    it is produced, before clipping and AdamW see it; on leaving, a loud error if any pruned weight moved."""
    params = full_parameters(model, modules)
    for param in model.parameters():
        param.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    hooks = [module.weight.register_hook(lambda grad, keep=masks[name].to(module.weight.device): grad * keep)
             for name, module in modules.items()]
    try:
        yield params
    finally:
        for hook in hooks:
            hook.remove()
    for name, module in modules.items():
        leaked = int((module.weight.detach()[~masks[name].to(module.weight.device)] != 0).sum())
        if leaked:
            raise LLMPruneError(f"{leaked} pruned weights of {name} became non-zero during full fine-tuning; this is "
                                f"a bug, please report it")
