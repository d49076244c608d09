"""The search's second round (--search-topk, --search-steps), its plot, and --shape FILE on a prune run.

Independent checks: parameter counts are those of the saved model reloaded with plain transformers; the KL after
distillation is recomputed from a model distilled here with the recovery code directly."""

import json

import pytest
from transformers import AutoModelForCausalLM

from llmprune import LLMPruneError
from llmprune.cli import main
from llmprune.pruning.structured.shape_file import read_shape_file
from llmprune.runtime import parameter_count

FAST = ["--nsamples", "2", "--seqlen", "16", "--eval-windows", "2", "--quiet"]
SEARCH = ["--round-to", "4", "--method", "magnitude", "--hidden-importance", "magnitude", "--nsamples", "2",
          "--seqlen", "16", "--search-windows", "2", "--search-limit", "3"]
DISTILL = ["--search-topk", "2", "--search-steps", "4", "--recover-seqlen", "16", "--recover-batch", "2",
           "--recover-lr", "1e-3"]


def fails(capsys, args, message):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and message in err[0], err


def run_args(tiny_dir, text, out, *extra):
    return ["--model", str(tiny_dir), "--calib", f"file:{text}", "--eval", f"file:{text}", *FAST, *extra,
            "--output", str(out)]


@pytest.fixture(scope="module")
def searched(tmp_path_factory, tiny_dir):
    """One distilled search over hidden,channels at 0.8 of the tiny model (shared: it is the slow part)."""
    root = tmp_path_factory.mktemp("searched")
    text = root / "text.jsonl"
    text.write_text("\n".join('{"text": "The quick brown fox jumps over the lazy dog number %d."}' % i
                              for i in range(300)))
    out = root / "search"
    assert main(["search", "--model", str(tiny_dir), "--calib", f"file:{text}", "--structure", "hidden,channels",
                 "--target-params", "0.8", *SEARCH, *DISTILL, "--output", str(out), "--quiet"]) == 0
    return out, text


def test_distilled_search_records_both_scores_and_ranks_by_the_second(searched):
    out, _ = searched
    table = json.loads((out / "candidates.json").read_text())
    distilled = [c for c in table["candidates"] if c["kl_distilled"] is not None]
    scored = [c for c in table["candidates"] if c["kl"] is not None]
    assert len(distilled) == min(2, len(scored)) >= 1
    # the distilled ones were the best by one-shot KL, and now lead, ordered by their KL after distillation
    assert sorted(c["kl"] for c in distilled) == sorted(c["kl"] for c in scored)[:len(distilled)]
    assert table["candidates"][:len(distilled)] == distilled
    assert [c["kl_distilled"] for c in distilled] == sorted(c["kl_distilled"] for c in distilled)
    # a few steps of distillation from the dense model bring each candidate closer to it
    assert all(c["kl_distilled"] < c["kl"] for c in distilled), distilled
    assert table["distillation"]["steps"] == 4 and table["distillation"]["candidates"] == len(distilled)
    markdown = (out / "candidates.md").read_text()
    assert "KL distilled" in markdown and f"{distilled[0]['kl_distilled']:.5f}" in markdown


