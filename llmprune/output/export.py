"""Export a saved Hugging Face model directory to one GGUF file that llama.cpp loads.

Why our own writer (the `gguf` package's GGUFWriter) and not llama.cpp's `convert_hf_to_gguf.py`: no
registry package installs that script in a usable way. llama-cpp-python's sdist vendors it but its wheel
does not install it (and the package needs a C++ build); the one PyPI package that ships it as a module
(`convert-hf-to-gguf`, a third-party repackaging) bundles its own copy of the `gguf` package, which would
overwrite the `gguf` that transformers' GGUF loader and ours use; and the script refuses any byte-level
BPE tokenizer whose pre-tokenizer hash is not on its list. A Llama is a short, well-documented mapping:
GGUF tensor names come from `gguf`'s own tables, hyperparameters and tokenizer keys from its writer.

What a family needs is data (`ARCHITECTURES`, `PRE_TOKENIZERS`); the one numeric quirk is that llama.cpp's
`llama` architecture rotates adjacent pairs of each head's query/key dimensions, while transformers rotates
the two halves, so q_proj/k_proj rows (and biases) are reordered as llama.cpp's own converter does (its `qwen2`
architecture rotates halves, as transformers does: nothing to reorder).
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass
from pathlib import Path

from ..config import GGUF_OUTTYPES, RunConfig
from ..errors import LLMPruneError
from ..options import option, same_as
from .atomic import write_atomically

FORMATS = ("gguf",)


@dataclass(frozen=True)
class GGUFArchitecture:
    arch: str  # gguf.MODEL_ARCH member: fixes the tensor names and the key prefix (`llama.block_count`)
    permute_qk: bool  # llama.cpp rotates adjacent pairs, transformers rotates halves
    hidden_act: str = "silu"
    unsupported: tuple[str, ...] = ()  # config.json flags llama.cpp's architecture has no counterpart for
    # llama.cpp's loader expects q_proj to be hidden_size wide (not heads x head_dim): no head or hidden pruning
    query_width_is_hidden: bool = False


# config.json `model_type` -> how llama.cpp names it. Mistral (sliding window) is an entry away once tested.
ARCHITECTURES = {
    "llama": GGUFArchitecture(arch="LLAMA", permute_qk=True),
    "qwen2": GGUFArchitecture(arch="QWEN2", permute_qk=False, unsupported=("use_sliding_window",),
                              query_width_is_hidden=True),
}

# A tokenizer.json pre-tokenizer, reduced to a signature, -> the `tokenizer.ggml.pre` name that selects the same
# split in llama.cpp (src/llama-vocab.cpp). Only byte-level BPE vocabularies are exported.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # Llama 3's, but each digit alone
PRE_TOKENIZERS = {
    (("ByteLevel", True, False),): "gpt-2",  # GPT-2's regex inside ByteLevel
    (("Digits", True), ("ByteLevel", True, False)): "smollm",  # each digit alone, then GPT-2's regex
    (("Split", LLAMA3_SPLIT), ("ByteLevel", False, False)): "llama-bpe",
    (("Split", QWEN2_SPLIT), ("ByteLevel", False, False)): "qwen2",
}
# Normalizers llama.cpp may leave out: NFC (Qwen2's) changes no text that is already NFC, which is how nearly
# all text is stored; llama.cpp's own converter exports it the same way.
IGNORED_NORMALIZERS = (None, {"type": "NFC"})


@dataclass(frozen=True)
class ExportConfig:
    """The `export` command's settings; the GGUF weight type and --overwrite are a prune run's (RunConfig)."""

    model: str = option(MISSING, "an llmprune output directory (a saved Hugging Face model)", cli=False)
    format: str = option("gguf", "gguf: one file for llama.cpp and the tools built on it", choices=FORMATS)
    outtype: str = same_as(RunConfig, "gguf_outtype", flag="--outtype", group=None)
    output: str | None = option(None, "the .gguf file to write (default: DIR/<DIR's name>-<outtype>.gguf)")
    overwrite: bool = same_as(RunConfig, "overwrite", help="replace an existing file (only once the new one is "
                              "complete)", group=None)

    def output_path(self) -> Path:
        if self.output:
            return Path(self.output)
        folder = Path(self.model)
        return folder / f"{folder.resolve().name}-{self.outtype}.gguf"


def run_export(config: ExportConfig) -> Path:
    """The `export` command: checks everything first, then writes the file."""
    if config.format not in FORMATS:
        raise LLMPruneError(f"unknown export format '{config.format}': choose one of {', '.join(FORMATS)}")
    return export_gguf(config.model, config.output_path(), outtype=config.outtype, overwrite=config.overwrite)


def export_gguf(model_dir: str | Path, out_path: str | Path, outtype: str = "f16", overwrite: bool = False) -> Path:
    """Write `model_dir` (config.json, *.safetensors, tokenizer.json) as a GGUF file at `out_path`, atomically.

    Every check (outtype, existing file, architecture, shapes, tokenizer) runs before any tensor is read.
    2-D weights take `outtype` (q8_0 falls back to f16 for a row length not a multiple of 32, as llama.cpp's
    converter does); norms and biases stay f32.
    """
    plan = _plan(Path(model_dir), Path(out_path), outtype, overwrite)
    write_atomically(plan.out_path, lambda staging: _write(plan, staging))
    return plan.out_path


@dataclass
class _Plan:
    model_dir: Path
    out_path: Path
    outtype: str
    config: dict
    arch: GGUFArchitecture
    head_dim: int
    tensors: dict  # safetensors name -> (file, GGUF name)
    vocab: dict  # tokens, token types, merges, pre-tokenizer, special ids, chat template


def check_gguf_export(config: dict, tokenizer_spec: dict | None, outtype: str,
                      width_pruned: bool = False) -> GGUFArchitecture:
    """What can be checked from a model's config and tokenizer alone: a prune run with `--save-format gguf`
    calls this on the loaded model before pruning (`model.config.to_dict()`,
    `json.loads(tokenizer.backend_tokenizer.to_str())`, ``width_pruned`` when the run prunes heads or the hidden
    size), so that a long run cannot end in a refusal."""
    if outtype not in GGUF_OUTTYPES:
        raise LLMPruneError(f"unknown --outtype '{outtype}': choose one of {', '.join(GGUF_OUTTYPES)}")
    model_type = config.get("model_type")
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise LLMPruneError(f"GGUF export does not know the '{model_type}' architecture yet: "
                            f"supported: {', '.join(ARCHITECTURES)}")
    if config.get("hidden_act", "silu") != arch.hidden_act:
        raise LLMPruneError(f"hidden_act '{config['hidden_act']}' has no llama.cpp equivalent for {model_type}")
    for flag in arch.unsupported:
        if config.get(flag):
            raise LLMPruneError(f"{flag} is set in the {model_type} config, which llama.cpp's "
                                f"{arch.arch.lower()} architecture cannot express: export a model without it")
    heads = config.get("num_attention_heads")
    query_width = (config.get("head_dim") or config["hidden_size"] // heads) * heads if heads else None
    if arch.query_width_is_hidden and (width_pruned or query_width not in (None, config["hidden_size"])):
        raise LLMPruneError(f"llama.cpp's {arch.arch.lower()} architecture needs the query width (heads x head_dim"
                            f" = {query_width}) to equal the hidden size ({config['hidden_size']}), which pruning "
                            f"heads or the hidden size breaks: prune channels or layers of a {model_type} model "
                            f"that is to be exported to GGUF")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise LLMPruneError(f"rope scaling '{rope.get('rope_type', rope.get('type'))}' is not exported yet: "
                            f"only plain RoPE models can be exported to GGUF")
    if tokenizer_spec is not None:
        _pre_tokenizer_name(tokenizer_spec)
    return arch


def _plan(model_dir: Path, out_path: Path, outtype: str, overwrite: bool) -> _Plan:
    if outtype not in GGUF_OUTTYPES:
        raise LLMPruneError(f"unknown --outtype '{outtype}': choose one of {', '.join(GGUF_OUTTYPES)}")
    if out_path.is_dir():
        raise LLMPruneError(f"{out_path} is a directory: give the .gguf file's path")
    if out_path.exists() and not overwrite:
        raise LLMPruneError(f"{out_path} already exists: pass --overwrite to replace it, or choose another output")
    if not (model_dir / "config.json").is_file():
        raise LLMPruneError(f"{model_dir} has no config.json: export needs a saved Hugging Face model directory")
    config = json.loads((model_dir / "config.json").read_text())
    arch = check_gguf_export(config, None, outtype)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    tensors = _map_tensors(model_dir, config, arch, head_dim)
    vocab = _read_tokenizer(model_dir, config)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return _Plan(model_dir, out_path, outtype, config, arch, head_dim, tensors, vocab)


def _map_tensors(model_dir: Path, config: dict, arch: GGUFArchitecture, head_dim: int) -> dict:
    """Every stored tensor's GGUF name, with its shape checked against what llama.cpp will expect."""
    import gguf
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise LLMPruneError(f"{model_dir} has no *.safetensors weights: save the model with safetensors first")
    layers = config["num_hidden_layers"]
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.arch), layers)
    tied = config.get("tie_word_embeddings", False)
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    # Output rows each linear must have (shape[0]); the input side follows from the same numbers.
    rows = {"q_proj": heads * head_dim, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim,
            "o_proj": config["hidden_size"], "gate_proj": config["intermediate_size"],
            "up_proj": config["intermediate_size"], "down_proj": config["hidden_size"]}
    mapped = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if tied and name == "lm_head.weight":
                    continue  # llama.cpp reuses token_embd when output.weight is absent
                gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise LLMPruneError(f"{file.name} holds '{name}', which llama.cpp's {arch.arch.lower()} "
                                        f"architecture has no tensor for: this model cannot be exported to GGUF")
                module = name.rsplit(".", 2)[-2]
                shape = f.get_slice(name).get_shape()
                if module in rows and shape[0] != rows[module]:
                    raise LLMPruneError(
                        f"{name} has {shape[0]} rows where config.json implies {rows[module]}: llama.cpp needs "
                        f"the same head count and MLP width in every layer, as config.json states them")
                mapped[name] = (file, gguf_name)
    found = {int(n.split(".")[2]) for n in mapped if n.startswith("model.layers.")}
    if found != set(range(layers)):
        raise LLMPruneError(f"config.json says {layers} layers but the weights hold layers {sorted(found)}")
    return mapped


