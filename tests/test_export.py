"""GGUF export: the file loads back through transformers' own GGUF loader (independent of our writer: it
reverses llama.cpp's q/k row order and reads llama.cpp's key names) and gives the saved model's logits."""

import json
from pathlib import Path

import pytest
import torch
from tiny_models import save_tiny_model_dir, tiny_model

from llmprune.errors import LLMPruneError
from llmprune.output.export import ExportConfig, export_gguf, run_export

# Max |logit difference| allowed, relative to the largest |logit|: f32 is bit-exact, the others round weights.
TOLERANCE = {"f32": 1e-6, "f16": 3e-3, "bf16": 2e-2, "q8_0": 5e-2}
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    path = save_tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def logits_of(model, vocab: int) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


def gguf_logits_match(model_dir, gguf_name, outtype, **load_kwargs):
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    loaded = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_name, **load_kwargs).eval()
    expected, got = logits_of(saved, saved.config.vocab_size), logits_of(loaded, saved.config.vocab_size)
    error = float((expected - got).abs().max() / expected.abs().max())
    return error, loaded


@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_round_trip_logits(tiny_dir, outtype):
    path = export_gguf(tiny_dir, tiny_dir / f"tiny-{outtype}.gguf", outtype)
    error, _ = gguf_logits_match(tiny_dir, path.name, outtype)
    assert error <= TOLERANCE[outtype], f"{outtype}: relative logit error {error:.2e}"
    if outtype != "f32":
        assert error > 0  # the rounding really happened: the tolerance is not hiding an f32 file


