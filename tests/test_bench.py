"""scripts/bench_prune.py: its --quick mode end to end on a tiny random Llama, and its row selection."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from llmprune import PruneConfig, prune
from llmprune.inputs.data import calibration_windows, eval_windows, load_text, tokenize
from llmprune.inputs.models import load_model
from llmprune.testing import save_tiny_model_dir

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_prune.py"
QUICK_ROWS = {"dense", "magnitude-50%-uniform", "magnitude-2:4-uniform", "wanda-50%-uniform", "wanda-2:4-uniform",
              "wanda-70%-owl", "sparsegpt-50%-uniform", "sparsegpt-2:4-uniform"}


@pytest.fixture(scope="module")
def bench():
    """The script as a module (scripts/ is not a package), so main() runs in this process."""
    spec = importlib.util.spec_from_file_location("bench_prune", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer random Llama with a byte-level BPE tokenizer trained offline on a slice of the wiki text:
    byte-level, so any text tokenizes without unknowns; its vocabulary sizes the model's embeddings."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), text=load_text("wiki", "calib")[:20_000],
                               vocab_size=600, layers=2)


def perplexity_by_hand(model, windows: torch.Tensor) -> float:
    """exp of the mean negative log-likelihood of every token after the first of each window, in float64."""
    with torch.no_grad():
        log_probs = torch.log_softmax(model(windows).logits.double(), dim=-1)
    return math.exp(-float(log_probs[:, :-1].gather(-1, windows[:, 1:, None]).mean()))


def test_quick_run_writes_every_row(bench, tiny_llama_dir, tmp_path):
    out = tmp_path / "results"
    bench.main(["--model", str(tiny_llama_dir), "--quick", "--out", str(out)])

    results = json.loads((out / "bench.json").read_text())
    assert results["complete"]
    assert {"cpu_count", "torch_threads", "torch", "transformers"} <= results["machine"].keys()
    rows = {row["name"]: row for row in results["rows"]}
    assert rows.keys() == QUICK_ROWS
    for name, row in rows.items():
        assert math.isfinite(row["ppl"]) and row["ppl"] > 1, name
        if name != "dense":
            assert row["achieved_sparsity"] == pytest.approx(row["sparsity"], abs=0.02), name
            assert row["seconds"]["prune"] > 0 and row["x_floor"] > 0 and row["peak_rss_increase_bytes"] >= 0
    assert len(set(rows["wanda-70%-owl"]["layer_sparsity"])) == 2  # OWL gave the two layers different targets

    # The perplexities are those of the model each row names, computed here from the model's own logits: the
    # dense one, and the last row's prune of a fresh dense copy (so the six rows before it were undone).
    model, tokenizer, _ = load_model(str(tiny_llama_dir))
    windows = eval_windows(tokenize(tokenizer, load_text("wiki", "eval")), 128, 4)
    assert results["dense_ppl"] == pytest.approx(perplexity_by_hand(model, windows), rel=1e-5)
    calibration = calibration_windows(tokenize(tokenizer, load_text("wiki", "calib")), 4, 128, seed=0)
    prune(model, calibration, PruneConfig(method="sparsegpt", pattern="2:4", nsamples=4, seqlen=128), progress=False)
    assert results["rows"][-1]["name"] == "sparsegpt-2:4-uniform"
    assert rows["sparsegpt-2:4-uniform"]["ppl"] == pytest.approx(perplexity_by_hand(model, windows), rel=1e-5)

    table = (out / "bench.md").read_text()
    assert "| method | pattern | allocation | ppl | achieved | prune s | x floor | peak RSS MiB |" in table
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(QUICK_ROWS)
    png = (out / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert not list(out.glob(".*partial"))  # every write was renamed into place


def test_repeats_time_each_prune_against_its_own_floor(bench, tiny_llama_dir, tmp_path):
    out = tmp_path / "results"
    bench.main(["--model", str(tiny_llama_dir), "--quick", "--out", str(out), "--rows", "^wanda-50%", "--repeats", "3"])
    row = json.loads((out / "bench.json").read_text())["rows"][1]
    ratios = row["x_floor_repeats"]
    assert row["name"] == "wanda-50%-uniform" and len(ratios) == 3 and all(r > 0 for r in ratios)
    assert row["x_floor"] == sorted(ratios)[1]  # the median of three
    with pytest.raises(SystemExit, match="--repeats must be at least 1"):
        bench.main(["--model", str(tiny_llama_dir), "--quick", "--out", str(out), "--repeats", "0"])


def test_keep_rows_merges_runs_into_one_file(bench, tiny_llama_dir, tmp_path):
    """--keep-rows: a second run adds its rows to the first run's file, whose rows keep their own figures and the
    floor they were timed against; a run with other windows is refused before it loads the model."""
    out = tmp_path / "results"
    common = ["--model", str(tiny_llama_dir), "--quick", "--out", str(out)]
    bench.main([*common, "--rows", "^wanda-50%"])
    first = json.loads((out / "bench.json").read_text())
    bench.main([*common, "--rows", "^magnitude-50%", "--keep-rows"])
    merged = json.loads((out / "bench.json").read_text())
    assert [row["name"] for row in merged["rows"]] == ["dense", "wanda-50%-uniform", "magnitude-50%-uniform"]
    kept = merged["rows"][1]
    assert kept["run_floor"] == first["floor"] and kept.items() >= first["rows"][1].items()
    assert "run_floor" not in merged["rows"][2]
    table = (out / "bench.md").read_text()
    assert f"| {kept['x_floor']:.2f}* |" in table and f"({first['floor']['two_pass_s']:.2f} s)" in table
    bench.main([*common, "--rows", "^wanda-50%", "--keep-rows"])  # a row redone replaces its earlier figure
    assert [row["name"] for row in json.loads((out / "bench.json").read_text())["rows"]] == \
        ["dense", "magnitude-50%-uniform", "wanda-50%-uniform"]
    with pytest.raises(SystemExit, match="nsamples"):
        bench.main([*common, "--rows", "^wanda-2:4", "--keep-rows", "--nsamples", "3"])


def test_also_eval_measures_each_row_on_another_text(bench, tiny_llama_dir, tmp_path):
    """--also-eval code: every row also carries the perplexity on code's held-out windows, the model's own."""
    out = tmp_path / "results"
    bench.main(["--model", str(tiny_llama_dir), "--quick", "--out", str(out), "--rows", "^wanda-50%",
                "--also-eval", "code"])
    results = json.loads((out / "bench.json").read_text())
    assert results["evaluation"]["also"] == {"code": 4}
    dense, wanda = results["rows"]
    model, tokenizer, _ = load_model(str(tiny_llama_dir))
    code_windows = eval_windows(tokenize(tokenizer, load_text("code", "eval")), 128, 4)
    assert dense["ppl_on"]["code"] == pytest.approx(perplexity_by_hand(model, code_windows), rel=1e-5)
    assert wanda["ppl_on"]["code"] != pytest.approx(dense["ppl_on"]["code"], rel=1e-3)  # measured after the prune
    assert wanda["ppl"] != pytest.approx(wanda["ppl_on"]["code"], rel=1e-3)  # and not the wiki figure again
    assert "| ppl | ppl on code | achieved |" in (out / "bench.md").read_text()
    with pytest.raises(Exception, match="nonexistent"):
        bench.main(["--model", str(tiny_llama_dir), "--quick", "--out", str(out), "--also-eval", "nonexistent"])


def test_row_selection(bench):
    full = bench.matrix(bench.FULL)
    assert len(full) == 3 * 5 + 3 * 2 + 5 * 5  # every method x pattern, OWL at 60% and 70%, the new methods' rows
    assert all(config.pattern == "unstructured" for config in full if config.allocation == "owl")
    assert [bench.row_name(c) for c in bench.select_rows(full, "sparsegpt-.*owl")] == \
        ["sparsegpt-60%-owl", "sparsegpt-70%-owl"]
    assert len(bench.select_rows(full, "^wanda-")) == 7
    assert len(bench.select_rows(full, r"\+admm-")) == 2 * 5
    with pytest.raises(SystemExit, match="matches none"):
        bench.select_rows(full, "nonexistent")


def test_validation_windows_never_touch_calibration():
    """The sweeps (sweep_owl.py, sweep_sparsegpt.py) choose settings on windows that share no token position with
    calibration."""
    spec = importlib.util.spec_from_file_location("benchlib", SCRIPT.parent / "benchlib.py")
    benchlib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchlib)
    tokens = torch.arange(1000)
    starts = [900, 850, 100]  # windows of 50 at the end, overlapping each other, and one early
    windows = benchlib.validation_windows(tokens, starts, count=5, seqlen=50)
    assert windows.shape == (5, 50)
    used = {p for s in starts for p in range(s, s + 50)}
    assert not used & set(windows.flatten().tolist())
    assert windows[:, 0].tolist() == [950, 800, 750, 700, 650]  # 850..949 is calibration


def test_scripts_neither_patch_sys_path_nor_import_tests():
    """Scripts import the installed llmprune and their neighbour benchlib as any program would: no script edits
    sys.path or imports a module of tests/ (tiny models come from llmprune.testing)."""
    import ast

    test_modules = {path.stem for path in Path(__file__).parent.glob("*.py")}
    scripts = sorted(SCRIPT.parent.glob("*.py"))
    assert "benchlib" in {path.stem for path in scripts}
    for script in scripts:
        tree = ast.parse(script.read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & test_modules, (script.name, imported & test_modules)
        touches_path = [node for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "path"
                        and isinstance(node.value, ast.Name) and node.value.id == "sys"]
        assert not touches_path, f"{script.name} uses sys.path"
