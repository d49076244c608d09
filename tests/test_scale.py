"""Scale: streaming from safetensors shards, resume after SIGKILL, data-parallel calibration on gloo.
Every check compares against an independent run: the in-memory runner, the model's own forward, one process."""

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmprune import PruneConfig
from llmprune.errors import LLMPruneError
from llmprune.pruning.runner import capture_layer_calls, prune
from llmprune.scale import streaming
from llmprune.scale.distributed import DataParallel

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from make_random_model import make_config, write_random_model  # noqa: E402
import scale_worker  # noqa: E402

WORKER = Path(__file__).parent / "scale_worker.py"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_random_model(make_config("tiny", layers=5), tmp_path_factory.mktemp("src") / "model")


@pytest.fixture(scope="module")
def tied_source(tmp_path_factory):
    return write_random_model(make_config("tiny", layers=3, tie=True), tmp_path_factory.mktemp("tied") / "model")


def tensor_hashes(directory) -> dict[str, str]:
    """sha256 of every tensor in a safetensors directory, by name."""
    from safetensors import safe_open

    hashes = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                hashes[name] = hashlib.sha256(f.get_tensor(name).contiguous().view(torch.uint8).numpy()).hexdigest()
    return hashes


def weights(directory) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).state_dict()


def report_of(directory) -> dict:
    report = json.loads(Path(directory, "report.json").read_text())
    report.pop("seconds")
    if report.get("structure"):
        report["structure"].pop("seconds")
    return report


IMPORTANCE = {"channels": "flap", "heads": "wanda", "layers": ""}  # flap: bias compensation adds Llama's mlp_bias


def structured_job(structure: str, mode: str, source, out, **extra) -> dict:
    return {"mode": mode, "structure": structure, "method": IMPORTANCE[structure], "src": str(source),
            "out": str(out), **extra}


def check_shrunk(directory, structure: str) -> None:
    """The saved config states smaller shapes than the source's (5 layers, 128 channels, 4 heads)."""
    config = json.loads(Path(directory, "config.json").read_text())
    shapes = (config["num_hidden_layers"], config["intermediate_size"], config["num_attention_heads"])
    assert shapes == {"channels": (5, 64, 4), "heads": (5, 128, 2), "layers": (3, 128, 4)}[structure], shapes


@pytest.fixture
def most_layers_held(monkeypatch) -> list[int]:
    """[the most decoder layers a streamed prune held in memory at once], counted at each StreamedLayers.load."""
    load = streaming.StreamedLayers.load
    most = [0]

    def counting(self, i):
        layer = load(self, i)
        real = [l for l in self.streamed.layers if next(l.parameters()).device.type != "meta"]
        most[0] = max(most[0], len(real))
        return layer
    monkeypatch.setattr(streaming.StreamedLayers, "load", counting)
    return most


def reference(source, method, out) -> Path:
    scale_worker.run({"mode": "memory", "method": method, "src": str(source), "out": str(out)})
    return out


