"""The layer-by-layer runner against the full model's own forward, on tiny random models of several families."""

import copy

import pytest
import torch

from llmprune import PruneConfig, prune
from llmprune.errors import LLMPruneError
from llmprune.pruning.masks import row_mask
from llmprune.pruning.registry import OwlConfig
from llmprune.inputs.models import decoder_layers, linears, weight_matrix
from llmprune.pruning.runner import capture_layer_calls, collect_statistics, propagate
from tiny_models import FINAL_NORM, VOCAB, tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "opt", "gpt2", "gpt_neox", "gemma3"]


def tokens(n=6, seqlen=24, seed=0):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_replay_reproduces_full_forward(family):
    """Layer 0's captured inputs, replayed with each layer's own arguments, give the model's hidden states."""
    model = tiny_model(family)
    ids = tokens()
    expected = model(ids, output_hidden_states=True).hidden_states
    _, layers = decoder_layers(model)
    calls = capture_layer_calls(model, layers, ids, batch_size=4, device=torch.device("cpu"), progress=False)
    torch.testing.assert_close(calls.hidden, expected[0], rtol=0, atol=0)
    for i, layer in enumerate(layers):
        propagate(layer, i, calls)
        got = calls.hidden if i + 1 < len(layers) else model.get_submodule(FINAL_NORM[family])(calls.hidden)
        torch.testing.assert_close(got, expected[i + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sparsity_zero_changes_nothing(family, method):
    model = tiny_model(family)
    before = copy.deepcopy(model.state_dict())
    report = prune(model, tokens(), PruneConfig(method=method, sparsity=0.0, batch_size=4), progress=False)
    assert report.achieved_sparsity < 0.01  # only weights that were already zero
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def dense_linears(model):
    _, layers = decoder_layers(model)
    return [weight_matrix(module).clone() for layer in layers for module in linears(layer).values()]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_pruned_to_target(family):
    model = tiny_model(family)
    dense = dense_linears(model)
    report = prune(model, tokens(), PruneConfig(method="wanda", sparsity=0.5, batch_size=4), progress=False)
    pruned = dense_linears(model)
    assert len(report.layers) == len(pruned) == len(dense)
    for w, before in zip(pruned, dense):
        assert ((w == 0).sum(1) == w.shape[1] // 2).all()  # every row loses exactly half, no more
        assert torch.equal(w, before * (w != 0))  # Wanda only masks: what it keeps is untouched
    assert report.achieved_sparsity == pytest.approx(0.5, abs=1e-3)


def test_wanda_layer0_matches_hand_computed_statistics():
    """The hooks' ||X_j|| (shared by q/k/v, early-stopped forward, batched) equal norms taken from the full
    dense forward, so layer 0's masks equal a direct |W| * ||X|| row selection."""
    model = tiny_model("llama")
    ids = tokens(n=7)
    inputs = {}
    attn = model.model.layers[0].self_attn
    mlp = model.model.layers[0].mlp
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0]))
             for n, m in [("qkv", attn.q_proj), ("o", attn.o_proj), ("gate", mlp.gate_proj), ("down", mlp.down_proj)]]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    expected = {}
    for key, modules in [("qkv", [attn.q_proj, attn.k_proj, attn.v_proj]), ("o", [attn.o_proj]),
                         ("gate", [mlp.gate_proj, mlp.up_proj]), ("down", [mlp.down_proj])]:
        norms = inputs[key].reshape(-1, inputs[key].shape[-1]).norm(dim=0)
        expected.update({m: m.weight * row_mask(m.weight.abs() * norms, 0.5) for m in modules})
    prune(model, ids, PruneConfig(method="wanda", sparsity=0.5, batch_size=3), progress=False)
    for module, weight in expected.items():
        torch.testing.assert_close(module.weight, weight, rtol=0, atol=0)


def test_linears_sharing_an_input_share_one_statistic():
    model = tiny_model("llama")
    _, layers = decoder_layers(model)
    calls = capture_layer_calls(model, layers, tokens(), 2, torch.device("cpu"), False)
    targets = {f"l.{n}": m for n, m in linears(layers[0]).items()}
    with torch.inference_mode():
        stats = collect_statistics(layers[0], 0, calls, targets, ("hessian",))
    q, k, v = (stats[f"l.self_attn.{p}_proj"] for p in "qkv")
    assert q is k is v
    assert stats["l.mlp.gate_proj"] is stats["l.mlp.up_proj"]
    assert stats["l.self_attn.o_proj"] is not q and stats["l.mlp.down_proj"]["hessian"].shape == (128, 128)


