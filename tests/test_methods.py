"""The pruning methods and masks on hand-made and small random tensors, against independent computations."""

import pytest
import torch

from llmprune.config import prune_config_from
from llmprune.pruning.masks import nm_mask, row_mask
from llmprune.pruning.methods import LayerTarget, get_method
from llmprune.pruning.methods.sparsegpt import inverse_hessian_factor, reverse_in_place, upper_triangular_inverse_


def run(method, weight, statistic, segments=(), **config):
    cfg = prune_config_from({"method": method, **config})  # knobs by name, as the flags give them
    return get_method(method).fn(weight, statistic, LayerTarget(cfg.sparsity, cfg.nm, tuple(segments)),
                                 **cfg.method_config.knobs())


def test_wanda_and_magnitude_choose_differently():
    weight = torch.tensor([[1.0, -2.0, 3.0, 4.0], [4.0, 3.0, -2.0, 1.0]])
    norms = torch.tensor([10.0, 1.0, 1.0, 0.1])  # the first input is loud, the last one nearly silent
    _, keep_magnitude = run("magnitude", weight, None, sparsity=0.5)
    _, keep_wanda = run("wanda", weight, norms, sparsity=0.5)
    # magnitude drops the smallest |W| of each row; wanda the smallest |W| * ||X||: [10, 2, 3, .4], [40, 3, 2, .1]
    assert keep_magnitude.tolist() == [[False, False, True, True], [True, True, False, False]]
    assert keep_wanda.tolist() == [[True, False, True, False], [True, True, False, False]]
    new, _ = run("wanda", weight, norms, sparsity=0.5)
    assert new.tolist() == [[1.0, 0.0, 3.0, 0.0], [4.0, 3.0, 0.0, 0.0]]


def test_ties_break_by_position():
    scores = torch.ones(2, 8)
    assert row_mask(scores, 0.5).tolist() == [[False] * 4 + [True] * 4] * 2
    assert nm_mask(scores, 2, 4).tolist() == [[False, False, True, True] * 2] * 2


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_masks_exact(n, m):
    keep = nm_mask(torch.randn(32, 64, generator=torch.Generator().manual_seed(0)), n, m)
    assert (keep.view(32, -1, m).sum(-1) == n).all()


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.7, 0.93])
def test_row_mask_exact(sparsity):
    scores = torch.randn(16, 100, generator=torch.Generator().manual_seed(1))
    keep = row_mask(scores, sparsity)
    pruned = round(100 * sparsity)
    assert ((~keep).sum(1) == pruned).all()
    # the pruned ones are exactly the lowest scores of their row
    assert (scores[~keep].view(16, pruned).max(1).values <= scores[keep].view(16, -1).min(1).values).all()