def test_file_types_and_sizes(tiny_dir):
    from gguf import GGMLQuantizationType, GGUFReader

    sizes = {}
    for outtype in ("f32", "f16", "q8_0"):
        path = export_gguf(tiny_dir, tiny_dir / f"sizes-{outtype}.gguf", outtype)
        sizes[outtype] = path.stat().st_size
        kinds = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
        assert kinds["blk.0.attn_norm.weight"] == GGMLQuantizationType.F32  # vectors stay f32
        assert kinds["blk.0.ffn_down.weight"].name == outtype.upper()
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_tokenizer_and_chat_template_carried(tiny_dir):
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    path = export_gguf(tiny_dir, tiny_dir / "tok.gguf", "f16")
    saved = AutoTokenizer.from_pretrained(tiny_dir)
    loaded = AutoTokenizer.from_pretrained(tiny_dir, gguf_file=path.name)
    text = "The quick brown fox, 123 jumps over the lazy dog!  It's  quick."
    assert loaded(text)["input_ids"] == saved(text)["input_ids"]
    fields = GGUFReader(path).fields
    assert fields["tokenizer.chat_template"].contents() == CHAT_TEMPLATE
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    merges = json.loads((tiny_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"].contents() == [" ".join(pair) for pair in merges]


@pytest.fixture(scope="module")
def structured_dir(tmp_path_factory, tiny_dir):
    """What structured pruning leaves: 2 layers, 2 heads of head_dim 16 in a hidden size of 64 (so head_dim is
    not hidden / heads), a 96-wide MLP, biases on the linears (bias compensation), tied embeddings."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, vocab_size=len(tokenizer), attention_bias=True, mlp_bias=True, tie_word_embeddings=True))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("structured")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_structured_shapes_round_trip(structured_dir, outtype):
    from transformers import LlamaConfig

    path = export_gguf(structured_dir, structured_dir / f"s-{outtype}.gguf", outtype)
    # transformers' GGUF loader reads no bias flags from a llama file: hand it the config so biases load.
    error, loaded = gguf_logits_match(structured_dir, path.name, outtype,
                                      config=LlamaConfig.from_pretrained(structured_dir))
    assert error <= TOLERANCE[outtype], f"{outtype}: relative logit error {error:.2e}"
    # The file alone states the shapes: head_dim comes from the GGUF, not from hidden / heads.
    from transformers import AutoConfig

    from_file = AutoConfig.from_pretrained(structured_dir, gguf_file=path.name)
    assert (from_file.head_dim, from_file.num_attention_heads, from_file.num_key_value_heads,
            from_file.intermediate_size, from_file.num_hidden_layers) == (16, 2, 1, 96, 2)


def test_refuses_existing_file_unknown_outtype_and_architecture(tiny_dir, tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"keep me")
    with pytest.raises(LLMPruneError, match="--overwrite"):
        export_gguf(tiny_dir, target)
    assert target.read_bytes() == b"keep me"
    with pytest.raises(LLMPruneError, match="outtype"):
        export_gguf(tiny_dir, tmp_path / "x.gguf", outtype="q4_k")
    with pytest.raises(LLMPruneError, match="format"):
        run_export(ExportConfig(model=str(tiny_dir), format="onnx", output=str(tmp_path / "y.gguf")))
    opt_dir = tmp_path / "opt"
    tiny_model("opt").save_pretrained(opt_dir)
    with pytest.raises(LLMPruneError, match="'opt' architecture"):
        export_gguf(opt_dir, tmp_path / "opt.gguf")
    with pytest.raises(LLMPruneError, match="config.json"):
        export_gguf(tmp_path, tmp_path / "none.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "opt"]  # nothing written by any refusal


def test_overwrite_replaces_and_interrupt_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    import gguf

    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    path = run_export(ExportConfig(model=str(tiny_dir), outtype="f16", output=str(target), overwrite=True))
    assert path == target and target.read_bytes()[:4] == b"GGUF"
    good = target.read_bytes()

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(tiny_dir, target, "q8_0", overwrite=True)
    assert target.read_bytes() == good  # the previous file survives an interrupted overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no partial file left behind


def test_default_output_path(tiny_dir):
    config = ExportConfig(model=str(tiny_dir), outtype="q8_0")
    assert config.output_path() == tiny_dir / f"{tiny_dir.name}-q8_0.gguf"


def test_refuses_non_uniform_widths(structured_dir, tmp_path):
    """A layer narrower than config.json says cannot be described to llama.cpp's llama architecture."""
    import shutil

    from safetensors.torch import load_file, save_file

    bent = tmp_path / "bent"
    shutil.copytree(structured_dir, bent, ignore=shutil.ignore_patterns("*.gguf"))
    weights = load_file(bent / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"][:64]
    save_file(weights, bent / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LLMPruneError, match="every layer"):
        export_gguf(bent, tmp_path / "bent.gguf")
    assert not (tmp_path / "bent.gguf").exists()


def test_preflight_from_loaded_model(tiny_dir):
    """What a prune run with --save-format gguf checks before pruning, from the model and tokenizer in memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmprune.output.export import check_gguf_export

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    spec = json.loads(AutoTokenizer.from_pretrained(tiny_dir).backend_tokenizer.to_str())
    assert check_gguf_export(model.config.to_dict(), spec, "q8_0").arch == "LLAMA"
    sentencepiece_like = dict(spec, pre_tokenizer={"type": "Metaspace", "replacement": "\u2581"})
    with pytest.raises(LLMPruneError, match="byte-level BPE"):
        check_gguf_export(model.config.to_dict(), sentencepiece_like, "f16")
    with pytest.raises(LLMPruneError, match="'gpt2' architecture"):
        check_gguf_export(tiny_model("gpt2").config.to_dict(), spec, "f16")


# ---- Qwen2: its own architecture (no q/k reordering), q/k/v biases, an untied head, and its pre-tokenizer ----------

CODE = ("def area(width, height):\n    return width * height  # 12 x 345 = 4140\n\n"
        "class Point:\n    x: int = 2024\n    y: int = 31337\n\nprint(area(12, 345), 'café', \"naïve\")\n")


def qwen2_style_tokenizer(path):
    """A byte-level BPE built the way Qwen2's is (NFC, the Qwen2 split regex, byte-level without its own regex),
    offline. Its merges are learned under Llama 3's split, so merges of digits exist: under Qwen2's split (each
    digit alone) they never apply, under Llama 3's (up to three digits) they would."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llmprune.output.export import LLAMA3_SPLIT, QWEN2_SPLIT

    def split(regex):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = split(LLAMA3_SPLIT)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False)
    bpe.train_from_iterator([CODE * 30, "123 123 456 456 2024 31337 " * 40], trainer)
    bpe.pre_tokenizer = split(QWEN2_SPLIT)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return tokenizer


def save_tiny_qwen2(path, tokenizer, vocab_size: int, **config):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab_size, tie_word_embeddings=False, max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **config))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.5)  # biases large enough that dropping or misplacing one shows in the logits
        model.lm_head.weight.normal_(0, 0.2)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    tokenizer = qwen2_style_tokenizer(path)
    save_tiny_qwen2(path, tokenizer, vocab_size=512)  # padded past the tokenizer, as Qwen2's 151,936 rows are
    return path


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_qwen2_round_trip_logits(qwen2_dir, outtype):
    path = export_gguf(qwen2_dir, qwen2_dir / f"q-{outtype}.gguf", outtype)
    error, loaded = gguf_logits_match(qwen2_dir, path.name, outtype)
    assert error <= TOLERANCE[outtype], f"{outtype}: relative logit error {error:.2e}"
    assert type(loaded).__name__ == "Qwen2ForCausalLM" and not loaded.config.tie_word_embeddings