def _pre_tokenizer_signature(pre: dict | None) -> tuple:
    if pre is None:
        return ()
    if pre["type"] == "Sequence":
        return tuple(part for p in pre["pretokenizers"] for part in _pre_tokenizer_signature(p))
    if pre["type"] == "ByteLevel":
        return (("ByteLevel", pre.get("use_regex", True), pre.get("add_prefix_space", False)),)
    if pre["type"] == "Digits":
        return (("Digits", pre.get("individual_digits", False)),)
    if pre["type"] == "Split":
        return (("Split", pre["pattern"].get("Regex", pre["pattern"].get("String"))),)
    return ((pre["type"],),)


def _pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for a tokenizer.json's pre-tokenizer; a one-line refusal for anything else."""
    model = spec.get("model", {})
    pre = PRE_TOKENIZERS.get(_pre_tokenizer_signature(spec.get("pre_tokenizer")))
    if model.get("type") != "BPE" or model.get("byte_fallback") or spec.get("normalizer") not in IGNORED_NORMALIZERS \
            or pre is None:
        raise LLMPruneError("GGUF export handles byte-level BPE tokenizers with a GPT-2, SmolLM, Llama-3 or Qwen2 "
                            f"pre-tokenizer; this one is {model.get('type')} with pre-tokenizer "
                            f"{_pre_tokenizer_signature(spec.get('pre_tokenizer'))} and normalizer "
                            f"{(spec.get('normalizer') or {}).get('type')}")
    return pre