def layer_problem(rows=16, cols=24, tokens=256, seed=0, coupling=1.0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    mixing = torch.randn(cols, cols, generator=g) / cols**0.5  # correlated inputs: where OBS updates pay off
    x = torch.randn(tokens, cols, generator=g) @ (torch.eye(cols) + coupling * mixing)
    return weight, x, 2 / tokens * x.t() @ x


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(pattern):
    weight, x, hessian = layer_problem()
    norms = x.norm(dim=0)
    error = {}
    for method, stat in [("magnitude", None), ("wanda", norms), ("sparsegpt", hessian)]:
        knobs = {"blocksize": 8} if method == "sparsegpt" else {}
        new, keep = run(method, weight, stat, sparsity=None if pattern != "unstructured" else 0.5,
                        pattern=pattern, **knobs)
        assert (~keep).sum() == weight.numel() // 2  # the same mask budget for all three
        assert (new[~keep] == 0).all()
        error[method] = float(((x @ weight.t() - x @ new.t()) ** 2).sum())
    assert error["sparsegpt"] < error["wanda"] and error["sparsegpt"] < error["magnitude"]


def test_sparsegpt_single_column_matches_closed_form_obs_update():
    """Pruning only w_0 of a 1-row problem: w' = w - (w_0 / [H^-1]_00) H^-1 e_0 (H damped as configured)."""
    _, _, hessian = layer_problem(rows=1, cols=8, seed=3)
    weight = torch.tensor([[0.01, 2.0, -1.5, 1.0, 3.0, -2.5, 1.2, 2.2]])  # w_0 is by far the cheapest to drop
    new, keep = run("sparsegpt", weight, hessian, sparsity=1 / 8, blocksize=8, percdamp=0.01)
    h = hessian.double()
    h_inv = torch.linalg.inv(h + 0.01 * torch.diag(h).mean() * torch.eye(8, dtype=torch.float64))
    expected = weight.double()[0] - weight[0, 0] / h_inv[0, 0] * h_inv[:, 0]
    assert keep.tolist() == [[False] + [True] * 7]
    assert new[0, 0] == 0
    torch.testing.assert_close(new[0].double(), expected, rtol=1e-5, atol=1e-6)


def obs_reference(weight, hessian, sparsity, percdamp=0.01):
    """SparseGPT over one block of every column, in float64 by the textbook route (explicit inverse, then its upper
    Cholesky factor), each row pruning its lowest w^2 / U_jj^2 chosen once on the original weights, then the
    column-by-column OBS update: an independent computation of the row comparison group."""
    h = hessian.double()
    h = h + percdamp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    w = weight.double().clone()
    rows, cols = w.shape
    scores = w**2 / u.diagonal() ** 2
    count = round(cols * sparsity)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for r in range(rows):
        keep[r, scores[r].argsort()[:count]] = False
    for j in range(cols):
        error = torch.where(keep[:, j], 0.0, w[:, j] / u[j, j])
        w[:, j:] -= error[:, None] * u[j, j:][None, :]
    return w * keep, keep


def test_sparsegpt_row_comparison_matches_a_float64_reference():
    weight, _, hessian = layer_problem(rows=12, cols=16, seed=5)
    new, keep = run("sparsegpt", weight, hessian, sparsity=0.5, blocksize=16, sparsegpt_compare="row")
    expected, expected_keep = obs_reference(weight, hessian, 0.5)
    assert torch.equal(keep, expected_keep)
    torch.testing.assert_close(new.double(), expected, rtol=1e-4, atol=1e-5)
    _, matrix_keep = run("sparsegpt", weight, hessian, sparsity=0.5, blocksize=16)
    assert not (matrix_keep.sum(1) == 8).all()  # the paper's group lets rows lose unequal shares: a real choice


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_sparsegpt_row_comparison_prunes_every_row_exactly_over_ragged_blocks(sparsity):
    """24 columns in blocks of 8 (0.7 x 8 = 5.6 a block): the cumulative rounding gives each row, stacked
    segments or not, exactly round(24 x sparsity) pruned weights."""
    weight, _, hessian = layer_problem(rows=20, cols=24)
    new, keep = run("sparsegpt", weight, hessian, segments=[12, 4, 4], sparsity=sparsity, blocksize=8,
                    sparsegpt_compare="row")
    assert ((~keep).sum(1) == round(24 * sparsity)).all()
    assert (new[~keep] == 0).all()


def test_sparsegpt_nothing_pruned_changes_nothing():
    weight, _, hessian = layer_problem()
    new, keep = run("sparsegpt", weight, hessian, sparsity=0.0)
    assert keep.all() and torch.equal(new, weight)


def test_sparsegpt_stacked_segments_prune_each_matrix_exactly():
    """q/k/v stacked on one Hessian: each stacked matrix loses exactly its own share."""
    weight, _, hessian = layer_problem(rows=20, cols=24)
    new, keep = run("sparsegpt", weight, hessian, segments=[12, 4, 4], sparsity=0.6, blocksize=8)
    assert [int((~k).sum()) for k in keep.split([12, 4, 4])] == [round(12 * 24 * 0.6), round(4 * 24 * 0.6),
                                                              round(4 * 24 * 0.6)]


def test_inverse_hessian_factor_retries_with_more_damping():
    singular = torch.zeros(4, 4)
    singular[0, 0] = 1.0
    singular[1, 1] = 1.0
    singular[2, 3] = singular[3, 2] = 5.0  # diag 0 on 2, 3 is "dead"; the off-diagonal makes it indefinite
    with pytest.warns(UserWarning, match="retrying"):
        upper = inverse_hessian_factor(singular, percdamp=0.01)
    assert torch.isfinite(upper).all() and torch.equal(upper, upper.triu())


@pytest.mark.parametrize("features", [40, 300])  # below and above the size at which panels start
def test_hessian_statistic_equals_float64_product(features):
    """The upper-triangle panels, held packed and then mirrored, give 2/n X^T X over every batch, exactly
    symmetric."""
    from llmprune.pruning.statistics import Hessian

    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(2, 50, features, generator=generator) * torch.linspace(0.1, 4, features)
               for _ in range(3)]
    statistic = Hessian(features, torch.device("cpu"))
    for batch in batches:
        statistic.add(batch)
    held = sum(t.numel() for t in vars(statistic).values() if isinstance(t, torch.Tensor))
    assert held <= (features**2 if features < 256 else 0.63 * features**2)  # the upper panels only, while summing
    hessian = statistic.finalize()
    x = torch.cat([b.reshape(-1, features) for b in batches]).double()
    exact = 2 / x.shape[0] * x.T @ x
    assert torch.equal(hessian, hessian.T)
    assert float((hessian.double() - exact).norm() / exact.norm()) < 1e-6


