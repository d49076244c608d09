"""The budget search prunes every candidate from one dense pass of statistics (structured/dense_pass.py) and
scores candidates that differ in which layers go (structured/search.py).

Independent checks: decoder-layer forwards counted at the layer class (a candidate may run layers only on the
validation windows); one axis pruned from the shared statistics against prune_structured on the dense model;
channel scores against float64 statistics from hooks on the dense model's own forward; a candidate without
layers against the dense model's own forward with those layers skipped; skip losses against whole-model
passes with the layer skipped; block influence against the model's own output_hidden_states."""

import copy
import json

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from llmprune import LLMPruneError
from llmprune.cli import main
from llmprune.pruning.structured import StructuredConfig, prune_structured
from llmprune.pruning.structured.config import axis_config
from llmprune.pruning.structured.dense_pass import dense_statistics
from llmprune.pruning.structured.model_passes import skip_layer, skip_losses
from llmprune.pruning.structured.search import (dense_log_probs, kl_to_dense, layer_sets, prune_shape,
                                                search_shapes)
from llmprune.runtime import parameter_count
from tiny_models import VOCAB, tiny_model

CAL_LEN, VAL_LEN = 16, 12  # different lengths tell calibration forwards from validation forwards


def tokens(n, seqlen, seed=0):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def model4():
    return tiny_model("llama", layers=4, intermediate=128, heads=8)


BASE = StructuredConfig("channels", round_to=8, batch_size=2, search_windows=2)  # flap, compensation, activation


@pytest.fixture
def forwards(monkeypatch):
    """Decoder-layer forwards by sequence length, counted at the class (deep copies included; the runner's
    recorders and stubs, which replace an instance's forward, run no layer and are not counted)."""
    counts = {}
    original = LlamaDecoderLayer.forward

    def counted(self, hidden_states, *args, **kwargs):
        counts[hidden_states.shape[1]] = counts.get(hidden_states.shape[1], 0) + 1
        return original(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(LlamaDecoderLayer, "forward", counted)
    return counts


# ---- one dense pass --------------------------------------------------------------------------------------------

def test_candidates_run_no_calibration_pass(forwards):
    """Scoring 1 or many candidates costs the same calibration forwards: one dense pass (4 layers x 2 batches)
    and the skip losses (2 windows, one at a time, through the layers after the skipped one). The validation
    forwards are the dense model's and each scored candidate's kept layers, one window at a time."""
    layers, cal, val = 4, tokens(4, CAL_LEN), tokens(2, VAL_LEN, seed=1)
    axes = ["layers", "heads", "channels", "hidden"]
    seen = {}
    for limit in (1, 6):
        model = model4()
        forwards.clear()
        summary = {}
        found = search_shapes(model, cal, val, BASE, axes, 0.75 * parameter_count(model.parameters()), limit,
                              summary=summary)
        scored = [c for c in found if c.kl is not None]
        seen[limit] = (dict(forwards), len(scored))
        assert forwards[CAL_LEN] == layers * 2 + 2 * (3 + 2 + 1 + 0)
        kept = [layers - len(c.layers_removed or []) for c in scored]
        assert forwards[VAL_LEN] == 2 * (layers + sum(kept))
        assert summary == {"statistics_passes": 1, "layer_forwards": forwards[CAL_LEN], "skip_windows": 2}
    assert seen[6][1] > seen[1][1] >= 1  # more candidates scored, no more calibration forwards


# ---- the shared statistics against independent computations ------------------------------------------------------

@pytest.mark.parametrize("axis,sparsity,options", [
    ("layers", 0.5, {}),
    ("hidden", 0.25, {"round_to": 4}),
    ("channels", 0.5, {"method": "magnitude"}),
    ("channels", 0.5, {"method": "taylor"}),
    ("heads", 0.5, {"method": "magnitude"}),
])
def test_one_axis_from_dense_statistics_equals_prune_structured(axis, sparsity, options):
    """Where prune_structured's scores are the dense model's (layers: block influence of the dense layers;
    hidden: one pass; weights and taylor's gradients: before anything is cut), the same model comes out."""
    model, cal = model4(), tokens(4, CAL_LEN)
    base = StructuredConfig("channels", **{"round_to": 8, "batch_size": 2, **options})
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    records = prune_shape(ours, cal, base, {axis: sparsity})
    record = prune_structured(theirs, cal, axis_config(base, axis, sparsity), progress=False).structure
    assert records[0].removed_layers == record.removed_layers
    assert [layer.removed for layer in records[0].layers] == [layer.removed for layer in record.layers]
    if axis == "layers":
        assert records[0].layer_scores == pytest.approx(record.layer_scores, rel=1e-6)
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == reference.keys()
    assert all(torch.allclose(mine[k], reference[k], atol=1e-6) for k in mine)
    assert parameter_count(ours.parameters()) < parameter_count(model.parameters())


def test_flap_first_layer_equals_prune_structured():
    """FLAP with compensation: layer 0's inputs are the embeddings either way, so its cut and bias agree."""
    model, cal = model4(), tokens(4, CAL_LEN)
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    first = prune_shape(ours, cal, BASE, {"channels": 0.5})[0].layers[0]
    assert first.removed == prune_structured(theirs, cal, axis_config(BASE, "channels", 0.5),
                                             progress=False).structure.layers[0].removed
    a, b = ours.model.layers[0].mlp.down_proj, theirs.model.layers[0].mlp.down_proj
    assert torch.equal(a.weight, b.weight) and torch.allclose(a.bias, b.bias, atol=1e-6)


def test_channels_are_scored_on_the_dense_model():
    """Every layer's FLAP cut and compensation bias from float64 statistics of down_proj's inputs, hooked on the
    dense model's own forward over the calibration windows."""
    model, cal = model4(), tokens(4, CAL_LEN)
    inputs = {}
    handles = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda module, args, i=i: inputs.setdefault(i, []).append(args[0].double().reshape(-1, args[0].shape[-1])))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=cal, use_cache=False)
    for handle in handles:
        handle.remove()
    pruned = copy.deepcopy(model)
    prune_shape(pruned, cal, BASE, {"channels": 0.5})
    for i, layer in enumerate(model.model.layers):
        z = torch.cat(inputs[i])
        weight = layer.mlp.down_proj.weight.double()
        score = z.var(0, unbiased=False) * weight.square().sum(0)
        kept = score.topk(64).indices.sort().values
        removed = torch.ones(128, dtype=torch.bool)
        removed[kept] = False
        down = pruned.model.layers[i].mlp.down_proj
        assert torch.equal(down.weight, layer.mlp.down_proj.weight[:, kept]), i
        assert torch.allclose(down.bias.double(), weight[:, removed] @ z.mean(0)[removed], atol=1e-5), i
        assert torch.equal(pruned.model.layers[i].mlp.gate_proj.weight, layer.mlp.gate_proj.weight[kept])


