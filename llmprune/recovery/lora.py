"""LoRA recovery fine-tuning that keeps the pruned sparsity pattern exactly.

Plain LoRA adds a dense low-rank delta ``s * B @ A``; merging it refills every pruned zero. Design choice: each
LoRA layer masks its delta with the pruning mask both while training and when peft merges it, so the model
trained is exactly the sparse model returned (``W + M * sBA``, ``W`` already zero off the mask) and the reported
loss is that model's loss. The alternative, plain LoRA then masking after the merge, trains a dense model and
silently drops the pruned part of the delta at the end. The price is one extra dense weight-gradient matmul per
linear in the backward pass (the forward stays one matmul with the effective weight); per step the perplexity is
about the same (docs/results.md): what masking buys is that the loss optimised and reported is the loss of the
model that ships.
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
        return (super().get_delta_weight(adapter) * self.keep_mask).to(self.get_base_layer().weight.dtype)

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
        delta = self.masked_delta(adapter)
        dropout = self.lora_dropout[adapter]
        if isinstance(dropout, nn.Identity):
            # One matmul with the effective sparse weight: the backward needs only one extra (weight-gradient) matmul.
            return F.linear(x, transpose(base.weight + delta, self.fan_in_fan_out), base.bias)
        # LoRA dropout applies to the adapter's input only, so the delta needs its own matmul.
        return base(x, *args, **kwargs) + F.linear(dropout(x), transpose(delta, self.fan_in_fan_out))


def masked_lora_config(config: RecoverConfig, target_names: list[str]) -> LoraConfig:
    """A peft LoraConfig on exactly these module names, with every linear wrapped as a MaskedLoraLinear."""
    lora_config = LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=target_names, bias="none"
    )
    lora_config._register_custom_module({nn.Linear: MaskedLoraLinear, Conv1D: MaskedLoraLinear})
    return lora_config


@contextmanager
def masked_lora(model: nn.Module, pruned_linears: dict[str, nn.Module], config: RecoverConfig,
                adapter_dir: str | Path | None = None) -> Iterator[tuple[nn.Module, list[str]]]:
    """Wrap ``pruned_linears`` (those named in ``config.targets``) in masked LoRA and yield ``(peft model, the
    target leaf names)`` to train; on leaving, keep the raw adapter in ``adapter_dir`` (if given), merge, and
    check every zero pattern.

    On any failure, interruption included, the untouched pruned model is handed back unwrapped. Only ``r``,
    ``alpha``, ``dropout`` and ``targets`` of ``config`` are read here: the training is the caller's. peft
    initialises the adapters from the global RNG: seed it (in a fork) before entering for a reproducible run.
    """
    names = _module_names(model, pruned_linears)
    masks = {name: module.weight != 0 for name, module in zip(names, pruned_linears.values())}
    targets = _resolve_targets(names, config.targets)
    target_names = [name for name in names if name.rsplit(".", 1)[-1] in targets]

    lora_config = masked_lora_config(config, target_names)
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
