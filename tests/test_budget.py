"""--structure hidden through the run, and --target-params (a parameter budget) for every single axis.

Independent checks: the saved model is reloaded with plain transformers and its perplexity recomputed from its
own forward; parameter counts are those of the pruned model in memory, against the target the test states."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmprune import LLMPruneError
from llmprune.cli import main
from llmprune.pruning.structured import StructuredConfig, prune_structured
from llmprune.pruning.structured.config import parse_param_target
from llmprune.runtime import parameter_count
from tiny_models import VOCAB, tiny_model

FAST = ["--nsamples", "2", "--seqlen", "16", "--eval-windows", "2", "--quiet"]


def run_args(tiny_dir, text, out, *extra):
    return ["--model", str(tiny_dir), "--calib", f"file:{text}", "--eval", f"file:{text}", *FAST, *extra,
            "--output", str(out)]


def fails(capsys, args, message):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and message in err[0], err


def calibration(n=4, seqlen=16):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(0))


# ---- --structure hidden ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("importance", ["activation", "magnitude"])
def test_hidden_run_saves_a_smaller_model_that_reloads(tmp_path, tiny_dir, text, capsys, importance):
    out = tmp_path / "out"
    assert main(run_args(tiny_dir, text, out, "--structure", "hidden", "--sparsity", "0.25", "--round-to", "4",
                         "--hidden-importance", importance)) == 0
    printed = capsys.readouterr().out
    assert "removed 16 of 64 hidden (embedding) channels" in printed
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # stock transformers, nothing of ours
    assert model.config.hidden_size == 48 and model.config.head_dim == 16
    assert model.model.embed_tokens.weight.shape[1] == 48 and model.lm_head.weight.shape[1] == 48
    report = json.loads((out / "report.json").read_text())
    record = report["structure"]
    assert (record["kind"], record["unit"], record["method"]) == ("hidden", "hidden_channels", importance)
    assert (record["units_before"], record["units_kept"]) == (64, 48)
    assert record["params_after"] == parameter_count(model.parameters()) < record["params_before"]
    assert record["config_changes"]["hidden_size"] == 48
    assert "hidden (embedding) channels removed everywhere" in (out / "README.md").read_text()

    assert report["perplexity"]["pruned"] == pytest.approx(reloaded_perplexity(out, model, text), rel=1e-5)


def reloaded_perplexity(out, model, text) -> float:
    """The held-out windows as the run cut them, scored by the reloaded model's own forward."""
    from llmprune.inputs.data import eval_windows, load_text, tokenize

    tokenizer = AutoTokenizer.from_pretrained(out)
    windows = eval_windows(tokenize(tokenizer, load_text(f"file:{text}", "eval")), 16, 2)
    with torch.no_grad():
        logits = model(input_ids=windows).logits.double()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    return math.exp(nll.item())


@pytest.mark.parametrize("extra,message", [
    (["--stream"], "no --stream, --checkpoint, --resume or torchrun"),
    (["--checkpoint"], "no --stream, --checkpoint, --resume or torchrun"),
    (["--method", "flap"], "is scored by --hidden-importance: drop --method"),
    (["--bias-compensation", "on"], "not to --structure hidden: drop it"),
    (["--schedule", "0.1,0.2", "--sparsity", "0.2"], "drop --schedule"),
    (["--round-to", "64"], "lower --round-to"),
])
def test_hidden_refusals_are_one_line(tmp_path, tiny_dir, text, capsys, extra, message):
    fails(capsys, run_args(tiny_dir, text, tmp_path / "out", "--structure", "hidden", *extra), message)
    assert not (tmp_path / "out").exists()


def test_hidden_refuses_a_family_deriving_head_size_from_hidden():
    with pytest.raises(LLMPruneError, match="head"):
        prune_structured(tiny_model("gpt2"), calibration(), StructuredConfig("hidden", round_to=4), progress=False)


