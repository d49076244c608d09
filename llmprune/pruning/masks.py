"""Mask selection over score tensors. A mask is boolean, True where a weight is kept.

Every selection prunes the lowest scores and breaks ties by position: dequantized weights tie
often, and the same inputs must give the same mask.
"""

from __future__ import annotations

import math

import torch


def pruned_count(total: int, sparsity: float) -> int:
    """How many of `total` weights a sparsity prunes: rounded to nearest, halves up (the epsilon absorbs
    float noise such as 0.7 * 10 = 6.9999...), so per-layer targets are not biased down on average."""
    return math.floor(total * sparsity + 0.5 + 1e-9)


def _prune_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask over the last dim of `scores`, pruning the `count` lowest entries of each row.

    The same mask as a stable sort (ties pruned in order of position), in linear time: everything
    below the count-th smallest value goes, then as many of the entries equal to it as are still needed.
    """
    if count <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if scores.is_cuda:  # CUDA's kthvalue gives one thread block per row: a sort is far faster on long rows
        threshold = scores.sort(dim=-1).values[..., count - 1 : count]
    else:
        threshold = scores.kthvalue(count, dim=-1, keepdim=True).values
    below = scores < threshold
    at = scores == threshold
    still_needed = count - below.sum(-1, keepdim=True)
    if bool((at.sum(-1, keepdim=True) == still_needed).all()):  # no tie to break (the usual case): no cumsum
        return ~(below | at)
    return ~(below | (at & (at.cumsum(-1) <= still_needed)))


ROW_CHUNK = 2**22  # scores per chunk of rows: bounds the selection's temporaries (an int64 cumsum, masks)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Unstructured, compared within each output row: every row loses exactly pruned_count(in, sparsity)."""
    return row_mask_count(scores, pruned_count(scores.shape[-1], sparsity))


def row_mask_count(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Every row loses its `count` lowest. Rows are independent, so they are selected a chunk at a time: the same
    mask, with temporaries of one chunk instead of several copies of the whole (stacked) matrix, which dominated
    a streamed run's memory."""
    rows = max(1, ROW_CHUNK // max(1, scores.shape[-1]))
    if scores.dim() != 2 or scores.shape[0] <= rows:
        return _prune_lowest(scores, count)
    return torch.cat([_prune_lowest(chunk, count) for chunk in scores.split(rows)])


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M (NVIDIA's convention): in every m consecutive input weights of a row, the n highest are kept.

    Each entry's rank in its group is the number of entries ordered before it, counted by comparing every group
    with its j-th entry, one j at a time: for the small m of N:M this is far faster than a selection over millions
    of tiny rows (and than materialising all m x m comparisons at once), and it ranks ties by position exactly
    as a stable sort does."""
    rows, cols = scores.shape
    grouped = scores.reshape(rows, cols // m, m)
    rank = torch.zeros(grouped.shape, dtype=torch.uint8 if m < 256 else torch.int32, device=scores.device)
    for j in range(m):
        other = grouped[..., j : j + 1]
        rank += other < grouped
        if j < m - 1:  # a tie: the entry at the earlier position j is ordered before the later ones
            rank[..., j + 1 :] += other == grouped[..., j + 1 :]
    return (rank >= m - n).reshape(rows, cols)


def lowest_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Prune the `count` lowest entries of the whole tensor (SparseGPT compares a block at once)."""
    return _prune_lowest(scores.reshape(1, -1), count).reshape(scores.shape)