def test_candidates_plot_is_a_png(searched):
    out, _ = searched
    data = (out / "candidates.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_kl_distilled_matches_an_independent_distillation(searched, tiny_dir):
    """The best candidate's kl_distilled, recomputed: prune a fresh copy, distil with train_recovery, score."""
    import copy

    from llmprune.config import PruneConfig, RecoverConfig
    from llmprune.inputs.data import load_text, tokenize
    from llmprune.recovery.distill import teacher_topk
    from llmprune.recovery.train import train_recovery
    from llmprune.pruning.structured.search import dense_log_probs, kl_to_dense, prune_shape, search_windows
    from llmprune.pruning.structured.search_distill import distill_windows
    from transformers import AutoTokenizer

    out, text = searched
    best = json.loads((out / "candidates.json").read_text())["candidates"][0]
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tokens = tokenize(AutoTokenizer.from_pretrained(tiny_dir), load_text(f"file:{text}", "calib"))
    calibration, validation = search_windows(tokens, 2, 16, 0, 2)
    rc = RecoverConfig(loss="distill", steps=4, seqlen=16, batch=2, lr=1e-3, eval_every=0)
    train = distill_windows(tokens[: tokens.numel() - 2 * 16], 4, 2, 16, 0)
    teacher = teacher_topk(model, train, rc.distill_topk, progress=False)
    base = PruneConfig(structure="hidden,channels", target_params="0.8", round_to=4, method="magnitude",
                       hidden_importance="magnitude").search_base()
    student = copy.deepcopy(model)
    prune_shape(student, calibration, base, best["shape"])
    assert kl_to_dense(student, validation, dense_log_probs(model, validation)) == pytest.approx(best["kl"], rel=1e-4)
    train_recovery(student, train, None, rc, teacher=teacher, masks={}, progress=False)
    assert kl_to_dense(student, validation, dense_log_probs(model, validation)) == pytest.approx(
        best["kl_distilled"], rel=1e-3)


def test_shape_from_candidates_gives_exactly_the_candidates_count(searched, tmp_path, tiny_dir, capsys):
    out, text = searched
    best = json.loads((out / "candidates.json").read_text())["candidates"][0]
    pruned = tmp_path / "pruned"
    assert main(run_args(tiny_dir, text, pruned, "--structure", "hidden,channels", "--round-to", "4",
                         "--method", "magnitude", "--hidden-importance", "magnitude",
                         "--shape", str(out / "candidates.json"))) == 0
    assert "shape: " in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(pruned)
    assert parameter_count(model.parameters()) == best["params"]
    record = json.loads((pruned / "report.json").read_text())["structure"]
    assert record["shape"] == best["shape"] and record["shape_source"] == str(out / "candidates.json")
    assert record["params_after"] == best["params"]
    assert "candidates.json" in (pruned / "README.md").read_text()


def test_hand_written_shape_composes_with_distillation(tmp_path, tiny_dir, text):
    shape = tmp_path / "shape.json"
    shape.write_text(json.dumps({"shape": {"channels": 0.25, "layers": 0.5}}))
    out = tmp_path / "out"
    assert main(run_args(tiny_dir, text, out, "--structure", "channels,layers", "--round-to", "4",
                         "--shape", str(shape), "--recover", "distill", "--recover-steps", "2",
                         "--recover-seqlen", "16", "--recover-val-windows", "1", "--eval-every", "0",
                         "--save-format", "gguf", "--gguf-outtype", "f32")) == 0
    dense = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(out)
    layers = dense.config.num_hidden_layers
    assert model.config.num_hidden_layers == layers - round(layers * 0.5)
    assert model.config.intermediate_size == round(dense.config.intermediate_size * 0.75 / 4) * 4
    report = json.loads((out / "report.json").read_text())
    assert report["structure"]["shape"] == {"layers": 0.5, "channels": 0.25}
    assert report["recovery"]["loss"] == "distill" and report["perplexity"]["recovered"] is not None
    from gguf import GGUFReader

    tensors = {tensor.name: tensor for tensor in GGUFReader(out / "out-f32.gguf").tensors}
    assert sum(name.endswith("ffn_down.weight") for name in tensors) == model.config.num_hidden_layers
    assert model.config.intermediate_size in tensors["blk.0.ffn_down.weight"].shape.tolist()


@pytest.mark.parametrize("content, extra, message", [
    (None, [], "no such file"),
    ("not json", [], "not a readable JSON file"),
    ('{"shape": {"heads": 0.5}}', [], "which --structure layers,channels leaves out"),
    ('{"shape": {"width": 0.5}}', [], "unknown structure 'width'"),
    ('{"shape": {"channels": 1.5}}', [], "in [0, 1)"),
    ('{"candidates": []}', [], "candidates list is empty"),
    ('{"shape": {"channels": 0.25}}', ["--target-params", "0.8"], "give one of them"),
])
def test_bad_shape_files_are_one_line(tmp_path, tiny_dir, text, capsys, content, extra, message):
    shape = tmp_path / "shape.json"
    if content is not None:
        shape.write_text(content)
    fails(capsys, run_args(tiny_dir, text, tmp_path / "out", "--structure", "channels,layers", "--shape",
                           str(shape), *extra), message)


def test_shape_file_forms(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"candidates": [{"shape": {"hidden": 0.125, "channels": 0.25}, "params": 10,
                                                "kl": 0.5, "kl_distilled": 0.2, "layers_removed": None},
                                               {"shape": {"channels": 0.5}, "params": 9}]}))
    given = read_shape_file(path, ["channels", "hidden"])
    assert given.shape == {"channels": 0.25, "hidden": 0.125} and list(given.shape) == ["channels", "hidden"]
    assert given.params == 10 and given.kl == 0.2 and given.layers_removed is None
    path.write_text(json.dumps({"shape": {"layers": 0.25, "channels": 0}, "layers_removed": [5, 2]}))
    given = read_shape_file(path, ["layers", "channels"])
    assert given.shape == {"layers": 0.25} and given.layers_removed == [2, 5]
    with pytest.raises(LLMPruneError, match="removes nothing"):
        path.write_text(json.dumps({"shape": {"channels": 0}}))
        read_shape_file(path, ["channels"])


