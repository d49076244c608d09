"""Physical removal: slice rows or columns out of linears, fold a bias in, drop decoder layers, and bring
the config and the attributes modules copied from it in line, so that the model's own class rebuilt from
the new config has exactly the new shapes (checked by `verify_against_config`)."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import LLMPruneError
from ...inputs.models import is_linear, weight_matrix
from .discovery import PER_LAYER_LISTS, meta_model, planned_config


def _store(module: nn.Module, matrix: torch.Tensor) -> None:
    """Replace the weight by `matrix` (out, in) in the module's own storage convention."""
    stored = matrix if isinstance(module, nn.Linear) else matrix.t()
    module.weight = nn.Parameter(stored.contiguous(), requires_grad=module.weight.requires_grad)
    out_features, in_features = matrix.shape
    if isinstance(module, nn.Linear):
        module.in_features, module.out_features = in_features, out_features
    else:  # GPT-2's Conv1D
        module.nx, module.nf = in_features, out_features


def keep_outputs(module: nn.Module, index: torch.Tensor) -> None:
    """Keep only the output features `index` (rows of the weight, entries of the bias)."""
    index = index.to(module.weight.device)
    _store(module, weight_matrix(module)[index])
    if module.bias is not None:
        module.bias = nn.Parameter(module.bias.data[index].contiguous(), requires_grad=module.bias.requires_grad)


def keep_inputs(module: nn.Module, index: torch.Tensor) -> None:
    """Keep only the input features `index` (columns of the weight)."""
    _store(module, weight_matrix(module)[:, index.to(module.weight.device)])


def add_to_bias(module: nn.Module, delta: torch.Tensor) -> None:
    """bias += delta, creating a zero bias first where the module has none."""
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(weight_matrix(module).shape[0], dtype=module.weight.dtype,
                                               device=module.weight.device))
    module.bias.data.add_(delta.to(module.bias.dtype).to(module.bias.device))


def set_present_attributes(module: nn.Module, values: dict) -> None:
    """Set the attributes the module already has (those its forward reads), and no others."""
    for name, value in values.items():
        if name in vars(module):
            setattr(module, name, value)


def remove_layers(layers: nn.ModuleList, removed: list[int], config, layers_key: str) -> None:
    """Drop decoder layers; renumber `layer_idx` (the KV cache's slot) and shorten per-layer config lists."""
    count = len(layers)
    for index in sorted(removed, reverse=True):
        del layers[index]
    for new_index, layer in enumerate(layers):
        for module in layer.modules():
            if "layer_idx" in vars(module):
                module.layer_idx = new_index
    setattr(config, layers_key, len(layers))
    for key in PER_LAYER_LISTS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == count:
            setattr(config, key, type(value)(v for i, v in enumerate(value) if i not in set(removed)))


def verify_against_config(model: nn.Module) -> None:
    """The model's own class rebuilt from the model's (new) config must have exactly the model's shapes, so
    that `from_pretrained` loads it with no code of ours. A bias the config adds where the model has none
    (a flag such as mlp_bias adds one to gate and up too) is created as zeros; anything else is a bug."""
    try:
        fresh = meta_model(model, planned_config(model, {}))
    except Exception as err:  # the family's own validation, as from_pretrained will run it
        raise LLMPruneError(f"internal error: the pruned model's config does not validate ({err}); please report "
                            f"this") from None
    fresh_modules = dict(fresh.named_modules())
    for name, module in model.named_modules():
        twin = fresh_modules.get(name)
        if is_linear(module) and twin is not None and module.bias is None and getattr(twin, "bias", None) is not None:
            add_to_bias(module, torch.zeros(()))
    expected = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if expected != actual:
        wrong = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
        details = ", ".join(f"{k}: {actual.get(k)} vs config {expected.get(k)}" for k in wrong[:4])
        raise LLMPruneError(f"internal error: the pruned model does not match its own config ({details}); "
                            f"please report this")