# ---- --target-params ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text_value,expected", [
    ("90M", ("count", 90e6)), ("1.2B", ("count", 1.2e9)), ("90000000", ("count", 9e7)), ("15k", ("count", 15e3)),
    ("0.67", ("fraction", 0.67)), (0.5, ("fraction", 0.5)), (120000, ("count", 120000.0)),
])
def test_target_params_parses_counts_and_fractions(text_value, expected):
    kind, value = parse_param_target(text_value)
    assert kind == expected[0] and value == pytest.approx(expected[1])


@pytest.mark.parametrize("structure,options,fraction", [
    ("channels", {"method": "magnitude", "round_to": 8}, 0.83),
    ("heads", {"method": "magnitude"}, 0.93),
    ("layers", {"layer_importance": "influence"}, 0.77),
    ("hidden", {"hidden_importance": "magnitude", "round_to": 4}, 0.76),  # widths: multiples of 8 heads
])
def test_target_params_meets_the_budget_on_each_axis(structure, options, fraction):
    # 8 query heads over 2 KV heads: a quarter of the heads is one query head of each group of 4.
    model = tiny_model("llama", layers=4, intermediate=256, heads=8)
    dense = parameter_count(model.parameters())
    config = StructuredConfig(structure, target_params=str(fraction), **options)
    record = prune_structured(model, calibration(), config, progress=False).structure
    achieved = parameter_count(model.parameters())
    target = round(fraction * dense)
    assert record.target_params == target and record.params_after == achieved
    assert abs(achieved - target) <= 0.02 * target, (achieved, target)


def test_target_params_takes_the_nearest_shape_not_over_two_percent():
    """Layers of a 4-layer model: 25% steps of the decoder; a target just under 3 layers' count must not round up
    past 2% to 3 layers, nor down further than the 2-layer shape."""
    model = tiny_model("llama", layers=4)
    dense, layer = parameter_count(model.parameters()), parameter_count(model.model.layers[0].parameters())
    three = dense - layer
    config = StructuredConfig("layers", target_params=str(round(three / 1.03)))
    record = prune_structured(model, calibration(), config, progress=False).structure
    assert record.params_after == dense - 2 * layer and record.units_kept == 2


def test_target_params_through_the_cli(tmp_path, tiny_dir, text):
    out = tmp_path / "out"
    dense = parameter_count(AutoModelForCausalLM.from_pretrained(tiny_dir).parameters())
    target = dense * 9 // 10
    assert main(run_args(tiny_dir, text, out, "--structure", "channels", "--method", "magnitude", "--round-to", "4",
                         "--target-params", f"{target / 1e3:.3f}K")) == 0
    record = json.loads((out / "report.json").read_text())["structure"]
    achieved = parameter_count(AutoModelForCausalLM.from_pretrained(out).parameters())
    assert record["target_params"] == target and record["params_after"] == achieved
    assert abs(achieved - target) <= 0.02 * target
    saved = json.loads((out / "llmprune_config.json").read_text())["prune"]
    assert saved["target_params"] == f"{target / 1e3:.3f}K" and saved["sparsity"] is None


@pytest.mark.parametrize("value,message", [
    ("10M", "give a smaller count"),
    ("0", "--target-params must be a parameter count"),
    ("lots", "--target-params must be a parameter count"),
    ("1", "keeps the whole model"),
    ("0.01", "no --structure channels shape"),
])
def test_bad_targets_are_one_line(tmp_path, tiny_dir, text, capsys, value, message):
    fails(capsys, run_args(tiny_dir, text, tmp_path / "out", "--structure", "channels", "--target-params", value),
          message)


def test_target_params_conflicts_are_one_line(tmp_path, tiny_dir, text, capsys):
    base = run_args(tiny_dir, text, tmp_path / "out")
    fails(capsys, [*base, "--structure", "channels", "--target-params", "0.9", "--sparsity", "0.2"],
          "give one of them")
    fails(capsys, [*base, "--structure", "channels", "--target-params", "0.9", "--remove-params", "0.2"],
          "give one of them")
    fails(capsys, [*base, "--target-params", "0.9"], "give --structure too")