def test_skip_losses_and_influence_are_the_dense_models():
    model, cal = model4(), tokens(4, CAL_LEN)
    stats = dense_statistics(model, cal, BASE, ["layers"], skip_windows=3)
    assert stats.skip == pytest.approx(skip_losses(model, model.model.layers, cal[:3], 3), abs=1e-5)
    with torch.no_grad():
        states = model(input_ids=cal, output_hidden_states=True).hidden_states  # [-1]: after the final norm
    for i in range(3):
        x, y = states[i].reshape(-1, 64).double(), states[i + 1].reshape(-1, 64).double()
        assert stats.influence[i] == pytest.approx(float((1 - torch.cosine_similarity(x, y, -1)).mean()), rel=1e-5)
    assert (stats.passes, stats.skip_windows) == (1, 3)


def test_layer_sets_follow_their_rules():
    stats = dense_statistics(model4(), tokens(4, CAL_LEN), BASE, ["layers"])
    stats.influence, stats.skip = [0.3, 0.1, 0.2, 0.4], [0.1, 0.5, 0.4, 0.3]
    sets = dict((rule, removed) for rule, removed in layer_sets(stats, 2))
    assert sets == {"influence+block": [1, 2], "skip": [0, 3]}  # the same set is one candidate
    assert dict(layer_sets(stats, 1)) == {"influence": [1], "skip": [0], "block": [2]}


def test_without_drops_the_removed_layers_statistics():
    model, cal = model4(), tokens(4, CAL_LEN)
    stats = dense_statistics(model, cal, BASE, ["layers", "channels", "hidden"])
    fewer = stats.without([1, 2])
    assert fewer.layers == [0, 3] and fewer.influence == [stats.influence[0], stats.influence[3]]
    assert fewer.units == [stats.units[0], stats.units[3]]
    assert len(fewer.norms) == len(stats.norms) - 4  # two norms per Llama layer; the final norm stays
    assert torch.allclose(fewer.hidden_scores(), sum(s.sqrt() for layer, s in stats.norms if layer not in (1, 2)))


# ---- candidates that differ in which layers go -------------------------------------------------------------------