def test_layers_removed_are_the_layers_removed(tmp_path, tiny_dir, text, capsys):
    """A shape naming its layers removes exactly those; a list that does not fit the model is one clear line."""
    shape = tmp_path / "shape.json"
    shape.write_text(json.dumps({"shape": {"layers": 0.34, "channels": 0.25}, "layers_removed": [0]}))
    args = run_args(tiny_dir, text, tmp_path / "out", "--structure", "channels,layers", "--round-to", "4",
                    "--shape", str(shape))
    assert main(args) == 0
    record = json.loads((tmp_path / "out" / "report.json").read_text())["structure"]
    assert [stage["removed_layers"] for stage in record["stages"] if stage["kind"] == "layers"] == [[0]]
    shape.write_text(json.dumps({"shape": {"layers": 0.5}, "layers_removed": [1, 99]}))
    args[args.index(str(tmp_path / "out"))] = str(tmp_path / "out2")  # the first run wrote "out"
    fails(capsys, args, "must be 2 distinct indices below 3")


def test_prune_run_search_chooses_after_distillation(tmp_path, tiny_dir, text, capsys):
    out = tmp_path / "out"
    assert main(run_args(tiny_dir, text, out, "--structure", "hidden,channels", "--target-params", "0.8",
                         "--round-to", "4", "--method", "magnitude", "--hidden-importance", "magnitude",
                         "--search-limit", "2", "--search-windows", "2", "--search-topk", "1", "--search-steps", "2",
                         "--recover-seqlen", "16")) == 0
    record = json.loads((out / "report.json").read_text())["structure"]
    assert record["shape_source"] == "search" and record["shape"]
    assert "shape: " in capsys.readouterr().out


def test_shape_of_one_structure_is_that_prune(tmp_path, tiny_dir, text):
    """--structure channels --shape {"shape": {"channels": 0.25}} saves the very model --sparsity 0.25 saves."""
    from safetensors.torch import load_file

    shape = tmp_path / "shape.json"
    shape.write_text(json.dumps({"shape": {"channels": 0.25}}))
    common = ["--structure", "channels", "--round-to", "4", "--method", "wanda", "--bias-compensation", "off"]
    assert main(run_args(tiny_dir, text, tmp_path / "a", *common, "--shape", str(shape))) == 0
    assert main(run_args(tiny_dir, text, tmp_path / "b", *common, "--sparsity", "0.25")) == 0
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("a", "b"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