def _read_tokenizer(model_dir: Path, config: dict) -> dict:
    """Vocabulary, merges and special tokens from tokenizer.json; special ids and chat template from transformers."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise LLMPruneError(f"{model_dir} has no tokenizer.json: GGUF export carries the tokenizer, save it beside "
                            f"the model (tokenizer.save_pretrained)")
    spec = json.loads(path.read_text())
    model = spec["model"]
    pre = _pre_tokenizer_name(spec)
    import gguf
    from transformers import AutoTokenizer

    vocab_size = config["vocab_size"]
    by_id = {index: token for token, index in model["vocab"].items()}
    types = {index: gguf.TokenType.NORMAL for index in by_id}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    if max(by_id) >= vocab_size:
        raise LLMPruneError(f"the tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}")
    # Embedding rows beyond the tokenizer (vocabularies padded to a multiple) get placeholder tokens, unused; so do
    # the placeholders a tokenizer read back from a GGUF file carries as ordinary entries.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    token_types = [int(gguf.TokenType.UNUSED if token == f"[PAD{i}]" else types[i]) for i, token in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    probe = tokenizer("a")["input_ids"]  # does encoding add BOS/EOS? llama.cpp must do the same
    special = {}
    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is None:  # tokenizers that name no special token: the model config's ids
            token_id = config.get(f"{name}_token_id")
        if isinstance(token_id, list):
            token_id = token_id[0]
        if token_id is not None and 0 <= token_id < vocab_size:
            special[name] = int(token_id)
    chat_template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return {"tokens": tokens, "token_types": token_types, "merges": merges, "pre": pre, "special": special,
            "add_bos": bool(probe) and probe[0] == tokenizer.bos_token_id,
            "add_eos": bool(probe) and probe[-1] == tokenizer.eos_token_id and tokenizer.eos_token_id is not None,
            "chat_template": chat_template}


def _permute_rotary(weight, heads: int):
    """Reorder each head's rows from halves (transformers' rotate_half) to adjacent pairs (llama.cpp's rope)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _encode(weight, outtype: str):
    """(array, GGML type) for a float32 numpy array: matrices take the outtype, vectors stay f32."""
    import gguf

    qtype = gguf.GGMLQuantizationType
    if weight.ndim < 2 or outtype == "f32":
        return weight, qtype.F32
    if outtype == "q8_0" and weight.shape[-1] % gguf.GGML_QUANT_SIZES[qtype.Q8_0][0] == 0:
        return gguf.quants.quantize(weight, qtype.Q8_0), qtype.Q8_0
    if outtype == "bf16":
        return gguf.quants.quantize(weight, qtype.BF16), qtype.BF16
    return weight.astype("float16"), qtype.F16


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _write(plan: _Plan, path: Path) -> None:
    import gguf
    import torch
    from safetensors import safe_open

    config, vocab = plan.config, plan.vocab
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    rope = config.get("rope_parameters") or {}
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, plan.arch.arch)])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(plan.model_dir.resolve().name)
        writer.add_context_length(config.get("max_position_embeddings", 2048))
        writer.add_embedding_length(config["hidden_size"])
        writer.add_block_count(config["num_hidden_layers"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        # Explicit: a structured model with fewer heads keeps head_dim, so hidden_size / heads is no longer it.
        writer.add_key_length(plan.head_dim)
        writer.add_value_length(plan.head_dim)
        writer.add_rope_dimension_count(plan.head_dim)
        writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        writer.add_vocab_size(config["vocab_size"])
        writer.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES[plan.outtype])))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
        writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["token_types"])
        writer.add_token_merges(vocab["merges"])
        for name, token_id in vocab["special"].items():
            getattr(writer, f"add_{name}_token_id")(token_id)
        writer.add_add_bos_token(vocab["add_bos"])
        writer.add_add_eos_token(vocab["add_eos"])
        if vocab["chat_template"]:
            writer.add_chat_template(vocab["chat_template"])

        for file in dict.fromkeys(file for file, _ in plan.tensors.values()):
            with safe_open(file, framework="pt") as f:
                for name, (_, gguf_name) in ((n, t) for n, t in plan.tensors.items() if t[0] == file):
                    weight = f.get_tensor(name).to(torch.float32).numpy()
                    if plan.arch.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
                        weight = _permute_rotary(weight, heads)
                    elif plan.arch.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
                        weight = _permute_rotary(weight, kv_heads)
                    data, qtype = _encode(weight, plan.outtype)
                    writer.add_tensor(gguf_name, data, raw_dtype=qtype)

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
