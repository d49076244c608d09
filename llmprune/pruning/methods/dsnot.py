"""DSnoT, dynamic sparse no training (Zhang et al., ICLR 2024, arXiv:2310.08915): refine a Wanda mask by
swapping weights within each row, with no weight update.

Pruning weight j of a row removes, in expectation over tokens, W_j * E[X_j] from the row's output. A row's
expected reconstruction error is the sum of that over its pruned weights:

    e = sum_{j pruned} W_j E[X_j]

Each cycle, for every row whose |e| is above `dsnot_threshold`, one pair is swapped:
- grow the pruned weight that moves e most towards zero, per unit of input variance: the largest
  sign(e) * W_j E[X_j] / Var[X_j] (a noisy input's mean says less about a token's output);
- prune the kept weight of least Wanda score |W_j| ||X_j|| among those whose W_j E[X_j] has the opposite sign
  of e (pruning it also moves e towards zero). For N:M the pruned partner is the least-Wanda kept weight of
  the grown weight's own group, so every group keeps exactly N.
A row stops for good once a swap would flip the sign of its error (it would overshoot zero) or would not
shrink it (a stricter rule than the paper's code, which can grow a weight of the wrong sign late in a row),
when it has no candidate left, or after `dsnot_cycles` cycles. Only weights of the initial mask's other side are
candidates: a weight is grown or pruned at most once. Every row keeps its exact count.
"""

from __future__ import annotations

import torch

from ...errors import LLMPruneError
from ..registry import DsnotConfig, handles
from .magnitude import score_mask


def refine_mask(weight, keep, wanda, mean, variance, nm=None, cycles=50, threshold=0.1) -> torch.Tensor:
    """DSnoT's swaps applied to the keep mask `keep` (not modified); returns the refined mask."""
    rows, cols = weight.shape
    keep = keep.clone()
    contribution = weight * mean  # the expected output each weight adds to its row
    grow_value = contribution / variance.clamp_min(torch.finfo(variance.dtype).tiny)
    error = (contribution * ~keep).sum(1)
    initial_sign = error.sign()
    growable, prunable = ~keep, keep.clone()  # each weight crosses over at most once
    active = error.abs() > threshold
    every_row = torch.arange(rows, device=weight.device)
    group_of = torch.arange(cols, device=weight.device) // nm[1] if nm else None
    for _ in range(cycles):
        if not bool(active.any()):
            break
        direction = error.sign().unsqueeze(1)
        grow_candidates = growable
        if nm:  # a grown weight needs a kept partner in its own group
            open_groups = prunable.view(rows, -1, nm[1]).any(-1)
            grow_candidates = growable & open_groups.repeat_interleave(nm[1], dim=1)
        grow_scores = (direction * grow_value).masked_fill(~grow_candidates, -float("inf"))
        grow = grow_scores.argmax(1)
        if nm:
            prune_candidates = prunable & (group_of.unsqueeze(0) == group_of[grow].unsqueeze(1))
        else:
            prune_candidates = prunable & (direction * contribution < 0)
        prune_scores = wanda.masked_fill(~prune_candidates, float("inf"))
        prune = prune_scores.argmin(1)
        found = grow_candidates[every_row, grow] & prune_candidates[every_row, prune]
        after = error - contribution[every_row, grow] + contribution[every_row, prune]
        active &= found & (error.abs() > threshold) & (after.sign() == initial_sign) & (after.abs() < error.abs())
        swap_rows = every_row[active]
        keep[swap_rows, grow[active]] = True
        keep[swap_rows, prune[active]] = False
        growable[swap_rows, grow[active]] = False
        prunable[swap_rows, prune[active]] = False
        error = torch.where(active, after, error)
    return keep


@handles(DsnotConfig)
def dsnot(weight, moments, target, dsnot_cycles=50, dsnot_threshold=0.1):
    if dsnot_cycles < 0 or dsnot_threshold < 0:
        raise LLMPruneError(f"--dsnot-cycles and --dsnot-threshold must not be negative "
                            f"(got {dsnot_cycles}, {dsnot_threshold:g})")
    wanda = weight.abs() * moments["norms"]
    keep = refine_mask(weight, score_mask(wanda, target), wanda, moments["mean"], moments["variance"],
                       target.nm, dsnot_cycles, dsnot_threshold)
    return weight * keep, keep
