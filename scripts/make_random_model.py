"""Write a random-weight model of a public shape as a standard sharded safetensors directory, no download.

    python scripts/make_random_model.py --config llama-1b --out /tmp/llama-1b [--dtype float32] [--seed 0]
    python scripts/make_random_model.py --config qwen3-30b-a3b --layers 4 --dtype bfloat16 --out /tmp/qwen3-moe

Tensors are made one decoder layer at a time and written as that layer's shard, so the writer never holds
more than one layer: it can write models larger than memory. Shapes only are public facts (TinyLlama-1.1B,
OpenLLaMA-3B, Llama-2-7B, Qwen3-30B-A3B); the weights are N(0, 0.02) with unit norm weights. A mixture of experts
is written as transformers' save_pretrained writes it (and as its Hub checkpoint is): one tensor per expert
(mlp.experts.E.gate_proj.weight ...), which from_pretrained fuses at load; --fused writes the fused form instead.
No tokenizer is written: feed token ids (e.g. torch.randint) to the Python entry points.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": (64, 128, 4, 4, 2, 128),
    "llama-1b": (2048, 5632, 22, 32, 4, 32000),
    "llama-3b": (3200, 8640, 26, 32, 32, 32000),
    "llama-7b": (4096, 11008, 32, 32, 32, 32000),
}
# Mixtures of experts: (config class, its settings); hidden size first, as in SHAPES
MOE_SHAPES = {
    "tiny-moe": ("Qwen3MoeConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                                        num_experts_per_tok=2, moe_intermediate_size=32, vocab_size=128,
                                        norm_topk_prob=True, max_position_embeddings=4096)),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                                             num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                                             num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                                             vocab_size=151936, norm_topk_prob=True, max_position_embeddings=40960,
                                             rms_norm_eps=1e-6,
                                             rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_config(name: str, layers: int | None = None, tie: bool = False):
    import transformers

    if name in MOE_SHAPES:
        config_class, settings = MOE_SHAPES[name]
        settings = settings | {"tie_word_embeddings": tie}
        if layers:
            settings["num_hidden_layers"] = layers
        return getattr(transformers, config_class)(**settings)
    hidden, intermediate, depth, heads, kv_heads, vocab = SHAPES[name]
    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                                    num_hidden_layers=layers or depth, num_attention_heads=heads,
                                    num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=4096,
                                    tie_word_embeddings=tie)


def random_tensor(name: str, shape, dtype, generator) -> torch.Tensor:
    if len(shape) == 1:  # norm weights (Llama and Qwen3-MoE have no biases)
        return torch.ones(shape, dtype=dtype)
    if len(shape) == 3:  # fused experts: drawn expert by expert, so that no float32 copy of all of them exists
        out = torch.empty(shape, dtype=dtype)
        for e in range(shape[0]):
            out[e] = torch.randn(shape[1:], generator=generator) * 0.02
        return out
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def write_random_model(config, out: str | Path, dtype: str = "float32", seed: int = 0, fused: bool = False) -> Path:
    """One shard per decoder layer, one for everything else; each built, written and dropped in turn. Tensors are
    stored under the names save_pretrained writes (per expert, for a mixture of experts) unless `fused`."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    skeleton.tie_weights()  # not done under init_empty_weights; a tied head is then one tensor
    shapes = {name: tuple(p.shape) for name, p in skeleton.named_parameters()}  # tied weights appear once
    layer_count = config.num_hidden_layers
    groups = [[n for n in shapes if n.startswith(f"model.layers.{i}.")] for i in range(layer_count)]
    groups.append([n for n in shapes if not n.startswith("model.layers.")])
    weight_map, total = {}, 0
    for index, names in enumerate(groups):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)  # a layer's weights depend on it alone
        tensors = {name: random_tensor(name, shapes[name], DTYPES[dtype], generator) for name in names}
        if not fused:  # transformers' save-time form: per-expert views of the fused tensors
            tensors = {k: v.contiguous() for k, v in revert_weight_conversion(skeleton, tensors).items()}
        names = list(tensors)
        shard = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, out / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, shard)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        print(f"wrote {shard}", file=sys.stderr, flush=True)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    config.dtype = dtype
    config.save_pretrained(out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(SHAPES | MOE_SHAPES), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--layers", type=int, default=None, help="override the number of decoder layers")
    parser.add_argument("--tie", action="store_true", help="tie the output head to the input embeddings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fused", action="store_true", help="store fused experts as the modules hold them")
    args = parser.parse_args(argv)
    write_random_model(make_config(args.config, args.layers, args.tie), args.out, args.dtype, args.seed, args.fused)


if __name__ == "__main__":
    main()
