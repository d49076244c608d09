"""RIA, DSnoT, the ADMM update and gradual ADMM, and the sensitivity scan: hand-made tensors with hand-computed
masks, a float64 direct least-squares solve, and the runner on tiny models of every family."""

import copy
import math

import pytest
import torch

from llmprune import LLMPruneError, PruneConfig, prune
from llmprune.evaluation.perplexity import perplexity
from llmprune.inputs.models import linears
from llmprune.pruning.masks import row_mask
from llmprune.pruning.methods import LayerTarget
from llmprune.pruning.methods.admm import admm_gradual, admm_update
from llmprune.pruning.methods.dsnot import dsnot
from llmprune.pruning.methods.ria import ria
from llmprune.pruning.methods.wanda import wanda
from llmprune.pruning.scan import ScanTable, scan_allocation, scan_sensitivity, write_heatmap
from tiny_models import VOCAB, tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "opt", "gpt2", "gpt_neox", "gemma3"]
T, F = True, False


def tokens(n=6, seqlen=24, seed=0):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


# ---- RIA -------------------------------------------------------------------------------------------------

W_RIA = torch.tensor([[4.0, 1.0, 2.0, 1.0], [4.0, -3.0, 2.0, 1.0]])
NORMS_RIA = torch.tensor([1.0, 1.0, 4.0, 1.0])  # ||X_j||; RIA uses its square root


def test_ria_hand_computed_mask_differs_from_wanda():
    # column sums 8 4 4 2, row sums 8 10, sqrt(norms) 1 1 2 1:
    # row 0: (4/8+4/8, 1/4+1/8, (2/4+2/8)*2, 1/2+1/8) = (1, .375, 1.5, .625) -> prune inputs 1 and 3
    # row 1: (4/8+4/10, 3/4+3/10, (2/4+2/10)*2, 1/2+1/10) = (.9, 1.05, 1.4, .6) -> prune inputs 3 and 0
    new, keep = ria(W_RIA, NORMS_RIA, LayerTarget(0.5))
    assert keep.tolist() == [[T, F, T, F], [F, T, T, F]]
    assert torch.equal(new, W_RIA * keep)
    _, wanda_keep = wanda(W_RIA, NORMS_RIA, LayerTarget(0.5))  # |W| * ||X||: row 1 = (4, 3, 8, 1)
    assert wanda_keep[1].tolist() == [T, F, T, F]


def test_ria_alpha_zero_and_nm():
    # alpha 0: row 0 scores (1, .375, .75, .625) keep inputs 0 and 2; 2:4 on alpha .5 keeps the top two of each row
    assert ria(W_RIA, NORMS_RIA, LayerTarget(0.5), ria_alpha=0.0)[1][0].tolist() == [T, F, T, F]
    assert ria(W_RIA, NORMS_RIA, LayerTarget(0.5, (2, 4)))[1].tolist() == [[T, F, T, F], [F, T, T, F]]


def test_ria_column_sums_are_per_stacked_matrix():
    """q/k/v stacked share an input, not a column sum: a heavy second matrix must not change the first's mask."""
    heavy = torch.tensor([[1.0, 0.0, 30.0, 0.0], [1.0, 0.0, 30.0, 0.0]])
    stacked = torch.cat([W_RIA, heavy])
    _, keep = ria(stacked, NORMS_RIA, LayerTarget(0.5, segments=(2, 2)))
    assert keep[:2].tolist() == [[T, F, T, F], [F, T, T, F]]
    _, pooled = ria(stacked, NORMS_RIA, LayerTarget(0.5))  # pooled column sums 10 4 64 2:
    assert pooled[0].tolist() == [T, F, F, T]  # row 0: (.4+.5, .25+.125, (2/64+.25)*2, .5+.125)


def test_ria_zero_column_is_not_nan():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 3.0, 2.0, 1.0]])
    new, keep = ria(w, torch.ones(4), LayerTarget(0.5))
    assert torch.isfinite(new).all() and not keep[:, 0].any()


# ---- DSnoT -----------------------------------------------------------------------------------------------

