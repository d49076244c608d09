"""scripts/bench_search.py: its --quick mode end to end on a tiny Llama (one target), and its row selection."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_search.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_search", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_measures_every_row(bench, tmp_path, monkeypatch):
    """Everything for real but llama.cpp (built apart, never in tests): its worker is replaced by one whose speeds
    are inverse to the GGUF file's size, so the deploy row's ratios are known from the files it exported."""
    import bench_deploy

    monkeypatch.setattr(bench_deploy, "llama_cpp_python", lambda cache, build: (Path("python"), {"version": "x"}))
    monkeypatch.setattr(bench_deploy, "run_worker", lambda python, job, scratch: {
        "pp_tok_s": 2e9 / Path(job["gguf"]).stat().st_size, "tg_tok_s": 1e9 / Path(job["gguf"]).stat().st_size})
    out = tmp_path / "results"
    results = bench.main(["--quick", "--targets", "0.8", "--out", str(out)])
    saved = json.loads((out / "search.json").read_text())
    assert saved["complete"] and [row["name"] for row in saved["rows"]] == ["0.8-search", "0.8-single", "0.8-deploy"]
    search, single, deploy = saved["rows"]
    dense = saved["dense_params"]
    # the searched shape, pruned from its candidates.json, has exactly the candidate's count, within 2% of 0.8
    best = json.loads((out / "0.8-candidates.json").read_text())["candidates"][0]
    assert search["params"] == best["params"] and abs(best["params"] - 0.8 * dense) <= 0.02 * 0.8 * dense
    assert best["kl_distilled"] is not None and search["shape"] == best["shape"]
    assert (out / "0.8-candidates.png").read_bytes()[:4] == b"\x89PNG"
    for row in (search, single):
        assert math.isfinite(row["ppl_oneshot"]) and math.isfinite(row["ppl_recovered"]) and row["ppl_dense"] > 1
        assert row["recovery"]["steps"] == saved["mode"]["recover_steps"] and row["recovery"]["loss"] == "distill"
    assert search["search"]["cpu_s"] > 0 and search["cpu_s_total"] >= search["search"]["cpu_s"]
    assert search["search"]["cpu_s"] <= search["cpu_s_compress_estimate"] <= search["cpu_s_total"]
    # the single-structure baseline: every structure tried, the best by held-out perplexity recovered
    assert set(single["tried"]) == {"channels", "layers", "hidden", "heads"}
    reached = {k: v["ppl_oneshot"] for k, v in single["tried"].items() if "error" not in v}
    assert single["best"] == min(reached, key=reached.get) and single["ppl_oneshot"] == reached[single["best"]]
    sizes = {name: model["gguf_bytes"] for name, model in deploy["models"].items()}
    assert deploy["gguf_x_dense"] == pytest.approx(sizes["searched"] / sizes["dense"])
    assert deploy["tg_x_dense"] == pytest.approx(sizes["dense"] / sizes["searched"]) and deploy["tg_x_dense"] > 1
    goals = saved["goals"]["0.8"]
    assert goals["ppl_x_dense"]["value"] == pytest.approx(search["ppl_recovered"] / search["ppl_dense"], abs=1e-3)
    assert goals["tg_x_dense"]["value"] == deploy["tg_x_dense"] and results["complete"]
    table = (out / "search.md").read_text()
    assert "| 0.8 | searched + recovered |" in table and "best single (" in table


def test_rows_select_targets_and_kinds(bench, tmp_path):
    with pytest.raises(SystemExit, match="matches none"):
        bench.main(["--quick", "--targets", "0.8", "--rows", "^90M-", "--out", str(tmp_path)])


def test_deploy_is_skipped_without_the_llama_cpp_venv(bench, tmp_path):
    args = bench.parse_args(["--quick", "--llama-cpp", str(tmp_path / "none")])
    row = bench.deploy_row("0.8", args, bench.QUICK, tmp_path, {"output": str(tmp_path)})
    assert "no llama-cpp-python venv" in row["skipped"]
    args = bench.parse_args(["--quick", "--no-deploy"])
    assert bench.deploy_row("0.8", args, bench.QUICK, tmp_path, {"output": str(tmp_path)})["skipped"] == "--no-deploy"


def test_rows_not_rerun_are_kept_with_their_settings(bench, tmp_path):
    path = tmp_path / "search.json"
    assert bench.earlier_rows(path, {"90M-search"}) == []
    path.write_text(json.dumps({"mode": {"recover_steps": 300}, "rows": [
        {"name": "90M-search", "target": "90M", "ppl_recovered": 52.9},
        {"name": "100M-search", "target": "100M", "ppl_recovered": 40.0, "mode": {"recover_steps": 320}}]}))
    kept = bench.earlier_rows(path, {"90M-search", "90M-single"})
    assert kept == [{"name": "100M-search", "target": "100M", "ppl_recovered": 40.0, "mode": {"recover_steps": 320}}]
    assert bench.earlier_rows(path, {"100M-search"})[0]["mode"] == {"recover_steps": 300}
