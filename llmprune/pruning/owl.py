"""OWL: outlier-weighted layer-wise sparsity (Yin et al., 2023, arXiv:2310.05175).

Layers with more outliers among their Wanda scores keep more weights. The outlier ratio of a layer
is the fraction of its scores |W| * ||X|| above M times their mean over the layer's linears.
"""

from __future__ import annotations

import torch


def outlier_ratio(scores: torch.Tensor, m: float) -> float:
    return float((scores > m * scores.mean()).double().mean())


def owl_sparsities(ratios: list[float], sizes: list[int], target: float, lam: float) -> list[float]:
    """Map outlier ratios linearly onto [target - lam, target + lam] (most outliers -> lowest sparsity),
    then shift so that the parameter-weighted mean is exactly `target`. The paper centres the plain mean;
    weighting by prunable parameters makes the whole model's sparsity equal the target even when layers
    differ in size (for equal-sized layers the two coincide)."""
    r = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(sizes, dtype=torch.float64)
    spread = r.max() - r.min()
    scaled = (r - r.min()) / spread if spread > 0 else torch.full_like(r, 0.5)
    sparsity = target + lam - 2 * lam * scaled
    sparsity += target - (sparsity * w).sum() / w.sum()
    return sparsity.clamp(0.0, 0.99).tolist()