def test_batch_size_does_not_change_the_result():
    results = []
    for batch_size in (1, 4):
        model = tiny_model("llama")
        prune(model, tokens(), PruneConfig(method="sparsegpt", sparsity=0.5, batch_size=batch_size), progress=False)
        results.append(model.state_dict())
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-4, atol=1e-5)


def test_same_seed_same_mask_and_skip_keeps_dense():
    masks = []
    for _ in range(2):
        model = tiny_model("llama")
        prune(model, tokens(), PruneConfig(method="wanda", sparsity=0.6, skip=r"mlp\.down_proj"), progress=False)
        masks.append([(m.weight == 0) for m in model.modules() if isinstance(m, torch.nn.Linear)])
        dense = tiny_model("llama")
        for layer, original in zip(model.model.layers, dense.model.layers):
            assert torch.equal(layer.mlp.down_proj.weight, original.mlp.down_proj.weight)
        assert torch.equal(model.lm_head.weight, dense.lm_head.weight)
    assert all(torch.equal(a, b) for a, b in zip(*masks))


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_pattern_exact_in_model(method, pattern):
    model = tiny_model("llama")
    dense = dense_linears(model)
    prune(model, tokens(), PruneConfig(method=method, pattern=pattern), progress=False)
    n, m = map(int, pattern.split(":"))
    for w, before in zip(dense_linears(model), dense):
        assert ((w != 0).view(w.shape[0], -1, m).sum(-1) == n).all()  # exactly N kept in every group
        if method == "sparsegpt":  # its OBS updates move the kept weights
            assert not torch.equal(w, before * (w != 0))
        else:
            assert torch.equal(w, before * (w != 0))


@pytest.mark.parametrize("compare", ["matrix", "row"])
def test_sparsegpt_comparison_group_in_model(compare):
    """--sparsegpt-compare row: every row of every linear loses exactly its share, which the runner's own check
    accepts at a sparsity whose blocks round unevenly; the paper's group leaves rows unequal."""
    model = tiny_model("llama")
    prune(model, tokens(), PruneConfig(method="sparsegpt", sparsity=0.7, batch_size=4,
                                       method_config={"sparsegpt_compare": compare}), progress=False)
    rows_equal = [bool(((w == 0).sum(1) == round(w.shape[1] * 0.7)).all()) for w in dense_linears(model)]
    assert all(rows_equal) if compare == "row" else not all(rows_equal)


def test_nm_width_not_divisible_is_an_error():
    model = tiny_model("llama", intermediate=132)  # down_proj reads 132 inputs
    with pytest.raises(LLMPruneError, match="down_proj has 132 inputs, not divisible by M=8"):
        prune(model, tokens(), PruneConfig(method="wanda", pattern="4:8"), progress=False)


def test_nan_weight_is_an_error():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(LLMPruneError, match="up_proj has NaN"):
        prune(model, tokens(), PruneConfig(method="wanda"), progress=False)


def test_owl_gives_the_outlier_layer_lower_sparsity():
    model = tiny_model("llama", layers=4, hidden=128)
    with torch.no_grad():  # plant large weights in a few input columns of layer 2: Wanda-score outliers
        for module in linears(model.model.layers[2]).values():
            module.weight[:, :3] *= 40
    report = prune(model, tokens(n=8, seqlen=32),
                   PruneConfig(method="wanda", sparsity=0.7, allocation="owl",
                               allocation_config=OwlConfig(owl_lambda=0.08)), progress=False)
    sparsities = report.layer_sparsity
    assert sparsities[2] == min(sparsities) and sparsities[2] < 0.7 - 0.05
    sizes = [sum(m.weight.numel() for m in linears(layer).values()) for layer in model.model.layers]
    assert sum(s * n for s, n in zip(sparsities, sizes)) / sum(sizes) == pytest.approx(0.7, abs=1e-9)
    assert report.achieved_sparsity == pytest.approx(0.7, abs=1e-3)


def test_a_method_that_misses_the_pattern_is_caught(monkeypatch):
    """The runner verifies every mask: a method pruning one weight too few is an error, not a quiet result."""
    from llmprune.pruning.methods.magnitude import magnitude
    from llmprune.pruning.registry import HANDLERS, MagnitudeConfig

    def off_by_one(weight, statistic, target):
        new, keep = magnitude(weight, statistic, target)
        keep[0, keep[0].logical_not().nonzero()[0]] = True  # restore one pruned weight
        return new, keep

    monkeypatch.setitem(HANDLERS, MagnitudeConfig, off_by_one)
    with pytest.raises(LLMPruneError, match="internal error: .*q_proj"):
        prune(tiny_model("llama"), None, PruneConfig(method="magnitude"), progress=False)
