"""Input statistics of a linear layer, accumulated over calibration tokens in float32.

Sums are accumulated in place and scaled once at the end: the same numbers as a running mean,
without rescaling the accumulator on every batch.
"""

from __future__ import annotations

import torch


class InputStatistic:
    """kind "input_norms": ||X_j||_2 per input feature (Wanda); kind "hessian": 2/n * X^T X (SparseGPT)."""

    def __init__(self, kind: str, features: int, device: torch.device):
        self.kind, self.tokens = kind, 0
        shape = (features, features) if kind == "hessian" else (features,)
        self.total = torch.zeros(shape, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        if self.kind == "hessian":
            self.total.addmm_(x.t(), x)
        else:
            self.total.add_(x.square().sum(0))

    def finalize(self) -> torch.Tensor:
        if self.kind == "hessian":
            return self.total.mul_(2 / self.tokens)
        return self.total.sqrt_()
