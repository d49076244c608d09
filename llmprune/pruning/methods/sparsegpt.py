"""SparseGPT (Frantar & Alistarh, 2023, arXiv:2301.00774): OBS sparse regression, column by column.

Pruning column j of W costs w_j^2 / [H^-1]_jj^2 (H = 2/n X X^T) and is compensated by moving the
error along row j of the upper Cholesky factor of H^-1 onto the columns not yet processed. Updates
to later blocks are applied lazily, once per block of `blocksize` columns, as one matmul.
"""

from __future__ import annotations

import functools
import warnings

import torch

from ...errors import LLMPruneError
from ..masks import lowest_mask, nm_mask, pruned_count, row_mask_count
from ..registry import SparseGPTConfig, handles


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float, retries: int = 4) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp*I)^-1 (U^T U = that inverse), damp = percdamp * mean(diag H), raised
    10x on failure.

    With J the reversal permutation, the Cholesky factor L of J H J gives H = V V^T with V = J L J upper
    triangular, so H^-1 = V^-T V^-1 and U = V^-1: one Cholesky and one triangular inverse, where the textbook route
    takes a Cholesky, an explicit inverse and a second Cholesky, and rounds through the worse-conditioned H^-1.
    All three steps work in place on one copy of H: a streamed run's largest solve (a 4,864-wide down projection)
    holds H and one more features x features matrix, not three more."""
    factor = hessian.flip(0, 1)  # J H J, the one copy: every step below overwrites it
    undamped = factor.diagonal().clone()
    undamped[undamped == 0] = 1.0  # an input never seen in calibration: no information, keep H invertible
    damp = percdamp * undamped.mean()
    info = torch.zeros((), dtype=torch.int32, device=hessian.device)
    for attempt in range(retries + 1):
        if attempt:  # the failed factorisation overwrote the copy
            factor.copy_(hessian)
            reverse_in_place(factor)
        torch.add(undamped, damp, out=factor.diagonal())
        # LAPACK factors a column-major matrix in place: the transposed view is one, and the upper factor R
        # (R^T R = J H J) written into it leaves R^T = L in `factor`'s own row-major layout.
        torch.linalg.cholesky_ex(factor.mT, upper=True, out=(factor.mT, info))
        if info == 0:
            reverse_in_place(factor)  # V = J L J
            return upper_triangular_inverse_(factor)
        if attempt < retries:
            warnings.warn(f"SparseGPT: Hessian not positive definite at damping {damp:.3g}; retrying at 10x")
            damp = damp * 10
    raise LLMPruneError(
        "SparseGPT: the Hessian stayed singular after raising the damping 10^4 times; "
        "use more calibration data (--nsamples) or a larger --percdamp"
    )


def reverse_in_place(matrix: torch.Tensor, chunk: int = 1 << 20) -> None:
    """matrix := matrix.flip(0, 1) for a contiguous matrix, without a second one: flipping both axes reverses the
    flat storage, done by swapping a chunk from each end at a time."""
    flat = matrix.view(-1)
    n = flat.numel()
    for k in range(0, n // 2, chunk):
        m = min(chunk, n // 2 - k)
        head = flat[k : k + m].clone()
        flat[k : k + m] = flat[n - k - m : n - k].flip(0)
        flat[n - k - m : n - k] = head.flip(0)


def upper_triangular_inverse_(upper: torch.Tensor, blocks: int = 8) -> torch.Tensor:
    """V^-1 of an upper triangular V, written over V (zeros below the diagonal stay zeros), a block of columns at
    a time from the left. With the leading a x a block already inverted, column block [a, b) of the inverse is
    -inv(V[:a, :a]) V[:a, a:b] inv(V[a:b, a:b]) above the diagonal block and inv(V[a:b, a:b]) on it: two
    products and one small triangular inverse per block, temporaries of n x n/blocks (LAPACK's blocked trtri)."""
    n = upper.shape[0]
    edges = [n * k // blocks for k in range(blocks + 1)]
    for a, b in zip(edges, edges[1:]):
        if a == b:
            continue
        identity = torch.eye(b - a, dtype=upper.dtype, device=upper.device)
        diagonal_inverse = torch.linalg.solve_triangular(upper[a:b, a:b], identity, upper=True)
        if a:
            upper[:a, a:b] = -(upper[:a, :a] @ upper[:a, a:b]) @ diagonal_inverse
        upper[a:b, a:b] = diagonal_inverse
    return upper


def _block_counts(segments: list[int], cols: int, i1: int, i2: int, sparsity: float) -> list[int]:
    """How many weights each segment prunes in columns [i1, i2): the cumulative rounding makes every
    segment lose exactly pruned_count(rows * cols, sparsity) over all its blocks."""
    return [pruned_count(rows * i2, sparsity) - pruned_count(rows * i1, sparsity) for rows in segments]


def column_loop(block_t, drop_t, keep_t, errors_t, hinv_block, inv_diag_sq, nm) -> None:
    """One block's columns, in place, on the block *transposed* (a column of W is a contiguous row here, and
    the update of the later columns one contiguous slab: on a CPU, far faster than strided columns of W).
    Three tensor ops per column: the pruned weights' error, scaled, and its compensation on the block's later
    columns; zeroing waits until the block is done."""
    for j in range(block_t.shape[0]):
        if nm is not None and j % nm[1] == 0:  # N:M groups chosen on the weights updated so far
            group = slice(j, j + nm[1])
            keep_t[group] = nm_mask((block_t[group] ** 2 / inv_diag_sq[group, None]).t(), *nm).t()
            drop_t[group] = ~keep_t[group]
        error = torch.div(block_t[j] * drop_t[j], hinv_block[j, j], out=errors_t[j])
        block_t[j + 1 :].addr_(hinv_block[j, j + 1 :], error, alpha=-1)


@functools.lru_cache(maxsize=8)
def column_graph(width: int, rows: int, nm, device: torch.device, dtype: torch.dtype):
    """`column_loop` for one block shape captured as a CUDA graph. On a GPU the loop is bound by kernel launches
    (Python and driver time per column exceed the column's work); a replay launches them all at once.
    The kernels are the same, so the weights are bit-identical to the eager loop's."""
    static = [torch.zeros(width, rows, device=device, dtype=dtype),  # block_t
              torch.zeros(width, rows, device=device, dtype=dtype),  # drop_t
              torch.ones(width, rows, device=device, dtype=torch.bool),  # keep_t
              torch.zeros(width, rows, device=device, dtype=dtype),  # errors_t
              torch.eye(width, device=device, dtype=dtype),  # hinv_block (identity: the warm-up must not blow up)
              torch.ones(width, device=device, dtype=dtype)]  # inv_diag_sq
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        column_loop(*static, nm)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        column_loop(*static, nm)

    def run(*tensors) -> None:
        for buffer, tensor in zip(static, tensors):
            buffer.copy_(tensor)
        graph.replay()
        for k in (0, 1, 2, 3):  # block_t, drop_t, keep_t, errors_t: the loop's outputs
            tensors[k].copy_(static[k])

    return run


@handles(SparseGPTConfig)
def sparsegpt(weight, hessian, target, blocksize=128, percdamp=0.01, sparsegpt_compare="matrix"):
    w = weight.clone()
    rows, cols = w.shape
    segments, sparsity, nm = list(target.segments or [rows]), target.sparsity, target.nm
    starts = [sum(segments[:k]) for k in range(len(segments))]
    hinv = inverse_hessian_factor(hessian, percdamp)
    keep = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        block, hinv_block = w[:, i1:i2], hinv[i1:i2, i1:i2]
        inv_diag_sq = torch.diag(hinv_block) ** 2
        keep_block = keep[:, i1:i2]
        if nm is None:  # adaptive mask selection on the OBS score
            scores = block**2 / inv_diag_sq
            if sparsegpt_compare == "row":  # every row loses its share of the block (cumulatively rounded, so
                # each row loses exactly pruned_count(cols, sparsity) over all blocks)
                count = pruned_count(i2, sparsity) - pruned_count(i1, sparsity)
                keep_block.copy_(row_mask_count(scores, count))
            else:  # the paper's: each stacked matrix compares its whole block at once
                for start, size, count in zip(starts, segments, _block_counts(segments, cols, i1, i2, sparsity)):
                    keep_block[start : start + size] = lowest_mask(scores[start : start + size], count)
        block_t, keep_t = block.t().contiguous(), keep_block.t().contiguous()
        loop_state = (block_t, (~keep_t).to(w.dtype), keep_t, torch.empty_like(block_t), hinv_block, inv_diag_sq)
        if w.is_cuda:  # the same kernels, replayed as one CUDA graph: no launch cost per column
            column_graph(*block_t.shape, tuple(nm) if nm else None, w.device, w.dtype)(*loop_state)
        else:
            column_loop(*loop_state, nm)
        block.copy_(block_t.mul_(keep_t).t())
        keep_block.copy_(keep_t.t())
        w[:, i2:].addmm_(loop_state[3].t(), hinv[i1:i2, i2:], alpha=-1)
    return w, keep