def test_random_model_loads_and_is_sharded_by_layer(tied_source):
    index = json.loads((tied_source / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 3 + 1  # one shard per decoder layer, one for the rest
    assert {index[n] for n in index if n.startswith("model.layers.1.")} == {"model-00002-of-00004.safetensors"}
    assert "lm_head.weight" not in index  # tied: stored once
    state = weights(tied_source)
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    assert 0.015 < float(state["model.layers.0.mlp.up_proj.weight"].std()) < 0.025


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("tied", [False, True])
def test_streamed_equals_in_memory_bit_for_bit(source, tied_source, tmp_path, method, tied, most_layers_held):
    """Same tensors, same report; and no more than one decoder layer is ever materialized."""
    src = tied_source if tied else source
    reference(src, method, tmp_path / "memory")
    scale_worker.run({"mode": "stream", "method": method, "src": str(src), "out": str(tmp_path / "stream")})
    assert most_layers_held[0] == 1
    assert (tmp_path / "stream" / "model.safetensors.index.json").is_file()
    memory, stream = weights(tmp_path / "memory"), weights(tmp_path / "stream")
    assert memory.keys() == stream.keys()
    for name in memory:
        assert torch.equal(memory[name], stream[name]), name
    assert report_of(tmp_path / "memory") == report_of(tmp_path / "stream")
    assert report_of(tmp_path / "stream")["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert not (tmp_path / ".stream.work").exists()


@pytest.mark.parametrize("structure", ["channels", "heads", "layers"])
def test_structured_streamed_equals_in_memory_bit_for_bit(source, tmp_path, structure, most_layers_held):
    """The streamed structured prune writes the same tensors (of the smaller shapes, under a config that states
    them, or from_pretrained would not load them) and the same structure record, one decoder layer at a time."""
    scale_worker.run(structured_job(structure, "memory", source, tmp_path / "memory"))
    scale_worker.run(structured_job(structure, "stream", source, tmp_path / "stream"))
    assert most_layers_held[0] == 1
    check_shrunk(tmp_path / "stream", structure)
    memory, stream = weights(tmp_path / "memory"), weights(tmp_path / "stream")
    assert memory.keys() == stream.keys()
    for name in memory:
        assert torch.equal(memory[name], stream[name]), name
    if structure == "channels":  # compensation's bias on down_proj, and the zero biases mlp_bias adds to gate, up
        assert stream["model.layers.0.mlp.down_proj.bias"].abs().sum() > 0
        assert torch.equal(stream["model.layers.4.mlp.up_proj.bias"], torch.zeros(64))
    record = report_of(tmp_path / "stream")["structure"]
    assert record == report_of(tmp_path / "memory")["structure"]
    assert record["kind"] == structure and record["units_kept"] < record["units_before"]
    assert not (tmp_path / ".stream.work").exists()


def test_offloaded_activations_live_in_a_file_and_change_nothing(source, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    from llmprune.inputs.models import decoder_layers

    ids = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(2))
    _, layers = decoder_layers(model)
    kept = capture_layer_calls(model, layers, ids, 4, torch.device("cpu"), False)
    filed = capture_layer_calls(model, layers, ids, 4, torch.device("cpu"), False, offload=tmp_path / "act")
    assert filed.hidden.untyped_storage().filename is not None and kept.hidden.untyped_storage().filename is None
    assert torch.equal(kept.hidden, filed.hidden)
    config = PruneConfig(method="sparsegpt", batch_size=4)
    calibration = scale_worker.CALIBRATION
    with streaming.streamed_prune(source, tmp_path / "a", calibration, config, progress=False) as (plain, staging):
        assert not (tmp_path / "a").exists()  # the output is in place only once the block ends
        assert streaming.streamed_perplexity(staging, ids, "cpu", progress=False) > 1
    assert (tmp_path / "a" / "model.safetensors.index.json").is_file()
    offloaded = streaming.prune_streamed(source, tmp_path / "b", calibration, config, progress=False,
                                         offload_activations=tmp_path / "act")
    assert plain.layers == offloaded.layers
    assert tensor_hashes(tmp_path / "a") == tensor_hashes(tmp_path / "b")


def test_streamed_perplexity_matches_the_models_forward(source):
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    windows = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(1))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(windows).logits
    expected = float(F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten()).exp())
    got = streaming.streamed_perplexity(source, windows, "cpu", batch_size=2, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)


def test_formats_that_cannot_be_streamed_fail_in_one_line(source, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((source / "config.json").read_text())
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    for path, words in [(pickled, "pickled"), (tmp_path / "model.gguf", "single file"), (tmp_path, "config.json")]:
        with pytest.raises(LLMPruneError, match=words) as err:
            streaming.prune_streamed(path, tmp_path / "out", scale_worker.CALIBRATION, PruneConfig(), progress=False)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


CASES = [(method, mode) for method in ("wanda", "sparsegpt") for mode in ("memory", "stream")]


@pytest.mark.parametrize("method,mode", CASES)
def test_killed_run_resumes_bit_identical(source, tmp_path, method, mode):
    rng = random.Random(f"{method}{mode}")
    kill = f"{rng.randrange(1, 5)}:{rng.choice(['load', 'save'])}"  # layer 0 must finish: something to resume
    job = {"mode": mode, "method": method, "src": str(source), "out": str(tmp_path / "out"),
           "work": str(tmp_path / "work")}
    child = subprocess.run([sys.executable, str(WORKER), json.dumps(job | {"kill": kill})], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, (kill, child.stderr[-2000:])
    assert not (tmp_path / "out").exists()
    done = json.loads((tmp_path / "work" / "state.json").read_text())["done"]
    assert done == int(kill.split(":")[0]) - 1, kill
    scale_worker.run(job | {"resume": True})
    reference(source, method, tmp_path / "uninterrupted") if mode == "memory" else scale_worker.run(
        job | {"out": str(tmp_path / "uninterrupted"), "work": str(tmp_path / "work2")})
    assert tensor_hashes(tmp_path / "out") == tensor_hashes(tmp_path / "uninterrupted")
    assert report_of(tmp_path / "out") == report_of(tmp_path / "uninterrupted")


@pytest.mark.parametrize("structure,mode", [("channels", "memory"), ("channels", "stream"), ("heads", "stream"),
                                            ("layers", "memory"), ("layers", "stream")])
def test_killed_structured_run_resumes_bit_identical(source, tmp_path, structure, mode):
    """Killed after some layers were cut (and written), resumed: the finished layers are cut again from the
    record before their weights are read, and the output equals an uninterrupted run's."""
    rng = random.Random(f"{structure}{mode}")
    kill = f"{rng.randrange(1, 5)}:{rng.choice(['load', 'save'])}"
    job = structured_job(structure, mode, source, tmp_path / "out", work=str(tmp_path / "work"))
    child = subprocess.run([sys.executable, str(WORKER), json.dumps(job | {"kill": kill})], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, (kill, child.stderr[-2000:])
    assert not (tmp_path / "out").exists()
    assert json.loads((tmp_path / "work" / "state.json").read_text())["done"] == int(kill.split(":")[0]) - 1, kill
    scale_worker.run(job | {"resume": True})
    scale_worker.run(structured_job(structure, mode, source, tmp_path / "uninterrupted"))
    check_shrunk(tmp_path / "out", structure)
    assert tensor_hashes(tmp_path / "out") == tensor_hashes(tmp_path / "uninterrupted")
    assert report_of(tmp_path / "out") == report_of(tmp_path / "uninterrupted")


def test_resume_refuses_nothing_and_other_settings(source, tmp_path):
    job = {"mode": "stream", "method": "wanda", "src": str(source), "out": str(tmp_path / "out"),
           "work": str(tmp_path / "work")}
    with pytest.raises(LLMPruneError, match="no interrupted run"):
        scale_worker.run(job | {"resume": True})
    child = subprocess.run([sys.executable, str(WORKER), json.dumps(job | {"kill": "2:load"})], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stderr[-2000:]
    with pytest.raises(LLMPruneError, match=r"other settings \(method, method_config\)"):  # its knobs differ too
        scale_worker.run(job | {"resume": True, "method": "sparsegpt"})


def launch(job: dict, world: int = 2, timeout: int = 300):
    """Start `world` ranks of scale_worker on gloo, as torchrun would set them up; returns (rc, stderr) each.
    Like torchrun's agent, this process hosts the rendezvous store, bound to port 0 and held until the ranks end
    (a port found free and then handed on could be taken in between); every rank joins it as a client."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    ranks = []
    for rank in range(world):
        env = os.environ | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
                            "TORCHELASTIC_USE_AGENT_STORE": "True"}
        ranks.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(job)], cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    results = [(p.wait(timeout=timeout), p.stderr.read()) for p in ranks]
    del store
    return results


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_two_gloo_ranks_equal_one_process(source, tmp_path, mode):
    """Rank 0 and 1 each see 4 of the 8 windows (one batch each): masks identical, weights within float
    summation tolerance (here the sums are even bit-identical), one output written by rank 0."""
    results = launch({"mode": mode, "method": "wanda,sparsegpt", "src": str(source),
                      "out": str(tmp_path / "{method}-parallel")})
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    for method in ("wanda", "sparsegpt"):
        out = tmp_path / f"{method}-parallel"
        single = weights(reference(source, method, tmp_path / f"{method}-single"))
        parallel = weights(out)
        for name in single:
            assert torch.equal(single[name] == 0, parallel[name] == 0), name
            torch.testing.assert_close(parallel[name], single[name], rtol=1e-5, atol=1e-6)
        assert report_of(out)["layers"] == report_of(tmp_path / f"{method}-single")["layers"]


@pytest.mark.parametrize("structure,mode", [("channels", "memory"), ("channels", "stream"), ("layers", "memory")])
def test_two_gloo_ranks_equal_one_process_structured(source, tmp_path, structure, mode):
    """A structured prune on 2 ranks of 4 windows each: the statistics summed over the ranks choose the same units
    (or layers) as one process on all 8, and the weights (the compensation bias from the summed mean) agree."""
    results = launch(structured_job(structure, mode, source, tmp_path / "parallel"))
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    scale_worker.run(structured_job(structure, "memory", source, tmp_path / "single"))
    single, parallel = weights(tmp_path / "single"), weights(tmp_path / "parallel")
    assert single.keys() == parallel.keys()
    for name in single:
        torch.testing.assert_close(parallel[name], single[name], rtol=1e-5, atol=1e-6)
    one, two = report_of(tmp_path / "single")["structure"], report_of(tmp_path / "parallel")["structure"]
    assert one["layers"] == two["layers"] and one["removed_layers"] == two["removed_layers"]
    if structure == "layers":
        assert two["layer_scores"] == pytest.approx(one["layer_scores"], rel=1e-9)
    check_shrunk(tmp_path / "parallel", structure)


def test_a_dying_rank_fails_the_others_in_one_line(source, tmp_path):
    results = launch({"mode": "memory", "method": "wanda", "src": str(source), "out": str(tmp_path / "out"),
                      "die_at": 2}, timeout=200)
    rc0, err0 = results[0]
    assert results[1][0] == 3
    assert rc0 == 2, err0[-2000:]
    assert "another rank stopped answering" in err0.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_more_ranks_than_windows_is_refused():
    parallel = object.__new__(DataParallel)
    parallel.rank, parallel.world = 0, 9
    with pytest.raises(LLMPruneError, match="9 ranks share 8 calibration windows"):
        parallel.share(scale_worker.CALIBRATION)
    parallel.world = 3
    shares = [DataParallel.share(type("P", (), {"rank": r, "world": 3})(), scale_worker.CALIBRATION) for r in range(3)]
    assert torch.equal(torch.cat(shares), scale_worker.CALIBRATION)


def test_streamed_run_equals_the_in_memory_run(tiny_dir, tmp_path):
    """pipeline.run with --stream (scale/pipeline.py) against the in-memory run, for a structured prune: the same
    saved tensors and structure record, the same perplexities (measured layer by layer from the folders), and a
    report.json that reads back as the report returned."""
    from llmprune import pipeline
    from llmprune.config import RunConfig
    from llmprune.report import Report

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97}" for i in range(6000)))

    def run(name, stream):
        return pipeline.run(RunConfig(model=str(tiny_dir), stream=stream, output=str(tmp_path / name),
                                      prune=PruneConfig(structure="channels", method="flap", sparsity=0.5, round_to=8,
                                                        nsamples=4, seqlen=16, batch_size=2),
                                      calib=f"file:{text}", eval=f"file:{text}", eval_windows=3), progress=False)

    memory, stream = run("memory", False), run("stream", True)
    assert stream.scale["stream"] and not memory.scale["stream"]
    without_seconds = lambda record: {k: v for k, v in record.to_dict().items() if k != "seconds"}
    assert without_seconds(stream.structure) == without_seconds(memory.structure)
    assert stream.structure.units_kept == 64 < stream.structure.units_before
    assert stream.perplexity.dense == pytest.approx(memory.perplexity.dense, rel=1e-5)
    assert stream.perplexity.pruned == pytest.approx(memory.perplexity.pruned, rel=1e-5)
    assert stream.perplexity.pruned != pytest.approx(stream.perplexity.dense, rel=1e-3)
    saved_memory, saved_stream = weights(tmp_path / "memory"), weights(tmp_path / "stream")
    assert saved_memory.keys() == saved_stream.keys()
    for name in saved_memory:
        assert torch.equal(saved_memory[name], saved_stream[name]), name
    assert Report.load(tmp_path / "stream" / "report.json").structure == stream.structure
    assert "llmprune_config.json" in {f.name for f in (tmp_path / "stream").iterdir()}


# ---------------------------------------------------------------- mixtures of experts

@pytest.fixture(scope="module")
def moe_sources(tmp_path_factory):
    """Tiny MoE checkpoints as transformers 5 saves them (per-expert tensors, Mixtral's block_sparse_moe.experts.E.w1
    names), and a Qwen3-MoE stored in the fused form its modules hold (experts.gate_up_proj)."""
    from safetensors.torch import save_file

    from moe_models import tiny_moe

    root = tmp_path_factory.mktemp("moe")
    sources = {}
    for family in ("mixtral", "qwen3_moe"):
        tiny_moe(family).save_pretrained(root / family)
        sources[family] = root / family
    fused = tiny_moe("qwen3_moe", seed=1)
    fused.config.save_pretrained(root / "fused")
    save_file({k: v.contiguous() for k, v in fused.state_dict().items()}, root / "fused" / "model.safetensors",
              metadata={"format": "pt"})
    sources["fused"] = root / "fused"
    return sources


def stored(directory) -> set[str]:
    return set(tensor_hashes(directory))


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "fused"])
def test_moe_streamed_equals_in_memory_bit_for_bit(moe_sources, tmp_path, family, most_layers_held):
    """A streamed Wanda prune of an MoE reads its stored tensors into the fused experts by transformers' own rules
    and writes them back in the stored form: the same tensors as the in-memory prune, one layer held at a time."""
    src = moe_sources[family]
    reference(src, "wanda", tmp_path / "memory")
    scale_worker.run({"mode": "stream", "method": "wanda", "src": str(src), "out": str(tmp_path / "stream")})
    assert most_layers_held[0] == 1
    assert stored(tmp_path / "stream") == stored(src)  # the source's own form, per expert or fused
    if family != "fused":  # save_pretrained writes the per-expert form too: the files agree byte for byte
        assert any(".experts.3." in name for name in stored(src))
        assert tensor_hashes(tmp_path / "stream") == tensor_hashes(tmp_path / "memory")
    else:
        assert "model.layers.1.mlp.experts.gate_up_proj" in stored(src)
    memory, stream = weights(tmp_path / "memory"), weights(tmp_path / "stream")  # stock from_pretrained
    assert memory.keys() == stream.keys()
    for name in memory:
        assert torch.equal(memory[name], stream[name]), name
    experts = stream["model.layers.1.mlp.experts.down_proj"]
    assert float((experts == 0).float().mean()) == pytest.approx(0.5, abs=0.01)  # the experts were pruned
    report = report_of(tmp_path / "stream")
    assert report == report_of(tmp_path / "memory")
    assert report["coverage"]["kinds"]["experts"]["pruned"] > 0 and not report["coverage"]["unaccounted"]


@pytest.mark.parametrize("mode,kill", [("stream", "1:save"), ("stream", "1:load"), ("memory", "1:save")])
def test_killed_moe_run_resumes_bit_identical(moe_sources, tmp_path, mode, kill):
    """SIGKILL in the second layer of a two-layer MoE, then --resume: the output and report (expert token counts
    included) equal an uninterrupted run's."""
    src = moe_sources["qwen3_moe"]
    job = {"mode": mode, "method": "wanda", "src": str(src), "out": str(tmp_path / "out"),
           "work": str(tmp_path / "work")}
    child = subprocess.run([sys.executable, str(WORKER), json.dumps(job | {"kill": kill})], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, (kill, child.stderr[-2000:])
    assert json.loads((tmp_path / "work" / "state.json").read_text())["done"] == 0
    scale_worker.run(job | {"resume": True})
    scale_worker.run({"mode": mode, "method": "wanda", "src": str(src), "out": str(tmp_path / "uninterrupted")})
    assert tensor_hashes(tmp_path / "out") == tensor_hashes(tmp_path / "uninterrupted")
    resumed = report_of(tmp_path / "out")
    assert resumed == report_of(tmp_path / "uninterrupted")
    assert {f"model.layers.{i}.mlp.experts" for i in (0, 1)} <= set(resumed["moe"]["blocks"])  # layer 0's kept


def test_data_parallel_moe_is_refused_in_one_line():
    """torchrun does not reach the experts yet: refused before any calibration pass, in one line (the ranks are
    never contacted, so a stand-in suffices)."""
    from moe_models import moe_tokens, tiny_moe

    model = tiny_moe("qwen3_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LLMPruneError, match="one process") as err:
        prune(model, moe_tokens(), PruneConfig(method="wanda"), progress=False, parallel=object())
    assert "\n" not in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_safetensors_written_tensor_by_tensor_read_back_by_safetensors(tmp_path):
    """write_safetensors (no whole-file copy in memory) against safetensors' own reader: every dtype the
    checkpoints hold, a scalar, an empty tensor, a non-contiguous view, and the metadata."""
    from safetensors import safe_open

    from llmprune.scale.checkpoint import write_safetensors

    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    tensors = {"b.bf16": base.to(torch.bfloat16), "a.f32": base, "f16": base.half()[:, 1:4], "f64": base.double(),
               "i64": torch.arange(7), "i8": torch.tensor([-3, 4], dtype=torch.int8), "mask": base > 0,
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3), "t": base.t()}
    write_safetensors(tensors, tmp_path / "x.safetensors", {"format": "pt"})
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(tensors)
        for name, tensor in tensors.items():
            read = f.get_tensor(name)
            assert read.dtype == tensor.dtype and read.shape == tensor.shape and torch.equal(read, tensor), name


def test_copied_tensor_in_blocks_equals_safetensors_own_read(tmp_path):
    """copy_safetensor (a few rows at a time, floating point converted) against safetensors' reader of the source:
    bf16 to float32 over blocks that do not divide the rows, an integer tensor left as it is, a scalar."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from llmprune.scale.checkpoint import copy_safetensor

    g = torch.Generator().manual_seed(0)
    source = {"embed": torch.randn(37, 6, generator=g).to(torch.bfloat16), "ids": torch.arange(10).reshape(5, 2),
              "scale": torch.tensor(0.5, dtype=torch.float16)}
    save_file(source, tmp_path / "src.safetensors")
    for name, tensor in source.items():
        size = copy_safetensor(tmp_path / "src.safetensors", name, tmp_path / f"{name}.safetensors", torch.float32,
                               {"format": "pt"}, chunk_bytes=5 * 6 * 4)  # 5 rows a block: 8 blocks, the last of 2
        with safe_open(tmp_path / f"{name}.safetensors", "pt") as f:
            assert list(f.keys()) == [name] and f.metadata() == {"format": "pt"}
            copied = f.get_tensor(name)
        expected = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
        assert copied.dtype == expected.dtype and torch.equal(copied, expected), name
        assert size == expected.numel() * expected.element_size()


def test_streamed_capture_reads_only_the_embedding_rows_it_uses(source, monkeypatch):
    """Within input_rows the input embedding gives the stored table's rows (read here whole, by safetensors) from a
    table of only the distinct tokens given; outside it the parameter is the whole table's, still unread."""
    from safetensors import safe_open

    streamed = streaming.StreamedModel(source)
    embedding = streamed.model.get_input_embeddings()
    name = streamed.embedding_name
    with safe_open(streamed.files[name], "pt") as f:
        table = f.get_tensor(name)
    ids = torch.tensor([[5, 99, 5, 3], [127, 3, 0, 64]])
    embedding.padding_idx = 127  # as Qwen2's: an index of the whole table, past the end of the rows kept
    sizes, lookup = [], torch.nn.functional.embedding
    monkeypatch.setattr(torch.nn.functional, "embedding", lambda ids, weight, *a, **k: sizes.append(weight.shape[0])
                        or lookup(ids, weight, *a, **k))
    with streamed.input_rows(ids):
        assert torch.equal(embedding(ids), table[ids].to(torch.float32))
    assert sizes == [6]  # 0, 3, 5, 64, 99, 127
    assert embedding.weight.device.type == "meta" and embedding.weight.shape == table.shape
    with pytest.raises(LLMPruneError, match="outside the model's 128-word embedding"), streamed.input_rows(ids + 100):
        pass


def test_random_moe_is_written_per_expert_and_loads_as_its_fused_form(tmp_path):
    """make_random_model's MoE shape: one shard per layer under the names save_pretrained writes (per expert);
    stock from_pretrained loads it to the same weights as the fused form written with the same seed."""
    config = make_config("tiny-moe", layers=2)
    per_expert = write_random_model(config, tmp_path / "per-expert", "bfloat16", seed=3)
    fused = write_random_model(make_config("tiny-moe", layers=2), tmp_path / "fused", "bfloat16", seed=3, fused=True)
    index = json.loads((per_expert / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 2 + 1
    assert {index[n] for n in index if n.startswith("model.layers.1.")} == {"model-00002-of-00003.safetensors"}
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in index and not any("gate_up_proj" in n for n in index)
    assert "model.layers.1.mlp.experts.gate_up_proj" in stored(fused)
    a, b = weights(per_expert), weights(fused)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    experts = a["model.layers.1.mlp.experts.gate_up_proj"]
    assert experts.shape == (8, 64, 64) and 0.015 < float(experts.std()) < 0.025


def test_streamed_moe_run_equals_the_in_memory_run(tiny_dir, tmp_path):
    """pipeline.run --stream on a tiny Mixtral directory (per-expert shards, a tokenizer): the same saved tensors,
    the same expert token counts, and the same perplexities, the streamed ones measured layer by layer from the
    per-expert shards."""
    from llmprune import pipeline
    from llmprune.config import RunConfig
    from moe_models import save_tiny_moe_dir

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97}" for i in range(6000)))
    source = save_tiny_moe_dir(tmp_path / "moe", "mixtral", tiny_dir)

    def run(name, stream):
        return pipeline.run(RunConfig(model=str(source), stream=stream, output=str(tmp_path / name),
                                      prune=PruneConfig(method="wanda", nsamples=4, seqlen=16, batch_size=2,
                                                        min_expert_tokens=4),
                                      calib=f"file:{text}", eval=f"file:{text}", eval_windows=3), progress=False)

    memory, stream = run("memory", False), run("stream", True)
    assert stream.scale["stream"] and not memory.scale["stream"]
    assert stream.moe == memory.moe and stream.coverage == memory.coverage
    assert stream.perplexity.dense == pytest.approx(memory.perplexity.dense, rel=1e-5)
    assert stream.perplexity.pruned == pytest.approx(memory.perplexity.pruned, rel=1e-5)
    assert stream.perplexity.pruned != pytest.approx(stream.perplexity.dense, rel=1e-3)
    assert tensor_hashes(tmp_path / "stream") == tensor_hashes(tmp_path / "memory")


def test_peak_rss_of_a_child_is_its_own_not_its_parents():
    """A prune in a fresh process (bench_scale's children) reports its own peak: ru_maxrss would carry over the
    high-water mark of the parent's image, here a 400 MB buffer the parent holds when it spawns the child."""
    import subprocess
    import sys

    from llmprune.runtime import peak_rss_bytes

    held = bytearray(400 * 2**20)
    held[:: 4096] = b"\x01" * len(held[:: 4096])  # touch every page: resident
    assert peak_rss_bytes() > 400 * 2**20
    child = subprocess.run([sys.executable, "-c", "from llmprune.runtime import peak_rss_bytes; print(peak_rss_bytes())"],
                           capture_output=True, text=True, check=True)
    assert int(child.stdout) < 300 * 2**20, int(child.stdout) / 2**20
    del held