def test_a_layers_candidate_is_the_dense_model_with_those_layers_skipped():
    model, ids = model4(), tokens(2, VAL_LEN, seed=3)
    pruned = copy.deepcopy(model)
    record = prune_shape(pruned, tokens(4, CAL_LEN), BASE, {"layers": 0.5}, layers_removed=[1, 2])[0]
    assert record.removed_layers == [1, 2] and pruned.config.num_hidden_layers == 2
    with torch.no_grad(), skip_layer(model.model.layers[1]), skip_layer(model.model.layers[2]):
        expected = model(input_ids=ids, use_cache=False).logits
    with torch.no_grad():
        assert torch.allclose(pruned(input_ids=ids, use_cache=False).logits, expected, atol=1e-5)


@pytest.mark.parametrize("layers_removed,shape", [([1], {"layers": 0.5}), ([1, 1], {"layers": 0.5}),
                                                  ([0, 4], {"layers": 0.5}), ([1], {"channels": 0.5})])
def test_bad_layer_lists_are_refused(layers_removed, shape):
    with pytest.raises(LLMPruneError):
        prune_shape(model4(), tokens(4, CAL_LEN), BASE, shape, layers_removed=layers_removed)


def test_kl_is_zero_for_an_unpruned_copy_and_positive_once_pruned():
    model, val = model4(), tokens(2, VAL_LEN, seed=1)
    dense = dense_log_probs(model, val)
    assert kl_to_dense(copy.deepcopy(model), val, dense) == pytest.approx(0.0, abs=1e-7)
    pruned = copy.deepcopy(model)
    prune_shape(pruned, tokens(4, CAL_LEN), BASE, {"layers": 0.25}, layers_removed=[2])
    assert kl_to_dense(pruned, val, dense) > 1e-4


def test_scored_layer_sets_reproduce_their_kl():
    """Each layer set of a shape is its own candidate; pruned again from its record it has the same KL."""
    model, cal, val = model4(), tokens(4, CAL_LEN), tokens(2, VAL_LEN, seed=1)
    found = search_shapes(model, cal, val, BASE, ["layers", "channels"], 0.7 * parameter_count(model.parameters()),
                          limit=8)
    with_layers = [c for c in found if c.kl is not None and c.layers_removed is not None]
    shapes = {tuple(sorted(c.shape.items())) for c in with_layers}
    assert len(with_layers) > len(shapes)  # some shape scored with several layer sets
    assert all(c.layer_rule for c in with_layers)
    dense = dense_log_probs(model, val)
    for candidate in with_layers[:3]:
        pruned = copy.deepcopy(model)
        prune_shape(pruned, cal, BASE, candidate.shape, layers_removed=candidate.layers_removed)
        assert kl_to_dense(pruned, val, dense) == pytest.approx(candidate.kl, rel=1e-5)
        assert parameter_count(pruned.parameters()) == candidate.params


def test_search_command_records_the_pass_and_the_layer_sets(tmp_path, tiny_dir):
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join('{"text": "The quick brown fox jumps over the lazy dog number %d."}' % i
                              for i in range(300)))
    out = tmp_path / "search"
    assert main(["search", "--model", str(tiny_dir), "--calib", f"file:{text}", "--structure", "layers,channels",
                 "--target-params", "0.75", "--round-to", "4", "--nsamples", "2", "--seqlen", "16",
                 "--search-windows", "2", "--search-limit", "4", "--output", str(out), "--quiet"]) == 0
    table = json.loads((out / "candidates.json").read_text())
    assert table["statistics"]["statistics_passes"] == 1
    rules = {c["layer_rule"] for c in table["candidates"] if c["layers_removed"] is not None}
    assert rules and rules <= {"influence", "skip", "block", "influence+skip", "influence+block", "skip+block",
                               "influence+skip+block"}
    assert " by " in (out / "candidates.md").read_text()


def test_an_axis_without_any_shape_is_refused_naming_the_round_to():
    """A Llama whose config wants hidden sizes that are multiples of its head count (3 here) has no hidden width
    that is a multiple of 64 below 96: the search refuses in one line instead of searching without hidden."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmprune.pruning.structured.config import StructuredConfig
    from llmprune.pruning.structured.search import candidate_shapes

    model = LlamaForCausalLM(LlamaConfig(hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=3, num_key_value_heads=3, head_dim=32,
                                         vocab_size=64))
    with pytest.raises(LLMPruneError, match=r"multiples of 3\): use --round-to 24"):
        candidate_shapes(model, StructuredConfig(round_to=64), ["hidden", "channels"], 0.8 * 60_000)