# Row 0: Wanda (norms 1) prunes inputs 0-3; E[X] w = (.5 .6 .7 .8 | -.2 .3 -.4 .5), error 2.6.
#   cycle 1: grow the largest w E[X] / Var among 0-3: Var (1 2 1 4) -> (.5 .3 .7 .2): input 2; prune the
#            least-Wanda kept weight with a negative contribution: input 4 (|w| 2). error 2.6 - .7 - .2 = 1.7
#   cycle 2: grow input 0 (.5); prune input 6 (the last negative). error 1.7 - .5 - .4 = .8
#   cycle 3: no kept weight with a negative contribution is left: the row stops.
# Row 1: prunes 0-3, error .1+.2+.3+.4 = 1; grow input 2 (.3/1), prune input 4 (9 * -.1 = -.9):
#   1 - .3 - .9 = -.2 flips the sign, so the row stays as Wanda left it.
W_DSNOT = torch.tensor([[0.5, 0.6, 0.7, 0.8, 2.0, 3.0, -4.0, 5.0], [0.1, 0.2, 0.3, 0.4, 9.0, 7.0, 8.0, 9.5]])
MOMENTS = {"mean": torch.tensor([1.0, 1.0, 1.0, 1.0, -0.1, 0.1, 0.1, 0.1]),
           "variance": torch.tensor([1.0, 2.0, 1.0, 4.0, 1.0, 1.0, 1.0, 1.0]), "norms": torch.ones(8)}


def test_dsnot_hand_computed_swaps():
    new, keep = dsnot(W_DSNOT, MOMENTS, LayerTarget(0.5))
    assert keep.tolist() == [[T, F, T, F, F, T, F, T], [F, F, F, F, T, T, T, T]]
    assert torch.equal(new, W_DSNOT * keep)
    expected = [F, F, T, F, F, T, T, T]  # after the first swap only: input 2 kept, input 4 pruned
    assert dsnot(W_DSNOT, MOMENTS, LayerTarget(0.5), dsnot_cycles=1)[1][0].tolist() == expected
    assert dsnot(W_DSNOT, MOMENTS, LayerTarget(0.5), dsnot_threshold=2.0)[1][0].tolist() == expected  # 1.7 < 2
    assert dsnot(W_DSNOT, MOMENTS, LayerTarget(0.5), dsnot_cycles=0)[1].tolist() == [[F, F, F, F, T, T, T, T]] * 2


def test_dsnot_nm_swaps_within_groups():
    # 2:4, groups (0-3)(4-7); Wanda keeps 2,3 and 6,7; E[X] w = (.5 .6 .2 -.3 | .7 .8 .4 .5), error 2.6,
    # grow values (.5 .3 | .7 .2). cycle 1: grow 4, prune the least-Wanda kept of its group: 6 -> 2.3;
    # cycle 2: grow 0, prune 2 -> 2.0; cycle 3: grow 1, prune 3 -> 1.1; cycle 4: grow 5, prune 7 -> .8.
    w = torch.tensor([[0.5, 0.6, 2.0, -3.0, 0.7, 0.8, 4.0, 5.0]])
    moments = {"mean": torch.tensor([1.0, 1.0, 0.1, 0.1, 1.0, 1.0, 0.1, 0.1]),
               "variance": torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0, 4.0, 1.0, 1.0]), "norms": torch.ones(8)}
    target = LayerTarget(0.5, (2, 4))
    assert dsnot(w, moments, target, dsnot_cycles=2)[1].tolist() == [[T, F, F, T, T, F, F, T]]
    assert dsnot(w, moments, target)[1].tolist() == [[T, T, F, F, T, T, F, F]]


def test_dsnot_keeps_exact_counts_on_random_rows():
    torch.manual_seed(1)
    w = torch.randn(40, 64)
    moments = {"mean": torch.randn(64), "variance": torch.rand(64) + 0.1, "norms": torch.rand(64) + 0.5}
    _, keep = dsnot(w, moments, LayerTarget(0.6), dsnot_threshold=0.0)
    assert (keep.sum(1) == 64 - round(64 * 0.6)).all()
    wanda_keep = row_mask(w.abs() * moments["norms"], 0.6)
    assert not torch.equal(keep, wanda_keep)  # it did swap
    error = lambda k: ((w * moments["mean"]) * ~k).sum(1).abs()
    assert (error(keep) <= error(wanda_keep) + 1e-6).all()  # never worse in expected output, row by row
    _, keep_nm = dsnot(w, moments, LayerTarget(0.5, (2, 4)), dsnot_threshold=0.0)
    assert (keep_nm.view(40, -1, 4).sum(-1) == 2).all()


# ---- ADMM ------------------------------------------------------------------------------------------------

