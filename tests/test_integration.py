"""The pieces wired together through pipeline.run and the CLI, as a user runs them, on a tiny local model:
structured pruning, distillation and full fine-tuning, schedules, GGUF output, scan allocation, --config."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmprune import pipeline
from llmprune.cli import main
from llmprune.config import PruneConfig, RecoverConfig, RunConfig
from llmprune.report import Report

FAST = {"nsamples": 4, "seqlen": 32}


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(f"word{(i * 7) % 97} and{i % 13}" for i in range(12000)))
    return f"file:{path}"


def config(tiny_dir, text, tmp_path, prune=None, **run):
    return RunConfig(model=str(tiny_dir), prune=prune or PruneConfig(**FAST), calib=text, eval=text, eval_windows=2,
                     output=str(tmp_path / "out"), **run)


def weights(folder) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(folder)
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_structured_channels_saves_a_smaller_ordinary_model(tiny_dir, text, tmp_path):
    report = pipeline.run(config(tiny_dir, text, tmp_path, PruneConfig(structure="channels", method="flap",
                                                                       sparsity=0.25, round_to=8, **FAST)),
                          progress=False)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # stock transformers, no llmprune code
    dense = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert saved.config.intermediate_size == 96 < dense.config.intermediate_size == 128
    assert sum(p.numel() for p in saved.parameters()) == report.structure.params_after
    assert report.structure.params_after < report.structure.params_before
    assert Report.load(tmp_path / "out" / "report.json").structure.config_changes["intermediate_size"] == 96
    assert "smaller" in (tmp_path / "out" / "README.md").read_text()


def test_full_distillation_keeps_every_zero(tiny_dir, text, tmp_path):
    rc = RecoverConfig(loss="distill", params="full", steps=3, batch=2, seqlen=32, val_windows=2, eval_every=1,
                       distill_topk=8)
    report = pipeline.run(config(tiny_dir, text, tmp_path, recover="distill", recovery=rc), progress=False)
    assert report.recovery["params"] == "full" and report.recovery["loss"] == "distill"
    assert [point["step"] for point in report.recovery["curve"]] == [0, 1, 2, 3]
    saved = weights(tmp_path / "out")
    for record in report.layers:  # every pruned linear still holds exactly half zeros after training
        assert (saved[record.name + ".weight"] == 0).float().mean().item() == pytest.approx(0.5)
    assert report.recovery["achieved_sparsity"] == report.achieved_sparsity


def test_schedule_prunes_in_stages_and_recovers_between(tiny_dir, text, tmp_path):
    rc = RecoverConfig(steps=4, batch=1, seqlen=32, val_windows=2)
    report = pipeline.run(config(tiny_dir, text, tmp_path, PruneConfig(sparsity=0.5, **FAST), schedule="0.3,0.5",
                                 recover="lm", recovery=rc), progress=False)
    assert [stage["sparsity"] for stage in report.recovery["schedule"]] == [0.3, 0.5]
    assert [stage["steps"] for stage in report.recovery["schedule"]] == [2, 2]
    assert report.achieved_sparsity == pytest.approx(0.5, abs=1e-3)


def test_schedule_must_end_at_the_target(tiny_dir, text, tmp_path):
    from llmprune.errors import LLMPruneError

    with pytest.raises(LLMPruneError, match="ends at 0.4 but --sparsity is 0.5"):
        config(tiny_dir, text, tmp_path, PruneConfig(sparsity=0.5, **FAST), schedule="0.3,0.4")


def test_save_format_gguf_writes_the_file_into_the_output(tiny_dir, text, tmp_path):
    report = pipeline.run(config(tiny_dir, text, tmp_path, save_format="gguf", gguf_outtype="f32"), progress=False)
    gguf = tmp_path / "out" / "out-f32.gguf"
    assert gguf.is_file() and gguf.stat().st_size == report.gguf["bytes"] > 0
    from gguf import GGUFReader

    names = {tensor.name for tensor in GGUFReader(gguf).tensors}
    assert "blk.0.ffn_down.weight" in names and "token_embd.weight" in names


def test_config_file_reruns_exactly_and_flags_override_it(tiny_dir, text, tmp_path, capsys):
    args = ["--model", str(tiny_dir), "--calib", text, "--eval", text, "--nsamples", "4", "--seqlen", "32",
            "--eval-windows", "2", "--method", "sparsegpt", "--quiet"]
    assert main(args + ["--output", str(tmp_path / "a")]) == 0
    saved = tmp_path / "a" / "llmprune_config.json"
    assert main(["--config", str(saved), "--output", str(tmp_path / "b"), "--quiet"]) == 0
    first, second = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert main(["--config", str(saved), "--sparsity", "0.6", "--output", str(tmp_path / "c"), "--quiet"]) == 0
    rerun = json.loads((tmp_path / "c" / "llmprune_config.json").read_text())
    assert rerun["prune"]["sparsity"] == 0.6 and rerun["prune"]["method"] == "sparsegpt"
    (tmp_path / "bad.yaml").write_text("prune:\n  methd: wanda\n")
    assert main(["--config", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown setting(s) methd" in capsys.readouterr().err


def test_scan_then_allocate_from_it(tiny_dir, text, tmp_path, capsys):
    assert main(["scan", "--model", str(tiny_dir), "--calib", text, "--nsamples", "4", "--seqlen", "32",
                 "--sparsities", "0.4,0.6,0.8", "--output", str(tmp_path / "scan"), "--quiet"]) == 0
    table = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert len(table["units"]) == 3 and (tmp_path / "scan" / "scan.png").stat().st_size > 0
    report = pipeline.run(config(tiny_dir, text, tmp_path, PruneConfig(
        sparsity=0.6, allocation=f"scan:{tmp_path / 'scan' / 'scan.json'}",
        allocation_config={"scan_max_shift": 0.2}, **FAST)),
        progress=False)
    sizes = [sum(r.numel for r in report.layers if r.layer == i) for i in range(3)]
    weighted = sum(s * n for s, n in zip(report.layer_sparsity, sizes)) / sum(sizes)
    assert weighted == pytest.approx(0.6, abs=1e-9) and len(set(report.layer_sparsity)) > 1


def test_checkpointed_run_leaves_no_work_folder(tiny_dir, text, tmp_path):
    pipeline.run(config(tiny_dir, text, tmp_path, checkpoint=True), progress=False)
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
