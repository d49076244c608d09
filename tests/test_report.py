"""`llmprune report`: report.md and PNG plots comparing run directories (report.json only, no model)."""

import json
from pathlib import Path

import pytest

from llmprune.errors import LLMPruneError
from llmprune.report import Report
from llmprune.output.plots import _decoder_layer_sparsity, write_report

PNG_MAGIC = b"\x89PNG"
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Two decoder layers of three linears; the MLP matrix is 4x the size of each attention one.
SHAPES = {"self_attn.q_proj": [64, 64], "self_attn.o_proj": [64, 64], "mlp.up_proj": [256, 64]}


def zero_shot(arc_easy: float, boolq: float) -> dict:
    return {"tasks": {"arc_easy": {"acc": arc_easy, "acc_stderr": 0.05, "acc_norm": arc_easy - 0.02},
                      "boolq": {"acc": boolq, "acc_stderr": 0.05}},
            "mean_acc": (arc_easy + boolq) / 2, "limit": None}


def make_run(directory: Path, method: str, layer_targets: list[float], pattern: str = "unstructured",
             allocation: str = "uniform", ppl: dict | None = None, **extra) -> Path:
    """A run directory holding only a report.json whose numbers agree with each other."""
    layers = [{"name": f"model.layers.{i}.{name}", "shape": shape, "sparsity": target,
               "achieved_sparsity": target + (0.004 if name == "mlp.up_proj" else -0.002)}
              for i, target in enumerate(layer_targets) for name, shape in SHAPES.items()]
    numel = sum(layer["shape"][0] * layer["shape"][1] for layer in layers)
    achieved = sum(layer["achieved_sparsity"] * layer["shape"][0] * layer["shape"][1] for layer in layers) / numel
    report = {
        "llmprune_version": "0.1.0", "model": "llama", "base_model": BASE_MODEL, "architecture": "LlamaForCausalLM",
        "method": method, "sparsity": sum(layer_targets) / len(layer_targets), "pattern": pattern,
        "allocation": allocation, "calibration": {"source": "wiki", "nsamples": 32, "seqlen": 512, "seed": 0},
        "achieved_sparsity": achieved, "layer_sparsity": layer_targets, "layers": layers,
        "perplexity": None if ppl is None else {"dataset": "wiki", "seqlen": 512, "windows": 40, **ppl},
        "seconds": {"load": 20.1, "calibrate": 3.2, "prune": 70.0, "evaluate": 100.0, "total": 200.0},
        "peak_rss_bytes": 1_400_000_000, **extra,
    }
    directory.mkdir(parents=True)
    (directory / "report.json").write_text(json.dumps(report))
    return directory


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    wanda50 = make_run(tmp_path / "wanda-50", "wanda", [0.5, 0.5], ppl={"dense": 18.5, "pruned": 40.1})
    wanda70 = make_run(tmp_path / "wanda-70", "wanda", [0.7, 0.7], ppl={"dense": 18.5, "pruned": 212.34},
                       seconds={"prune": 71.25})
    sparsegpt = make_run(tmp_path / "sparsegpt-24", "sparsegpt", [0.5, 0.5], pattern="2:4",
                         ppl={"dense": 18.5, "pruned": 35.67, "recovered": 28.9},
                         zero_shot=zero_shot(0.41, 0.58), zero_shot_dense=zero_shot(0.55, 0.62))
    # Pruned with --eval none, then measured by `llmprune eval`: eval.json fills perplexity and zero-shot.
    owl = make_run(tmp_path / "wanda-70-owl", "wanda", [0.65, 0.75], allocation="owl")
    (owl / "eval.json").write_text(json.dumps({
        "model": str(owl), "baseline": "llama",
        "perplexity": {"wiki": {"model": 97.5, "baseline": 18.5, "seqlen": 512, "windows": 40}},
        "zero_shot": {"model": zero_shot(0.37, 0.52), "baseline": zero_shot(0.55, 0.62)},
    }))
    return [wanda50, wanda70, sparsegpt, owl]


def test_report_tables_and_plots(runs, tmp_path):
    path = write_report(runs, tmp_path / "report")
    assert path == tmp_path / "report" / "report.md"
    text = path.read_text(encoding="utf-8")
    for name in ["wanda-50", "wanda-70", "sparsegpt-24", "wanda-70-owl"]:
        assert f"| {name} |" in text
    assert "| wanda-50 | wanda | unstructured | uniform | 50.0% | 50.20% | 18.50 → 40.10 | n/a | 70.0 |" in text
    assert "18.50 → 212.34" in text and "| 71.2 |" in text
    assert "| sparsegpt-24 | sparsegpt | 2:4 | uniform |" in text
    assert "18.50 → 35.67 → 28.90" in text and "0.585 → 0.495" in text
    assert "18.50 → 97.50" in text and "0.585 → 0.445" in text  # from eval.json
    assert "Perplexity measured on wiki, 40 windows of 512 tokens." in text
    # Per-task table: the shared dense result once, then each run with zero-shot numbers.
    assert "| model | arc_easy | boolq | mean |" in text
    assert text.count(f"| dense ({BASE_MODEL.rsplit('/', 1)[-1]}) | 0.550 | 0.620 | 0.585 |") == 1
    assert "| sparsegpt-24 | 0.410 | 0.580 | 0.495 |" in text
    assert "| wanda-70-owl | 0.370 | 0.520 | 0.445 |" in text
    for png in ["layer_sparsity.png", "ppl_vs_sparsity.png", "accuracy_vs_sparsity.png"]:
        assert f"]({png})" in text
        data = (path.parent / png).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # staging removed


