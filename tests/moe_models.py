"""Tiny random mixture-of-experts decoders of several families, built from configs (no download).

Each has 2 decoder layers, 4 routed experts (2 per token) and hidden size 32; the expert width differs from the
hidden size so that a transposed layout cannot be mistaken for a plain one. A family's own extras are kept:
Qwen2-MoE's gated shared expert, DeepSeek-V3's grouped routing, shared experts and first dense layer, gpt-oss's
expert biases, clamped activation and attention sinks.
"""

import torch
import transformers

VOCAB = 128
HIDDEN = 32
EXPERTS = 4

COMMON = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=VOCAB, max_position_embeddings=128, num_experts_per_tok=2)

# family -> (config class, model class, that family's own settings)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=48, num_local_experts=EXPERTS)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                       num_experts=EXPERTS, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=64, moe_intermediate_size=24, num_experts=EXPERTS, head_dim=8,
                       norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=24, num_experts=EXPERTS)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(intermediate_size=24, num_local_experts=EXPERTS, head_dim=8, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention"])),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=24, n_routed_experts=EXPERTS,
                         n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, q_lora_rank=16,
                         kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                         num_key_value_heads=4)),
}


def tiny_moe(family: str, seed: int = 0, **overrides):
    """A tiny random MoE causal LM in eval mode, float32. Router weights are drawn at a larger scale than the
    default initialisation so that routing differs between tokens (near-zero logits would tie)."""
    config_name, model_name, own = FAMILIES[family]
    config = getattr(transformers, config_name)(**(COMMON | own | overrides))
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) and parameter.dim() == 2:
                parameter.normal_(0, 1.0)
            elif parameter.dim() == 3 or name.endswith("_bias"):  # fused experts are left uninitialised by some
                parameter.normal_(0, 0.1)
    return model.eval()


def moe_tokens(n: int = 8, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def save_tiny_moe_dir(path, family: str, tokenizer_dir):
    """A tiny MoE saved as a local Hugging Face directory, with the tokenizer of `tokenizer_dir`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tiny_moe(family, vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class ListedExpert(torch.nn.Module):
    """One expert as its own MLP of nn.Linear (the older Mixtral layout: w1 gate, w3 up, w2 down)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.w1 = torch.nn.Linear(hidden, intermediate, bias=False)
        self.w3 = torch.nn.Linear(hidden, intermediate, bias=False)
        self.w2 = torch.nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


class ListedMoe(torch.nn.Module):
    """Mixtral's sparse block with a list of expert modules, each called with its routed tokens only.
    `banned` experts are never routed to (their router logits are minus infinity)."""

    def __init__(self, fused_block, banned=()):
        super().__init__()
        experts = fused_block.experts
        count, double, hidden = experts.gate_up_proj.shape
        self.top_k, self.banned = fused_block.gate.top_k, list(banned)
        self.gate = torch.nn.Linear(hidden, count, bias=False)
        self.experts = torch.nn.ModuleList(ListedExpert(hidden, double // 2) for _ in range(count))
        with torch.no_grad():
            self.gate.weight.copy_(fused_block.gate.weight)
            for e, expert in enumerate(self.experts):
                expert.w1.weight.copy_(experts.gate_up_proj[e, : double // 2])
                expert.w3.weight.copy_(experts.gate_up_proj[e, double // 2 :])
                expert.w2.weight.copy_(experts.down_proj[e])

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = self.gate(x)
        logits[:, self.banned] = float("-inf")
        weights, chosen = logits.softmax(-1).topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if len(token):
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out.reshape(hidden_states.shape)


def listed_mixtral(seed: int = 0, banned: dict[int, list[int]] | None = None):
    """The tiny Mixtral with every sparse block rebuilt as a list of expert modules: the same function."""
    model = tiny_moe("mixtral", seed=seed)
    for i, layer in enumerate(model.model.layers):
        layer.mlp = ListedMoe(layer.mlp, (banned or {}).get(i, ()))
    return model.eval()
