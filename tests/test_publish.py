"""Model card and push to the Hub, against the loopback Hub of tests/hub_server.py (no network)."""

import json
import socket
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import constants
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from llmprune.errors import LLMPruneError
from llmprune.output.publish import model_card, push, write_model_card

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer  # noqa: E402

REPO_ID = "tester/tiny-llama-wanda"
COMMAND = "python -m llmprune --model llama --method wanda --sparsity 0.5 --output out/x"


def prune_half(model: torch.nn.Module) -> list[dict]:
    """Zero a random half of every decoder linear weight, as a pruning run would, and report it like one."""
    generator = torch.Generator().manual_seed(0)
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            with torch.no_grad():
                module.weight[torch.rand(module.weight.shape, generator=generator) < 0.5] = 0
            layers.append({"name": name, "shape": list(module.weight.shape), "sparsity": 0.5,
                           "achieved_sparsity": (module.weight == 0).float().mean().item()})
    return layers


def make_report(layers: list[dict], **overrides) -> dict:
    report = {
        "llmprune_version": "0.1.0", "model": "llama", "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "architecture": "LlamaForCausalLM", "method": "wanda", "sparsity": 0.5, "pattern": "unstructured",
        "allocation": "uniform", "calibration": {"source": "wiki", "nsamples": 32, "seqlen": 512, "seed": 0},
        "achieved_sparsity": 0.5, "layers": layers,
        "perplexity": {"dataset": "wiki", "seqlen": 512, "windows": 40, "dense": 18.5, "pruned": 40.1,
                       "recovered": None},
        "zero_shot": {"tasks": {"arc_easy": {"acc": 0.48, "acc_stderr": 0.05}}, "mean_acc": 0.48},
        "zero_shot_dense": {"tasks": {"arc_easy": {"acc": 0.61, "acc_stderr": 0.05}}, "mean_acc": 0.61},
        "seconds": {"load": 20.1, "calibrate": 3.2, "prune": 70.0, "evaluate": 100.0, "total": 200.0},
        "peak_rss_bytes": 1_400_000_000,
        "versions": {"llmprune": "0.1.0", "torch": "2.13.0", "transformers": "5.23.0"},
        "command": COMMAND, "license": "apache-2.0",
    }
    return {**report, **overrides}


def make_output(directory: Path, max_shard_size: str | None = None) -> tuple[Path, LlamaForCausalLM, dict]:
    """An llmprune output directory holding a tiny random pruned Llama, as the pruning command writes it."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    report = make_report(prune_half(model))
    model.save_pretrained(directory, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    (directory / "report.json").write_text(json.dumps(report, indent=2))
    (directory / "llmprune_config.json").write_text(json.dumps({"method": "wanda", "sparsity": 0.5}))
    write_model_card(directory, report)
    return directory, model, report


def snapshot(directory: Path) -> dict[str, bytes]:
    return {path.relative_to(directory).as_posix(): path.read_bytes()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


@pytest.fixture
def output(tmp_path):
    return make_output(tmp_path / "out")


@pytest.fixture
def no_stored_login(monkeypatch, tmp_path):
    """No token anywhere but where a test puts one: not the developer's login, not CI's OIDC."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def serve(monkeypatch, **options) -> HubServer:
    """Start a loopback Hub and point HF_ENDPOINT and HF_TOKEN at it (the caller enters it as a context)."""
    hub = HubServer(**options)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", hub.token)
    return hub


# ---------------------------------------------------------------- model card


def test_card_front_matter_and_sections(output):
    _, _, report = output
    card = model_card(report)
    metadata = front_matter(card)
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert metadata["library_name"] == "transformers"
    assert metadata["license"] == "apache-2.0"
    assert metadata["pipeline_tag"] == "text-generation"
    assert {"pruned", "sparse", "wanda", "unstructured"} <= set(metadata["tags"])
    assert f"```bash\n{COMMAND}\n```" in card
    assert "32 sequences of 512 tokens from `wiki` (seed 0)" in card
    # One row per decoder layer (2), not one per matrix (14).
    assert "| 0 | 7 |" in card and "| 1 | 7 |" in card and "Over the 14 pruned matrices" in card
    assert "| 18.50 | 40.10 |" in card and "recovered" not in card.split("## Evaluation")[1].split("\n\n")[1]
    assert "| arc_easy | 0.610 ± 0.050 | 0.480 ± 0.050 |" in card
    assert 'from_pretrained("path/to/this/folder")' in card
    assert 'from_pretrained("tester/x")' in model_card(report, "tester/x")
    assert "stored densely" in card


