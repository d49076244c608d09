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


def test_eval_model_against_itself(tiny_dir, text_file, tmp_path):
    results = tmp_path / "eval.json"
    result = evaluate(EvalConfig(model=str(tiny_dir), baseline=str(tiny_dir), ppl=(text_file,), seqlen=16,
                                 eval_windows=3, results=str(results)), progress=False)
    entry = result["perplexity"][text_file]
    assert entry["model"] == entry["baseline"] and entry["windows"] == 3
    assert json.loads(results.read_text()) == result
    table = comparison_table(result)
    assert "+0.0000" in table and f"ppl {text_file} (3 x 16)" in table


def test_failed_eval_keeps_the_old_results(tiny_dir, tmp_path, capsys):
    results = tmp_path / "eval.json"
    results.write_text('{"old": true}')
    code = main(["eval", "--model", str(tiny_dir), "--ppl", "file:/no/such.txt", "--results", str(results)])
    assert code == 2 and "no such text file" in capsys.readouterr().err
    assert results.read_text() == '{"old": true}'


def test_eval_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    assert main(["eval", "--model", str(tmp_path / "empty")]) == 2
    assert "has no weights" in capsys.readouterr().err
    assert main(["eval", "--model", "llama", "--limit", "0", "--tasks", "piqa"]) == 2
    assert "--limit must be at least 1" in capsys.readouterr().err
    assert main(["eval", "--model", "llama", "--tasks", "arc_eazy"]) == 2
    assert "did you mean arc_easy" in capsys.readouterr().err