def layer_problem(rows=6, features=24, tokens_=256, seed=0):
    """A float64 layer with correlated, off-centre inputs, its 2/n X^T X, and a Wanda mask."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens_, features, generator=g, dtype=torch.float64)
         @ torch.randn(features, features, generator=g, dtype=torch.float64) * 0.5
         + torch.randn(features, generator=g, dtype=torch.float64))
    w = torch.randn(rows, features, generator=g, dtype=torch.float64)
    keep = row_mask(w.abs() * x.norm(dim=0), 0.5)
    return x, w, 2 / tokens_ * x.T @ x, keep


def least_squares(x, w, keep):
    """Per row, the kept weights that best reproduce the dense row's outputs: lstsq on X's kept columns."""
    out = torch.zeros_like(w)
    for i in range(w.shape[0]):
        out[i, keep[i]] = torch.linalg.lstsq(x[:, keep[i]], x @ w[i]).solution
    return out


def test_admm_converges_to_the_exact_least_squares_solution():
    x, w, hessian, keep = layer_problem()
    exact = least_squares(x, w, keep)
    got = admm_update(w, hessian, keep, admm_iterations=600, admm_damp=0.0)
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-9)
    assert (got[~keep] == 0).all()


def test_admm_damped_solution_and_default_iterations():
    """admm_damp is a ridge towards the dense row, weighted by diag H: the exact minimiser of
    (w' - w) (H + damp diag H) (w' - w)^T on the mask, solved directly; 20 iterations get close to it."""
    x, w, hessian, keep = layer_problem(seed=1)
    damped = hessian + 0.1 * torch.diag(torch.diag(hessian))
    exact = torch.zeros_like(w)
    for i in range(w.shape[0]):
        s = keep[i]
        exact[i, s] = torch.linalg.solve(damped[s][:, s], (w[i] @ damped)[s])
    torch.testing.assert_close(admm_update(w, hessian, keep, admm_iterations=400), exact, rtol=0, atol=1e-9)
    loss = lambda v: float(((x @ (w - v).T) ** 2).sum())
    start, best, default = loss(w * keep), loss(exact), loss(admm_update(w, hessian, keep))
    assert default - best < 0.01 * (start - best)


def test_admm_float32_zero_off_mask_and_dead_input():
    x, w, hessian, keep = layer_problem(seed=2)
    x[:, 3] = 0  # an input never seen in calibration
    hessian = (2 / x.shape[0] * x.T @ x).float()
    got = admm_update(w.float(), hessian, keep)
    assert got.dtype == torch.float32 and torch.isfinite(got).all() and (got[~keep] == 0).all()
    assert float(((x.float() @ (w.float() - got).T) ** 2).sum()) < float(((x.float() @ (w.float() * ~keep).T) ** 2).sum())


def test_admm_gradual_patterns_and_beats_its_fixed_wanda_mask():
    x, w, hessian, _ = layer_problem(seed=3, features=32)
    loss = lambda v: float(((x @ (w - v).T) ** 2).sum())
    new, keep = admm_gradual(w, hessian, LayerTarget(0.5))
    assert (keep.sum(1) == 16).all() and (new[~keep] == 0).all()
    wanda_keep = row_mask(w.abs() * x.norm(dim=0), 0.5)
    assert loss(new) < loss(admm_update(w, hessian, wanda_keep))  # the mask chosen on updated weights pays
    new, keep = admm_gradual(w, hessian, LayerTarget(0.5, (2, 4)))
    assert (keep.view(w.shape[0], -1, 4).sum(-1) == 2).all() and (new[~keep] == 0).all()
    with pytest.raises(LLMPruneError, match="admm-gradual-steps"):
        admm_gradual(w, hessian, LayerTarget(0.5), admm_iterations=5, admm_gradual_steps=10)


# ---- the runner, every family ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_new_methods_in_the_runner(family, pattern):
    """The runner verifies every mask (exact per-row count, or N:M) and that the update leaves zeros off it."""
    ids = tokens()
    for method, update in [("ria", "none"), ("dsnot", "none"), ("admm", "none"), ("wanda", "admm"), ("ria", "admm")]:
        model = tiny_model(family)
        report = prune(model, ids, PruneConfig(method=method, pattern=pattern, update=update, batch_size=4),
                       progress=False)
        assert report.achieved_sparsity == pytest.approx(0.5, abs=2e-3), (method, update)


@torch.inference_mode()
def test_admm_update_brings_the_model_closer_to_dense():
    ids = tokens(n=8, seqlen=32)
    dense = tiny_model("llama")(ids).logits
    errors = {}
    for update in ("none", "admm"):
        model = tiny_model("llama")
        prune(model, ids, PruneConfig(method="wanda", sparsity=0.6, update=update), progress=False)
        errors[update] = float((model(ids).logits - dense).square().mean())
    assert errors["admm"] < 0.7 * errors["none"]


@torch.inference_mode()
def test_skipping_a_whole_layer_still_feeds_the_next():
    """With layer 0 kept dense by --skip, layer 1 is pruned from the dense model's layer-1 inputs."""
    model = tiny_model("llama")
    ids = tokens(n=7)
    seen = {}
    q = model.model.layers[1].self_attn.q_proj
    hook = q.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    model(ids)
    hook.remove()
    expected = q.weight * row_mask(q.weight.abs() * seen["x"].reshape(-1, q.in_features).norm(dim=0), 0.5)
    dense0 = copy.deepcopy(model.model.layers[0].state_dict())
    prune(model, ids, PruneConfig(method="wanda", skip=r"layers\.0\."), progress=False)
    torch.testing.assert_close(q.weight, expected, rtol=0, atol=0)
    assert all(torch.equal(v, model.model.layers[0].state_dict()[k]) for k, v in dense0.items())