def test_hessian_sums_over_processes_keep_their_shape():
    """reduce_statistic sums the packed panels and the token count, not the fixed width: two processes that saw
    the same batches give the one process's Hessian (sums and tokens both doubled)."""
    from llmprune.pruning.statistics import Hessian, reduce_statistic

    x = torch.randn(3, 40, 300, generator=torch.Generator().manual_seed(5))
    alone, shared = Hessian(300, torch.device("cpu")), Hessian(300, torch.device("cpu"))
    for statistic in (alone, shared):
        statistic.add(x)
    reduce_statistic(shared, lambda tensor: tensor.mul_(2))  # the all-reduce of two equal ranks
    assert shared.tokens == 240
    torch.testing.assert_close(shared.finalize(), alone.finalize(), rtol=0, atol=0)


def test_inverse_hessian_factor_against_float64_inverse():
    """U is upper triangular with U^T U = (H + damp I)^-1, damp = 1% of the mean diagonal, a dead input's
    diagonal set to 1 first; checked against a float64 solve, a different route."""
    x = torch.randn(500, 64, generator=torch.Generator().manual_seed(4)) * torch.linspace(0.05, 3, 64)
    x[:, 7] = 0  # an input never seen: its row and column of H are zero
    hessian = 2 / 500 * x.T @ x
    damped = hessian.double().clone()
    damped[7, 7] = 1.0
    damped += 0.01 * damped.diagonal().mean() * torch.eye(64, dtype=torch.float64)
    upper = inverse_hessian_factor(hessian, percdamp=0.01).double()
    assert torch.equal(upper, upper.triu()) and bool((upper.diagonal() > 0).all())
    inverse = torch.linalg.solve(damped, torch.eye(64, dtype=torch.float64))
    assert float((upper.T @ upper - inverse).norm() / inverse.norm()) < 1e-5


@pytest.mark.parametrize("n", [5, 8, 67])
def test_upper_triangular_inverse_against_float64_inverse(n):
    """The blockwise inverse of an upper triangular matrix (fewer columns than blocks, an exact multiple, a
    ragged last block), written over the matrix, equals float64's general inverse and is upper triangular with
    exact zeros below."""
    generator = torch.Generator().manual_seed(n)
    upper = torch.randn(n, n, generator=generator).triu() / n**0.5 + torch.eye(n) * 2
    expected = torch.linalg.inv(upper.double())
    inverse = upper_triangular_inverse_(upper)
    assert inverse.data_ptr() == upper.data_ptr()  # in place: no second n x n matrix
    assert torch.equal(inverse, inverse.triu())
    assert float((inverse.double() - expected).norm() / expected.norm()) < 1e-6


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (5, 5), (6, 6)])
@pytest.mark.parametrize("chunk", [1, 4, 1 << 20])
def test_reverse_in_place_is_flip_of_both_axes(shape, chunk):
    """Odd and even sizes (a middle element that stays), chunks smaller than, across and larger than half."""
    matrix = torch.arange(shape[0] * shape[1], dtype=torch.float32).view(shape)
    expected = matrix.flip(0, 1)
    reverse_in_place(matrix, chunk=chunk)
    assert torch.equal(matrix, expected)