def test_report_keeps_other_files_and_drops_plots_without_data(runs, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "accuracy_vs_sparsity.png").write_bytes(b"stale")  # from an earlier report that had zero-shot runs
    text = write_report(runs[:2], out).read_text(encoding="utf-8")
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "accuracy_vs_sparsity.png").exists()
    assert "accuracy_vs_sparsity.png" not in text and "Zero-shot" not in text
    assert (out / "ppl_vs_sparsity.png").read_bytes().startswith(PNG_MAGIC)


def test_decoder_layer_sparsity_weights_linears_by_size(tmp_path):
    run = make_run(tmp_path / "run", "wanda", [0.5, 0.7])
    report = Report.load(run / "report.json")
    # q and o (4096 each) at target - 0.002, up (16384) at target + 0.004: (2 * -0.002 + 4 * 0.004) / 6 = +0.002.
    assert _decoder_layer_sparsity(report) == pytest.approx({0: 0.502, 1: 0.702})


def test_report_errors_name_the_bad_directory(runs, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(LLMPruneError, match="nope does not exist"):
        write_report([runs[0], missing], tmp_path / "report")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LLMPruneError, match="empty has no report.json"):
        write_report([empty], tmp_path / "report")
    with pytest.raises(LLMPruneError, match="no run given"):
        write_report([], tmp_path / "report")
    assert not (tmp_path / "report").exists()


# The structure record as report.json held it before it was typed (no "version"; keys of one structure only).
UNTYPED_CHANNELS = {
    "kind": "channels", "method": "flap", "sparsity": 0.5, "unit": "channels", "achieved_sparsity": 0.5,
    "units_before": 128, "units_kept": 64, "layers": [{"index": 0, "kept": 64, "removed": [1, 3]}],
    "bias_compensation": True, "bias_compensation_note": None, "round_to": 8, "params_before": 2_000_000,
    "params_after": 1_500_000, "params_removed_fraction": 0.25, "decoder_params_before": 1_000_000,
    "decoder_params_after": 500_000, "decoder_params_removed_fraction": 0.5,
    "config_changes": {"intermediate_size": 64, "mlp_bias": True}, "seconds": {"prune": 1.0}}


def test_structure_record_reads_untyped_reports_and_everything_shows_it(tmp_path):
    from llmprune.output.publish import model_card
    from llmprune.output.summary import format_summary
    from llmprune.report import STRUCTURE_VERSION, StructureLayer, StructureRecord

    run = tmp_path / "channels"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({
        "schema_version": 2, "model": "llama", "model_name": "SmolLM2-135M-Instruct", "base_model": BASE_MODEL,
        "architecture": "LlamaForCausalLM", "method": "flap", "sparsity": 0.5, "pattern": "structured",
        "allocation": "uniform", "achieved_sparsity": 0.0, "layers": [], "structure": UNTYPED_CHANNELS,
        "perplexity": {"dataset": "wiki", "seqlen": 512, "windows": 40, "dense": 18.5, "pruned": 30.25},
        "seconds": {"prune": 1.0}}))
    report = Report.load(run / "report.json")
    record = report.structure
    assert isinstance(record, StructureRecord) and record.version == STRUCTURE_VERSION
    assert record.layers == [StructureLayer(0, 64, [1, 3])] and record.removed_layers is None
    assert record.kept_layers() is None
    summary = format_summary(report)
    assert "removed 64 of 128 MLP channels per layer (50.0%; asked 50.0%, widths rounded to multiples of 8)" in summary
    assert "parameters 2.00M -> 1.50M (25.0% fewer; decoder layers 50.0%)" in summary
    assert "config: intermediate_size=64, mlp_bias=True" in summary
    card = model_card(report)
    assert "25% smaller (channels, flap)" in card and "64 of every 128 MLP channels removed" in card
    assert "`mlp_bias=True`" in card and "with bias compensation" in card
    saved = json.loads(report.to_json())["structure"]  # written back: the old keys, and the version
    assert {k: saved[k] for k in UNTYPED_CHANNELS} == UNTYPED_CHANNELS and saved["version"] == STRUCTURE_VERSION
    assert Report.from_dict(json.loads(report.to_json())) == report
    table = write_report([run], tmp_path / "report").read_text(encoding="utf-8")  # `llmprune report`
    assert "| channels | flap | channels (structured) | uniform | 50.0% | 50.00% | 18.50 → 30.25 |" in table

    layers = StructureRecord.from_dict(UNTYPED_CHANNELS | {"kind": "layers", "unit": "layers", "units_before": 5,
                                                           "units_kept": 3, "removed_layers": [1, 3], "layers": []})
    assert layers.kept_layers() == [0, 2, 4]
    with pytest.raises(LLMPruneError, match="structure record has version 9"):
        StructureRecord.from_dict(UNTYPED_CHANNELS | {"version": 9})
