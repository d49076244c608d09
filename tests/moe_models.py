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