def test_qwen2_file_holds_biases_untied_head_and_its_pre_tokenizer(qwen2_dir):
    from gguf import GGUFReader, TokenType
    from transformers import AutoTokenizer

    path = export_gguf(qwen2_dir, qwen2_dir / "q.gguf", "f32")
    reader = GGUFReader(path)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "qwen2"
    assert fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert fields["qwen2.rope.freq_base"].contents() == pytest.approx(1e6)  # Qwen2's theta, not the default
    tensors = {t.name: t for t in reader.tensors}
    saved = AutoModelForCausalLM_from(qwen2_dir)
    for letter in "qkv":
        stored = torch.from_numpy(tensors[f"blk.1.attn_{letter}.bias"].data.copy())
        assert torch.equal(stored, getattr(saved.model.layers[1].self_attn, f"{letter}_proj").bias)  # not reordered
    assert "output.weight" in tensors and "blk.0.attn_output.bias" not in tensors
    saved_tokenizer = AutoTokenizer.from_pretrained(qwen2_dir)
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[len(saved_tokenizer):] == [int(TokenType.UNUSED)] * (512 - len(saved_tokenizer))
    assert types[saved_tokenizer.convert_tokens_to_ids("<|im_end|>")] == int(TokenType.CONTROL)
    assert fields["tokenizer.ggml.eos_token_id"].contents() == saved_tokenizer.eos_token_id

    # transformers builds the tokenizer from the file by its pre-tokenizer name (its own table of splits)
    loaded = AutoTokenizer.from_pretrained(qwen2_dir, gguf_file=path.name)
    text = CODE + "x = 123456\n"
    assert loaded(text)["input_ids"] == saved_tokenizer(text)["input_ids"]
    digits = saved_tokenizer.tokenize("x = 123456")
    assert digits[-6:] == list("123456")  # one digit per token, though merges of digits exist in the vocabulary
    assert any(token.isdigit() and len(token) > 1 for token in saved_tokenizer.get_vocab())


def AutoModelForCausalLM_from(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_qwen2_sliding_window_is_refused(qwen2_dir, tmp_path):
    config = AutoModelForCausalLM_from(qwen2_dir).config.to_dict() | {"use_sliding_window": True}
    from llmprune.output.export import check_gguf_export

    with pytest.raises(LLMPruneError, match="use_sliding_window .* qwen2 architecture"):
        check_gguf_export(config, None, "f16")


def test_qwen2_with_pruned_heads_or_hidden_size_is_refused_before_writing(qwen2_dir, tmp_path):
    """llama.cpp's qwen2 loader expects q_proj as wide as the hidden size (measured: a hidden-pruned
    Qwen2.5-0.5B, 768 wide with 14 heads of 64, fails to load with "attn_q.weight has wrong shape"). A saved
    model of that shape is refused with the fix before any byte is written; so is a run that will prune heads or
    the hidden size, before it prunes; a dense Qwen2 still passes."""
    import shutil

    from llmprune.output.export import check_gguf_export

    narrowed = tmp_path / "hidden-pruned"
    shutil.copytree(qwen2_dir, narrowed, ignore=shutil.ignore_patterns("*.gguf"))
    config = json.loads((narrowed / "config.json").read_text())
    (narrowed / "config.json").write_text(json.dumps(config | {"hidden_size": 48, "head_dim": 16}))
    with pytest.raises(LLMPruneError, match=r"query width \(heads x head_dim = 64\) to equal the hidden size \(48\)"):
        export_gguf(narrowed, tmp_path / "out.gguf", "f16")
    assert list(tmp_path.glob("*.gguf")) == []
    with pytest.raises(LLMPruneError, match="prune channels or layers"):
        check_gguf_export(config, None, "f16", width_pruned=True)
    assert check_gguf_export(config, None, "f16").arch == "QWEN2"


@pytest.mark.parametrize("structure", ["heads", "hidden"])
def test_prune_run_refuses_a_qwen2_gguf_it_would_narrow_before_pruning(qwen2_dir, tmp_path, structure, monkeypatch):
    """--save-format gguf with --structure heads or hidden on a Qwen2: one line before any calibration or pruning,
    and no output folder."""
    from llmprune import pipeline
    from llmprune.config import PruneConfig, RunConfig

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration started before the refusal")

    monkeypatch.setattr(pipeline, "calibration_data", no_calibration)
    run = RunConfig(model=str(qwen2_dir), prune=PruneConfig(structure=structure, sparsity=0.25, round_to=16,
                                                            nsamples=2, seqlen=32),
                    calib="code", eval="none", output=str(tmp_path / "out"), save_format="gguf")
    with pytest.raises(LLMPruneError, match="prune channels or layers"):
        pipeline.run(run, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_real_qwen2_tokenizer_exports_as_llama_cpp_wrote_it(tmp_path):
    """The real Qwen2.5-Coder tokenizer (read from the published GGUF, which llama.cpp's converter wrote) beside a
    tiny random Qwen2 of the real vocabulary: our file's tokenizer keys equal the published file's, and the
    tokenizer transformers builds from our file encodes code as the real one does."""
    import importlib.util

    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from llmprune.inputs.models import PARTED, resolve_model

    if any(importlib.util.find_spec(module) is None for module in PARTED["qwen2.5-coder-0.5b"].parts):
        pytest.skip(f"the part packages are not installed: {PARTED['qwen2.5-coder-0.5b'].install}")
    source = resolve_model("qwen-coder-0.5b")
    real = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    real.save_pretrained(tmp_path)
    save_tiny_qwen2(tmp_path, real, vocab_size=151936, bos_token_id=151643)
    path = export_gguf(tmp_path, tmp_path / "tiny.gguf", "f16")
    ours, published = GGUFReader(path).fields, GGUFReader(f"{source.path}/{source.gguf_file}").fields
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"):
        assert ours[key].contents() == published[key].contents(), key
    text = (Path(__file__).read_text() + "\n12345 café naïve ½ 你好\n")[:20000]
    assert AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)(text)["input_ids"] == real(text)["input_ids"]