@pytest.mark.parametrize("levels", [3, 1000])
def test_selection_equals_a_stable_sort(levels):
    """The linear-time selection prunes exactly what a stable sort would: the lowest, ties by position."""
    from llmprune.pruning.masks import _prune_lowest

    scores = torch.randint(0, levels, (64, 96), generator=torch.Generator().manual_seed(2)).float()
    for count in (1, 17, 48, 95):
        expected = torch.ones_like(scores, dtype=torch.bool)
        expected.scatter_(-1, torch.sort(scores, dim=-1, stable=True).indices[:, :count], False)
        assert torch.equal(_prune_lowest(scores, count), expected)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_mask_equals_a_stable_sort_per_group(n, m):
    scores = torch.randint(0, 3, (16, 8 * m), generator=torch.Generator().manual_seed(5)).float()  # many ties
    grouped = scores.view(16, -1, m)
    expected = torch.ones_like(grouped, dtype=torch.bool)
    expected.scatter_(-1, torch.sort(grouped, dim=-1, stable=True).indices[..., : m - n], False)
    assert torch.equal(nm_mask(scores, n, m), expected.view(16, -1))


# ---------------------------------------------------------------- SparseGPT against the paper's algorithm


def paper_sparsegpt(weight, hessian, sparsity=0.5, nm=None, segments=None, blocksize=32, percdamp=0.01):
    """Algorithm 1 of Frantar & Alistarh (2023), in float64, with none of the lazy batching.

    Every column j is handled as one OBS step over the columns not processed yet, F = {j, ..., cols-1},
    with their inverse Hessian taken directly, inv(H[F, F]) (the paper's Cholesky factor U of H^-1 holds
    the same numbers: [U]_jj^2 = inv(H[F, F])_00 and U_jj * U[j, F] = inv(H[F, F])_0,:):
      - pruning w_j moves the rest by -w_j / [H_F^-1]_00 * [H_F^-1]_0,:, applied at once to ALL of F;
      - a weight's saliency is w^2 / [H_F^-1]_00, i.e. the paper's w^2 / [Hinv]_cc^2;
      - unstructured: at the start of every block of `blocksize` columns, each stacked matrix prunes the
        lowest saliencies of its block (adaptive mask selection), its count spread so that each matrix
        loses round(rows * cols * sparsity) in all (cumulative rounding, halves up);
      - N:M: at the start of every group of M columns, each row keeps its N most salient weights,
        judged on the weights as updated so far.
    H is damped by percdamp * mean(diag H), as in the paper's reference implementation.
    """
    w = weight.double().clone()
    rows, cols = w.shape
    h = hessian.double()
    h = h + percdamp * h.diag().mean() * torch.eye(cols, dtype=torch.float64)
    remaining_inverse = [torch.linalg.inv(h[j:, j:]) for j in range(cols)]
    inverse_diag = torch.tensor([inverse[0, 0] for inverse in remaining_inverse], dtype=torch.float64)
    segments = list(segments or [rows])
    keep = torch.ones(rows, cols, dtype=torch.bool)

    def total_pruned(count):  # round half up
        return int(count * sparsity + 0.5)

    for j in range(cols):
        if nm is None and j % blocksize == 0:
            end = min(j + blocksize, cols)
            saliency = w[:, j:end] ** 2 / inverse_diag[j:end]
            top = 0
            for size in segments:
                count = total_pruned(size * end) - total_pruned(size * j)
                flat = keep[top : top + size, j:end].clone().view(-1)
                flat[saliency[top : top + size].flatten().argsort()[:count]] = False
                keep[top : top + size, j:end] = flat.view(size, end - j)
                top += size
        if nm is not None and j % nm[1] == 0:
            n, m = nm
            saliency = w[:, j : j + m] ** 2 / inverse_diag[j : j + m]
            dropped = saliency.argsort(dim=1)[:, : m - n]
            keep[:, j : j + m] = torch.ones(rows, m, dtype=torch.bool).scatter_(1, dropped, False)
        inverse = remaining_inverse[j]
        pruned_part = torch.where(keep[:, j], 0.0, w[:, j])
        w[:, j:] -= torch.outer(pruned_part / inverse[0, 0], inverse[0])
        w[~keep[:, j], j] = 0.0  # what the update computes up to rounding
    return w, keep


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
@pytest.mark.parametrize("case", [
    dict(sparsity=0.5, blocksize=32),
    dict(sparsity=0.7, blocksize=40),  # blocks of 40, 40 and a last one of 16
    dict(sparsity=0.6, blocksize=32, segments=(12, 8, 4)),  # q/k/v stacked on one Hessian
    dict(pattern="2:4", blocksize=32),
    dict(pattern="2:4", blocksize=40),  # N:M over blocks of 40, 40 and a last one of 16
    dict(pattern="4:8", blocksize=16, segments=(16, 8)),
], ids=["50%", "70%-uneven-blocks", "60%-stacked", "2:4", "2:4-uneven-blocks", "4:8-stacked"])
def test_sparsegpt_equals_the_papers_algorithm(case, dtype, rtol):
    """Several blocks of a 24 x 96 layer (correlated inputs, H from real X): the lazily batched implementation
    prunes exactly the paper's weights and leaves the others within `rtol` of its updates."""
    case = dict(case)
    segments = case.pop("segments", ())
    weight, _, hessian = layer_problem(rows=24, cols=96, tokens=384, seed=7, coupling=0.5)
    hessian = (hessian + hessian.t()) / 2  # exactly symmetric: a Cholesky reads one triangle, inv() both
    assert torch.linalg.cond(hessian.double()) < 100  # well conditioned: float32 and float64 agree closely
    cfg = prune_config_from({"method": "sparsegpt", "percdamp": 0.01, **case})
    knobs = cfg.method_config
    new, keep = get_method("sparsegpt").fn(weight.to(dtype), hessian.to(dtype),
                                           LayerTarget(cfg.sparsity, cfg.nm, tuple(segments)),
                                           blocksize=knobs.blocksize, percdamp=knobs.percdamp)
    expected, expected_keep = paper_sparsegpt(weight, hessian, cfg.sparsity, cfg.nm, segments, knobs.blocksize)
    assert torch.equal(keep, expected_keep)
    assert (new[~keep] == 0).all()
    scale = expected.abs().max()
    torch.testing.assert_close(new.double(), expected, rtol=rtol, atol=rtol * scale)
    assert float((new.double() - expected).norm() / expected.norm()) < rtol
    # the updates matter: pruning alone (same mask, kept weights untouched) is far from the paper's weights
    assert float((weight.double() * keep - expected).norm() / expected.norm()) > 0.1


def test_row_mask_in_chunks_equals_one_selection(monkeypatch):
    """Streaming bounds memory by selecting rows a chunk at a time; ties and counts must come out the same."""
    from llmprune.pruning import masks

    scores = torch.randint(0, 4, (300, 70), generator=torch.Generator().manual_seed(1)).float()  # many ties
    whole = row_mask(scores, 0.43)
    monkeypatch.setattr(masks, "ROW_CHUNK", 70 * 7)  # 7 rows a chunk, the last one short
    chunked = row_mask(scores, 0.43)
    assert torch.equal(whole, chunked) and (chunked.sum(1) == 70 - round(70 * 0.43)).all()