def test_remove_params_is_a_parameter_target():
    """--remove-params F: all parameters less F of the decoder layers', met like any target."""
    from llmprune.pruning.structured.runner import remove_params_target, sparsity_for_params

    model = tiny_model("llama", intermediate=256)
    dense, decoder = parameter_count(model.parameters()), parameter_count(model.model.layers.parameters())
    assert remove_params_target(model, 0.3) == round(dense - 0.3 * decoder)
    config = StructuredConfig("channels", method="magnitude", round_to=1)
    sparsity = sparsity_for_params(model, config, 0.3)
    record = prune_structured(model, None, StructuredConfig("channels", method="magnitude", round_to=1,
                                                            sparsity=sparsity), progress=False).structure
    per_channel = 3 * 64 * 3  # gate row + up row + down column, 3 layers
    assert abs(record.params_after - (dense - 0.3 * decoder)) <= per_channel / 2


@pytest.mark.parametrize("structure,options", [("channels", {"method": "magnitude", "round_to": 8}),
                                               ("hidden", {"hidden_importance": "magnitude", "round_to": 4})])
def test_chosen_shape_is_the_brute_force_nearest(structure, options):
    """Every shape pruned for real on a copy and counted: the choice is the nearest count at most 2% over."""
    import copy

    from llmprune.pruning.structured.runner import candidate_sparsities, sparsity_for_target

    model = tiny_model("llama", layers=2, intermediate=256)
    config = StructuredConfig(structure, **options)
    real = {}
    for sparsity in candidate_sparsities(model, config):
        pruned = copy.deepcopy(model)
        prune_structured(pruned, None, StructuredConfig(structure, sparsity=sparsity, **options), progress=False)
        real[sparsity] = parameter_count(pruned.parameters())
    assert len(set(real.values())) == len(real) > 5
    for target in (0.9 * max(real.values()), 0.6 * max(real.values()) + 7, min(real.values()) * 1.01):
        allowed = {s: c for s, c in real.items() if c <= 1.02 * target}
        nearest = min(allowed, key=lambda s: (abs(allowed[s] - target), -s))
        assert sparsity_for_target(model, config, target) == (nearest, real[nearest])


# ---- several axes: exact counts and the search ---------------------------------------------------------------

def search_model():
    return tiny_model("llama", layers=4, intermediate=128, heads=8)


SEARCH_BASE = StructuredConfig("channels", method="magnitude", round_to=8, hidden_importance="magnitude")


def test_every_candidate_count_is_the_pruned_models_count():
    """Composed one-layer counts against each shape pruned for real."""
    import copy

    from llmprune.pruning.structured.search import candidate_shapes, prune_shape

    model = search_model()
    dense = parameter_count(model.parameters())
    found = candidate_shapes(model, SEARCH_BASE, ["layers", "heads", "channels", "hidden"], 0.7 * dense)
    assert len(found) > 3 and any(len(c.shape) >= 3 for c in found)  # shapes over several axes
    for candidate in found:
        pruned = copy.deepcopy(model)
        prune_shape(pruned, calibration(), SEARCH_BASE, candidate.shape)
        assert parameter_count(pruned.parameters()) == candidate.params, candidate.shape
        assert abs(candidate.params - 0.7 * dense) <= 0.02 * 0.7 * dense


def test_search_ranks_by_kl_to_the_dense_model():
    import copy

    from llmprune.pruning.structured.search import prune_shape, search_shapes

    model = search_model()
    dense_params = parameter_count(model.parameters())
    validation = calibration(2, 12)
    found = search_shapes(model, calibration(), validation, SEARCH_BASE, ["channels", "hidden", "layers"],
                          0.75 * dense_params, limit=4)
    assert parameter_count(model.parameters()) == dense_params  # the model stays dense
    scored = [c for c in found if c.kl is not None]
    shapes = {tuple(c.shape.items()) for c in found}  # a shape with layers is scored once per layer set
    assert len({tuple(c.shape.items()) for c in scored}) == min(4, len(shapes))
    assert [c.kl for c in scored] == sorted(c.kl for c in scored)
    best = scored[0]
    pruned = copy.deepcopy(model)
    prune_shape(pruned, calibration(), SEARCH_BASE, best.shape, layers_removed=best.layers_removed)
    with torch.no_grad():  # float64 KL(dense || pruned), token by token
        p = torch.log_softmax(model(input_ids=validation).logits.double(), -1)
        q = torch.log_softmax(pruned(input_ids=validation).logits.double(), -1)
    assert best.kl == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean()), rel=2e-3)  # search: float32


