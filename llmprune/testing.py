"""Tiny random decoders of several families, built from configs (no download), for tests and the benchmarks'
smoke runs (``--quick``). Their numbers mean nothing; their shapes exercise every code path.
"""

from __future__ import annotations

from pathlib import Path

VOCAB = 128


def tiny_model(family: str, layers: int = 3, hidden: int = 64, seed: int = 0, intermediate: int | None = None,
               vocab: int = VOCAB, heads: int = 4):
    """A random ``family`` decoder in eval mode, its weights fixed by ``seed`` (two KV heads where the family has
    grouped-query attention)."""
    import torch
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig,
                              GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(seed)
    intermediate = intermediate or 2 * hidden
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                             num_attention_heads=heads, num_key_value_heads=2, vocab_size=vocab))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                             num_attention_heads=heads, num_key_value_heads=2, vocab_size=VOCAB))
    elif family == "opt":
        model = OPTForCausalLM(OPTConfig(hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=layers,
                                         num_attention_heads=heads, vocab_size=VOCAB, word_embed_proj_dim=hidden,
                                         max_position_embeddings=128))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(hidden_size=hidden, intermediate_size=intermediate,
                                                 num_hidden_layers=layers, num_attention_heads=heads,
                                                 num_key_value_heads=2, vocab_size=vocab, sliding_window=8))
    elif family == "gemma3":  # sliding-window and global layers: each gets its own mask and rotary embeddings
        model = Gemma3ForCausalLM(Gemma3TextConfig(hidden_size=hidden, intermediate_size=intermediate,
                                                   num_hidden_layers=layers, num_attention_heads=heads,
                                                   num_key_value_heads=2, head_dim=16, vocab_size=vocab,
                                                   sliding_window=8, layer_types=["sliding_attention", "full_attention"]
                                                   * (layers // 2) + ["sliding_attention"] * (layers % 2)))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=VOCAB,
                                           n_positions=128, bos_token_id=0, eos_token_id=0))
    elif family == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=hidden, intermediate_size=2 * hidden,
                                                 num_hidden_layers=layers, num_attention_heads=heads, vocab_size=VOCAB))
    else:
        raise ValueError(f"no tiny model of family {family!r}")
    return model.eval()


def save_tiny_model_dir(path: str | Path, intermediate: int | None = None, nan: bool = False, *,
                        text: str | None = None, vocab_size: int = 300, layers: int = 3) -> Path:
    """A tiny Llama saved as a local Hugging Face directory, with a byte-level BPE tokenizer trained offline on
    ``text`` (default: one repeated sentence); byte-level, so any text tokenizes without unknowns. The
    tokenizer's vocabulary sizes the model's embeddings. ``nan`` puts a NaN in the first layer's weights."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text if text is not None else "The quick brown fox jumps over the lazy dog. " * 20],
                            vocab_size=vocab_size, min_frequency=1, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    model = tiny_model("llama", layers=layers, intermediate=intermediate, vocab=len(tokenizer))
    if nan:
        with torch.no_grad():
            model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)