# ---- the scan --------------------------------------------------------------------------------------------

def hand_table():
    # increases over dense, per unit of sparsity on [.5, .7]: layer 0 (.3-.1)/.2 = 1 over 100 params,
    # layer 1 (2-1)/.2 = 5 over 100, layer 2 (.7-.2)/.2 = 2.5 over 200: per parameter .01, .05, .0125.
    return ScanTable("wanda", "layer", ["0", "1", "2"], [0.5, 0.7], 1.0,
                     [[1.1, 1.3], [2.0, 3.0], [1.2, 1.7]], [100, 100, 200])


def test_scan_allocation_by_hand():
    # budget above .5 everywhere: .1 * 400 = 40 parameters: layer 0 first (to .7: 20), then layer 2 (20 -> .6)
    sparsity = scan_allocation(hand_table(), 0.6, max_shift=0.1)
    assert sparsity == pytest.approx([0.7, 0.5, 0.6], abs=1e-12)
    assert scan_allocation(hand_table(), 0.6, max_shift=0.0) == pytest.approx([0.6] * 3, abs=1e-12)


@pytest.mark.parametrize("target,shift", [(0.7, 0.1), (0.55, 0.3), (0.05, 0.2), (0.93, 0.2)])
def test_scan_allocation_weighted_mean_exact_and_in_range(target, shift):
    torch.manual_seed(0)
    sizes = [int(s) for s in torch.randint(50, 5000, (12,))]
    loss = (1 + torch.rand(12, 3).cumsum(1)).tolist()
    table = ScanTable("ria", "layer", [str(i) for i in range(12)], [0.4, 0.6, 0.8], 1.0, loss, sizes)
    sparsity = scan_allocation(table, target, max_shift=shift)
    assert sum(s * n for s, n in zip(sparsity, sizes)) / sum(sizes) == pytest.approx(target, abs=1e-12)
    assert all(max(0, target - shift) - 1e-12 <= s <= min(0.99, target + shift) + 1e-12 for s in sparsity)


def test_scan_allocation_errors():
    table = hand_table()
    with pytest.raises(LLMPruneError, match="3 layers but the model has 2"):
        scan_allocation(table, 0.6, sizes=[1, 2])
    with pytest.raises(LLMPruneError, match="narrow --skip"):
        scan_allocation(table, 0.6, sizes=[1, 0, 2])
    with pytest.raises(LLMPruneError, match="must be in"):
        scan_allocation(table, 1.0)
    table.by = "linear"
    with pytest.raises(LLMPruneError, match="scan by layer"):
        scan_allocation(table, 0.6)


def test_scan_sensitivity_on_a_tiny_model(tmp_path):
    model = tiny_model("llama")
    dense = copy.deepcopy(model.state_dict())
    calibration, windows = tokens(), tokens(n=3, seed=1)
    table = scan_sensitivity(model, calibration, windows, PruneConfig(method="wanda"), [0.5, 0.8], progress=False)
    assert table.units == ["0", "1", "2"] and len(table.loss) == 3 and len(table.loss[0]) == 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense.items())  # left dense
    assert table.dense_loss == pytest.approx(math.log(perplexity(model, windows, progress=False)))
    assert table.sizes[0] == sum(m.weight.numel() for m in linears(model.model.layers[0]).values())
    # the cell for layer 1 at 0.8: the same as pruning with a hand-written --skip of layers 0 and 2
    prune(model, calibration, PruneConfig(method="wanda", sparsity=0.8, skip=r"layers\.[02]\."), progress=False)
    assert table.loss[1][1] == pytest.approx(math.log(perplexity(model, windows, progress=False)), rel=1e-6)
    model.load_state_dict(dense)
    by_linear = scan_sensitivity(model, calibration, windows, PruneConfig(method="ria", skip="down_proj"), [0.5],
                                 by="linear", progress=False)
    assert by_linear.units == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                               "mlp.gate_proj", "mlp.up_proj"]
    table.save(tmp_path / "scan.json")
    assert ScanTable.load(tmp_path / "scan.json") == table
    write_heatmap(table, tmp_path / "scan.png")
    assert (tmp_path / "scan.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 1 |" in table.to_markdown()
