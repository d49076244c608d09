"""Perplexity against a hand computation, and the `eval` command on a tiny local model."""

import json
import math

import pytest
import torch

from llmprune.cli import main
from llmprune.inputs.data import eval_windows
from llmprune.evaluation.evaluate import EvalConfig, comparison_table, evaluate
from llmprune.evaluation.perplexity import perplexity
from tiny_models import tiny_model


def perplexity_by_hand(model, windows):
    """exp of the mean negative log-likelihood of every token after the first of each window, in float64."""
    with torch.no_grad():
        log_probs = torch.log_softmax(model(windows).logits.double(), dim=-1)
    return math.exp(-float(log_probs[:, :-1].gather(-1, windows[:, 1:, None]).mean()))


def test_perplexity_matches_hand_computed_nll():
    model = tiny_model("llama")
    tokens = torch.randint(0, 128, (3 * 20 + 7,), generator=torch.Generator().manual_seed(0))
    windows = eval_windows(tokens, seqlen=20)
    assert windows.shape == (3, 20)  # non-overlapping; the 7 leftover tokens are dropped
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            log_probs = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            for t in range(1, 20):  # every token but the first is predicted from those before it
                total -= float(log_probs[t - 1, window[t]])
                count += 1
    assert perplexity(model, windows, progress=False) == pytest.approx(math.exp(total / count), rel=1e-5)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    return f"file:{path}"


def test_eval_model_beside_its_baseline(tiny_dir, text_file, tmp_path):
    """A pruned copy against its dense original: each column holds its own model's perplexity, computed here
    from that model's logits, so swapping model and baseline (or scoring one of them twice) fails."""
    from llmprune import PruneConfig, prune
    from llmprune.inputs.data import load_text, tokenize
    from llmprune.inputs.models import load_model

    dense, tokenizer, _ = load_model(str(tiny_dir))
    windows = eval_windows(tokenize(tokenizer, load_text(text_file, "eval")), 16, 3)
    dense_ppl = perplexity_by_hand(dense, windows)
    prune(dense, None, PruneConfig(method="magnitude", sparsity=0.5), progress=False)
    pruned_ppl = perplexity_by_hand(dense, windows)
    dense.save_pretrained(tmp_path / "pruned")
    tokenizer.save_pretrained(tmp_path / "pruned")
    assert abs(pruned_ppl - dense_ppl) > 1  # far apart at the table's precision

    results = tmp_path / "eval.json"
    result = evaluate(EvalConfig(model=str(tmp_path / "pruned"), baseline=str(tiny_dir), ppl=(text_file,),
                                 seqlen=16, eval_windows=3, results=str(results)), progress=False)
    entry = result["perplexity"][text_file]
    assert entry["windows"] == 3
    assert entry["model"] == pytest.approx(pruned_ppl, rel=1e-5)
    assert entry["baseline"] == pytest.approx(dense_ppl, rel=1e-5)
    assert json.loads(results.read_text()) == result
    header, row = comparison_table(result).splitlines()
    assert header.split() == ["metric", "baseline", "model", "delta"]
    assert row.startswith(f"ppl {text_file} (3 x 16)")
    baseline_cell, model_cell, delta_cell = map(float, row.split()[-3:])
    assert baseline_cell == pytest.approx(dense_ppl, abs=0.01) and model_cell == pytest.approx(pruned_ppl, abs=0.01)
    assert delta_cell == pytest.approx(pruned_ppl - dense_ppl, abs=1e-3)


def test_failed_eval_keeps_the_old_results(tiny_dir, tmp_path, capsys):
    results = tmp_path / "eval.json"
    results.write_text('{"old": true}')
    code = main(["eval", "--model", str(tiny_dir), "--ppl", "file:/no/such.txt", "--results", str(results)])
    assert code == 2 and "no such text file" in capsys.readouterr().err
    assert results.read_text() == '{"old": true}'


def test_eval_errors(tmp_path, capsys, builtin_task_names):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert main(["eval", "--model", str(tmp_path / "empty")]) == 2
    assert "has no weights" in capsys.readouterr().err
    assert main(["eval", "--model", "llama", "--limit", "0", "--tasks", "piqa"]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err
    assert main(["eval", "--model", "llama", "--tasks", "arc_eazy"]) == 2
    assert "did you mean arc_easy" in capsys.readouterr().err
