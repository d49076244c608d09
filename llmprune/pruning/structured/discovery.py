"""Find each decoder layer's MLP and attention projections, and the config keys that state their shapes.

Family quirks are data: the module names below, and the config keys each family uses for the same thing.
Whether a family can express a pruned shape at all is not guessed from its name: the model's own class is
built from the planned config on the meta device (no memory) and its shapes are compared with the plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import LLMPruneError
from ...inputs.models import linears, weight_matrix

# Module names (the end of the dotted name inside a decoder layer), by role.
MLP_INPUTS = ("gate_proj", "up_proj", "fc1", "mlp.c_fc", "dense_h_to_4h", "w1", "w3")
MLP_OUTPUTS = ("down_proj", "fc2", "mlp.c_proj", "dense_4h_to_h", "w2")
QUERY, KEY, VALUE = ("q_proj",), ("k_proj",), ("v_proj",)
ATTENTION_OUTPUTS = ("o_proj", "out_proj", "attn.c_proj", "attention.dense")
FUSED_QKV = ("c_attn", "query_key_value", "qkv_proj", "Wqkv")

# Config keys, by what they state; the first one the config has is read and written.
CONFIG_KEYS = {
    "intermediate": ("intermediate_size", "ffn_dim", "n_inner"),
    "heads": ("num_attention_heads", "n_head"),
    "kv_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "layers": ("num_hidden_layers", "n_layer"),
}
PER_LAYER_LISTS = ("layer_types", "no_rope_layers")  # config lists with one entry per decoder layer
BIAS_FLAGS = ("mlp_bias", "attention_bias", "enable_bias", "use_bias", "bias")  # config flags that add biases
# Attributes attention and MLP modules copy from the config at construction and read in forward.
HEAD_ATTRIBUTES = {"num_heads": "heads", "num_attention_heads": "heads", "num_key_value_heads": "kv_heads",
                   "num_key_value_groups": "groups"}
WIDTH_ATTRIBUTES = ("intermediate_size", "ffn_dim")


@dataclass
class LayerParts:
    """Names, relative to the decoder layer, of the projections structured pruning reshapes."""

    mlp_inputs: list[str]
    mlp_output: str | None
    query: str | None
    key: str | None
    value: str | None
    attention_output: str | None
    fused_qkv: str | None

    @property
    def attention(self) -> str:
        """The attention module: the parent of the query projection."""
        return self.query.rpartition(".")[0]


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_parts(layer: nn.Module) -> LayerParts:
    names = list(linears(layer))

    def one(patterns):
        found = [n for n in names if _matches(n, patterns)]
        return found[0] if len(found) == 1 else None

    return LayerParts([n for n in names if _matches(n, MLP_INPUTS)], one(MLP_OUTPUTS), one(QUERY), one(KEY),
                      one(VALUE), one(ATTENTION_OUTPUTS), one(FUSED_QKV))


def config_key(config, role: str) -> str | None:
    present = config.to_dict()
    return next((k for k in CONFIG_KEYS[role] if k in present), None)


def config_value(config, role: str):
    key = config_key(config, role)
    return None if key is None else getattr(config, key)


@dataclass
class AttentionShape:
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def groups(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads


def attention_shape(model: nn.Module, layer: nn.Module, parts: LayerParts) -> AttentionShape:
    heads = config_value(model.config, "heads")
    kv_heads = config_value(model.config, "kv_heads") or heads
    q_width = weight_matrix(layer.get_submodule(parts.query)).shape[0]
    head_dim = config_value(model.config, "head_dim") or q_width // heads
    if heads * head_dim != q_width or heads % kv_heads:
        raise LLMPruneError(f"{type(model).__name__}: {heads} heads of size {head_dim} with {kv_heads} KV heads do "
                            f"not match its query projection ({q_width} outputs); this config is not understood")
    return AttentionShape(heads, kv_heads, head_dim)


def meta_model(model: nn.Module, config) -> nn.Module:
    """The model's own class built from `config` on the meta device: its shapes, no memory, no init cost."""
    with torch.device("meta"):
        return type(model)(config)


def planned_config(model: nn.Module, changes: dict):
    """The model's config with `changes` (config key -> value) applied, built the way `from_pretrained`
    builds it, so that the family's own validation runs (Llama's, say, wants hidden_size to be a multiple
    of num_attention_heads, whatever head_dim is): an error here is an error loading the saved model."""
    return type(model.config).from_dict(model.config.to_dict() | changes)


def bias_flag_for(model: nn.Module, layer_prefix: str, module_name: str, changes: dict) -> str | None | bool:
    """How the saved config can give `module_name` a bias: True if it has one already, the name of a config
    flag (mlp_bias, attention_bias...) that adds one in the model's own class, or None if nothing can."""
    if model.get_submodule(f"{layer_prefix}.{module_name}").bias is not None:
        return True
    present = model.config.to_dict()
    for flag in BIAS_FLAGS:
        if present.get(flag) is False:
            built = meta_model(model, planned_config(model, changes | {flag: True}))
            if built.get_submodule(f"{layer_prefix}.{module_name}").bias is not None:
                return flag
    return None