def test_card_of_a_minimal_2_4_report():
    card = model_card(make_report([], method="sparsegpt", pattern="2:4", command="a ```b``` c", base_model=None,
                                  license=None, zero_shot=None, zero_shot_dense=None,
                                  perplexity={"dataset": "c4", "seqlen": 128, "windows": 4, "dense": 9.0,
                                              "pruned": 12.0, "recovered": 10.5}))
    metadata = front_matter(card)
    assert "base_model" not in metadata and "license" not in metadata
    assert metadata["tags"] == ["pruned", "sparse", "sparsegpt", "2:4", "llmprune"]
    assert "````bash\na ```b``` c\n````" in card
    assert "| 9.00 | 12.00 | 10.50 |" in card
    assert "Ampere" in card and "to_sparse_semi_structured" in card
    assert "## Sparsity per layer" not in card and "Zero-shot" not in card
    assert "adapter" not in card


def test_card_warns_that_the_kept_adapter_is_dense():
    recovery = {"steps": 10, "lr": 5e-4, "r": 8}
    assert "adapter" not in model_card(make_report([], recovery=recovery))
    card = model_card(make_report([], recovery={**recovery, "adapter": "adapter"}))
    assert "`adapter/`" in card and "would fill the pruned zeros again" in card


def test_output_reloads_with_from_pretrained(output):
    directory, model, _ = output
    assert_same_weights(model, AutoModelForCausalLM.from_pretrained(directory))
    assert front_matter((directory / "README.md").read_text())["base_model"]


# ---------------------------------------------------------------- push


def test_push_round_trip(output, monkeypatch, no_stored_login, tmp_path):
    """hf_xet as installed, every file "regular": the default client path without Xet storage."""
    directory, model, report = output
    before = snapshot(directory)
    with serve(monkeypatch, lfs=False) as hub:
        url = push(directory, REPO_ID, commit_message="first upload")
    assert url == f"{hub.url}/{REPO_ID}"
    arrived = hub.files(REPO_ID)
    # The untouched card goes up naming the repo; every other file byte for byte.
    assert arrived.pop("README.md").decode() == model_card(report, REPO_ID)
    assert arrived == {name: data for name, data in before.items() if name != "README.md"}
    assert hub.repos[REPO_ID].branches["main"].commits == ["first upload"]
    assert ("POST", "/api/validate-yaml") in hub.requests
    assert snapshot(directory) == before
    downloaded = tmp_path / "downloaded"
    for name, data in hub.files(REPO_ID).items():
        (downloaded / name).parent.mkdir(parents=True, exist_ok=True)
        (downloaded / name).write_bytes(data)
    assert_same_weights(model, AutoModelForCausalLM.from_pretrained(downloaded))