def test_structure_lists_are_checked():
    from llmprune.pruning.structured.config import parse_structures

    assert parse_structures("hidden, layers,channels") == ["layers", "channels", "hidden"]
    for bad in ("", "hidden,hidden", "width"):
        with pytest.raises(LLMPruneError, match="comma list of distinct structures"):
            parse_structures(bad)


def test_search_command_writes_candidates(tmp_path, tiny_dir, text):
    out = tmp_path / "search"
    dense = parameter_count(AutoModelForCausalLM.from_pretrained(tiny_dir).parameters())
    assert main(["search", "--model", str(tiny_dir), "--calib", f"file:{text}", "--structure", "hidden,channels",
                 "--target-params", "0.8", "--round-to", "4", "--method", "magnitude", "--hidden-importance",
                 "magnitude", "--nsamples", "2", "--seqlen", "16", "--search-windows", "2", "--search-limit", "3",
                 "--output", str(out), "--quiet"]) == 0
    table = json.loads((out / "candidates.json").read_text())
    assert table["target_params"] == round(0.8 * dense) and table["dense_params"] == dense
    scored = [c for c in table["candidates"] if c["kl"] is not None]
    assert 1 <= len(scored) <= 3 and scored == table["candidates"][:len(scored)]
    assert all(abs(c["params"] - 0.8 * dense) <= 0.02 * 0.8 * dense for c in table["candidates"])
    assert "| 1 |" in (out / "candidates.md").read_text()


def test_search_refusals_are_one_line(tmp_path, tiny_dir, text, capsys):
    base = ["search", "--model", str(tiny_dir), "--calib", f"file:{text}", "--output", str(tmp_path / "s")]
    fails(capsys, [*base, "--structure", "hidden,width", "--target-params", "0.8"], "comma list of distinct")
    fails(capsys, [*base, "--structure", "hidden"], "needs --target-params")


def test_several_structures_run_prunes_the_searched_shape(tmp_path, tiny_dir, text, capsys):
    out = tmp_path / "out"
    dense = parameter_count(AutoModelForCausalLM.from_pretrained(tiny_dir).parameters())
    assert main(run_args(tiny_dir, text, out, "--structure", "hidden,channels,layers", "--target-params", "0.7",
                         "--round-to", "4", "--method", "magnitude", "--hidden-importance", "magnitude",
                         "--search-limit", "2", "--search-windows", "2")) == 0
    assert "parameters" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    achieved = parameter_count(model.parameters())
    assert abs(achieved - 0.7 * dense) <= 0.02 * 0.7 * dense
    report = json.loads((out / "report.json").read_text())
    record = report["structure"]
    assert record["unit"] == "parameters" and record["params_after"] == achieved == record["units_kept"]
    assert record["target_params"] == round(0.7 * dense)
    assert [stage["kind"] for stage in record["stages"]] == [k for k in ("layers", "channels", "hidden")
                                                            if k in record["kind"].split(",")]
    assert report["perplexity"]["pruned"] == pytest.approx(reloaded_perplexity(out, model, text), rel=1e-5)


def test_several_structures_need_a_target_and_one_process(tmp_path, tiny_dir, text, capsys):
    base = run_args(tiny_dir, text, tmp_path / "out", "--structure", "hidden,layers")
    fails(capsys, base, "give --target-params")
    fails(capsys, [*base, "--target-params", "0.7", "--checkpoint"], "in one process, in memory")
    fails(capsys, [*base, "--target-params", "0.7", "--method", "flap"], "has neither: drop --method")
