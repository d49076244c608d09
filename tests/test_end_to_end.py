"""The embedded model, end to end: real weights, real Wikipedia text (small budgets to stay fast)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmprune import PruneConfig, prune
from llmprune.inputs.data import calibration_windows, eval_windows, load_text, tokenize
from llmprune.evaluation.perplexity import perplexity

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def texts(embedded_session):
    _, tokenizer, _ = embedded_session
    calib = calibration_windows(tokenize(tokenizer, load_text("wiki", "calib")), 8, 128, seed=0)
    held_out = eval_windows(tokenize(tokenizer, load_text("wiki", "eval")), 128, 8)
    return calib, held_out


def test_wiki_parts_do_not_overlap():
    calib, held_out = load_text("wiki", "calib"), load_text("wiki", "eval")
    calib_articles, eval_articles = set(calib.split("\n\n")), set(held_out.split("\n\n"))
    assert len(calib) > 1_500_000 and len(held_out) > 300_000
    assert not calib_articles & eval_articles


def test_calibrated_methods_beat_magnitude_at_half_sparsity(embedded, texts):
    model, _, dense_state = embedded
    calib, held_out = texts
    model.load_state_dict(dense_state)
    ppl = {"dense": perplexity(model, held_out, progress=False)}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model.load_state_dict(dense_state)
        report = prune(model, calib, PruneConfig(method=method, sparsity=0.5, nsamples=8, seqlen=128), progress=False)
        assert report.achieved_sparsity == pytest.approx(0.5, abs=1e-4)
        ppl[method] = perplexity(model, held_out, progress=False)
    model.load_state_dict(dense_state)
    assert all(torch.isfinite(torch.tensor(v)) for v in ppl.values()), ppl
    assert ppl["dense"] < ppl["sparsegpt"] < ppl["magnitude"], ppl
    assert ppl["dense"] < ppl["wanda"] < ppl["magnitude"], ppl


def test_cli_writes_a_model_that_loads_back(embedded, texts, tmp_path):
    """`python -m llmprune` as a user runs it; the saved model equals an in-process prune of the same config."""
    out = tmp_path / "llama-wanda50"
    args = ["--model", "llama", "--method", "wanda", "--sparsity", "0.5", "--nsamples", "8", "--seqlen", "128",
            "--eval-windows", "4", "--output", str(out)]
    done = subprocess.run([sys.executable, "-m", "llmprune", *args], capture_output=True, text=True,
                          env=os.environ | {"TQDM_DISABLE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "achieved sparsity over 210 pruned linears in 30 layers: 0.500000" in done.stdout
    report = json.loads((out / "report.json").read_text())
    for key in ("model", "method", "sparsity", "pattern", "calibration", "achieved_sparsity", "layers",
                "perplexity", "seconds", "peak_rss_bytes", "versions"):
        assert key in report, key
    assert report["calibration"] == {"source": "wiki", "nsamples": 8, "seqlen": 128, "seed": 0, "description":
                                     "English Wikipedia articles (gensim's test dump, CC BY-SA), markup stripped"}
    assert set(report["seconds"]) >= {"load", "calibrate", "prune", "evaluate", "total"}
    assert report["perplexity"]["dense"] < report["perplexity"]["pruned"] < 1e4
    assert json.loads((out / "llmprune_config.json").read_text())["prune"]["method"] == "wanda"
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())

    model, _, dense_state = embedded
    model.load_state_dict(dense_state)
    prune(model, texts[0], PruneConfig(method="wanda", sparsity=0.5, nsamples=8, seqlen=128), progress=False)
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, value in model.state_dict().items():
        assert torch.equal(saved.state_dict()[name], value), name
    model.load_state_dict(dense_state)