# huggingface_hub's own LFS upload code triggers this warning of httpx2.
@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_push_sharded_through_lfs_multipart(tmp_path, monkeypatch, no_stored_login):
    """What a user without hf_xet gets: safetensors shards through git-LFS, large ones multipart."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    directory, _, _ = make_output(tmp_path / "out", max_shard_size="200KB")
    shards = sorted(path.name for path in directory.glob("*.safetensors"))
    assert len(shards) > 1 and (directory / "model.safetensors.index.json").is_file()
    with serve(monkeypatch, multipart_chunk=64 * 1024) as hub:
        push(directory, REPO_ID)
    arrived = hub.files(REPO_ID)
    assert {name: data for name, data in arrived.items() if name != "README.md"} == \
        {name: data for name, data in snapshot(directory).items() if name != "README.md"}
    assert {arrived[shard] for shard in shards} <= set(hub.lfs_objects.values())
    paths = [path for _, path in hub.requests]
    assert any(path.endswith(".git/info/lfs/objects/verify") for path in paths)
    assert any(path.count("/") == 3 and path.startswith("/storage/") for path in paths)  # a multipart part


def test_push_twice_then_edited_card(output, monkeypatch, no_stored_login):
    directory, _, _ = output
    with serve(monkeypatch, lfs=False) as hub:
        first = push(directory, REPO_ID)
        assert push(directory, REPO_ID) == first  # repo exists, nothing changed: no new commit
        assert len(hub.repos[REPO_ID].branches["main"].commits) == 1
        edited = (directory / "README.md").read_text() + "\nHand-written notes.\n"
        (directory / "README.md").write_text(edited)
        push(directory, REPO_ID)
    assert hub.files(REPO_ID)["README.md"].decode() == edited  # an edited card goes up as it is
    assert len(hub.repos[REPO_ID].branches["main"].commits) == 2


def test_push_to_a_revision(output, monkeypatch, no_stored_login):
    directory, _, _ = output
    with serve(monkeypatch, lfs=False) as hub:
        url = push(directory, REPO_ID, revision="wanda-50")
        assert push(directory, REPO_ID, revision="wanda-50", private=True) == url
    assert url == f"{hub.url}/{REPO_ID}/tree/wanda-50"
    assert hub.files(REPO_ID, "main") == {}
    assert set(hub.files(REPO_ID, "wanda-50")) == set(snapshot(directory))


def test_rejected_token_is_one_clear_line_without_the_token(output, monkeypatch, no_stored_login):
    directory, _, _ = output
    before = snapshot(directory)
    secret = "hf_wrongSECRETtoken123"
    with serve(monkeypatch, lfs=False) as hub, pytest.raises(LLMPruneError) as caught:
        push(directory, REPO_ID, token=secret)
    message = str(caught.value)
    assert message.startswith("the Hub rejected the token (401)") and "\n" not in message
    assert secret not in "".join(traceback.format_exception(caught.value))
    assert hub.repos == {} and snapshot(directory) == before


def test_invalid_card_metadata_is_named(output, monkeypatch, no_stored_login):
    directory, _, _ = output
    (directory / "README.md").write_text("---\ntags: [1, 2]\n---\n# hand-written\n")
    with serve(monkeypatch, lfs=False) as hub, pytest.raises(LLMPruneError, match="metadata of README.md"):
        push(directory, REPO_ID)
    assert hub.files(REPO_ID) == {}


@pytest.mark.parametrize("repo_id", ["tiny", "a/b/c", "", "owner/with space", "/name", "owner/-name", "o/a..b"])
def test_bad_repo_id(output, repo_id):
    with pytest.raises(LLMPruneError, match="owner/name"):
        push(output[0], repo_id, token="hf_x")


def test_missing_token(output, monkeypatch, no_stored_login):
    with serve(monkeypatch) as hub:
        monkeypatch.delenv("HF_TOKEN")
        with pytest.raises(LLMPruneError, match="set HF_TOKEN.*hf auth login"):
            push(output[0], REPO_ID)
    assert hub.requests == []


def test_not_an_output_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(LLMPruneError, match="no report.json") as caught:
        push(tmp_path, REPO_ID, token="hf_x")
    assert "config.json" not in str(caught.value)
    with pytest.raises(LLMPruneError, match="not a directory"):
        push(tmp_path / "missing", REPO_ID, token="hf_x")


def test_unreachable_endpoint_fails_fast(output, monkeypatch, no_stored_login):
    """A refused connection is one attempt and an error at once: no retries, no back-off sleeps (a client
    default of retries with back-off would keep a user waiting for nothing)."""
    # A port held by a socket that is bound but never listens: a connection there is refused, and no other
    # process can take the port while the test runs.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        attempts, sleeps = [], []
        connect = socket.socket.connect

        def counted_connect(self, address):
            attempts.append(address)
            return connect(self, address)

        monkeypatch.setattr(socket.socket, "connect", counted_connect)
        monkeypatch.setattr(time, "sleep", sleeps.append)
        with pytest.raises(LLMPruneError, match=f"cannot reach the Hub at http://127.0.0.1:{port}"):
            push(output[0], REPO_ID, token="hf_x")
    assert attempts == [("127.0.0.1", port)] and sleeps == []


def test_offline_mode_is_named(output, monkeypatch, no_stored_login):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LLMPruneError, match="HF_HUB_OFFLINE"):
        push(output[0], REPO_ID, token="hf_x")
