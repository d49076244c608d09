"""ADMM weight update after pruning (Boza, 2024, arXiv:2401.02938, "Fast and Effective Weight Update for
Pruned Large Language Models").

Given a keep mask M, re-fit the kept weights to the dense layer's outputs on the calibration inputs:

    min_W' ||W X - W' X||^2  subject to  W' = 0 off M

with H = X^T X (any positive multiple: the runner's "hessian" statistic is 2/n X^T X). Each row is an
independent least-squares problem on its own support; ADMM solves them all at once with one matrix inverse
per layer and one matmul per iteration:

    W <- (H + rho I)^-1 (H W0 + rho (Z - U))     (least squares, pulled towards the masked copy Z)
    Z <- M * (W + U)                              (projection onto the mask: exact zeros)
    U <- U + W - Z                                (scaled dual)

As in the paper, H is first scaled to a unit diagonal (W's columns scaled by ||X_j|| to match), which makes
one rho fit every layer, and damped by `admm_damp` (a ridge towards the dense weights, as a fraction of the
unit diagonal). The result is Z: exactly zero off the mask.

Two registrations share the solver:
- `--update admm` re-fits the kept weights of any method's mask (magnitude, wanda, ria, dsnot...); the mask is
  the method's, unchanged.
- `--method admm` is the paper's full method: the mask is chosen gradually *during* the iterations, on the
  Wanda score of the current iterate |W + U| * ||X|| (in the scaled space simply |W + U|), the sparsity
  rising on a cubic schedule over the first `admm_gradual_steps` iterations. A mask chosen on the updated
  weights is the point of the schedule, so it cannot sit behind another method's fixed mask: it is a method.
"""

from __future__ import annotations

import torch

from ...errors import LLMPruneError
from ..masks import nm_mask, row_mask
from ..registry import AdmmConfig, AdmmUpdateConfig, handles


def _check(iterations: int, rho: float, damp: float) -> None:
    if iterations < 1:
        raise LLMPruneError(f"--admm-iterations must be at least 1 (got {iterations})")
    if rho <= 0 or damp < 0:
        raise LLMPruneError(f"--admm-rho must be positive and --admm-damp not negative (got {rho:g}, {damp:g})")


class ScaledProblem:
    """The least-squares problem in the unit-diagonal scaling, with what every ADMM iteration reuses."""

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor, rho: float, damp: float):
        diagonal = torch.diag(hessian)
        # An input never seen in calibration has a zero row and column in H: any scale keeps it zero there.
        self.scale = torch.where(diagonal > 0, diagonal.sqrt(), torch.ones_like(diagonal))
        system = hessian / self.scale[:, None] / self.scale[None, :]
        # The damped objective (W' - W) (H + damp diag H) (W' - W)^T is H + damp I here; + rho I for ADMM's step.
        system.diagonal().add_(damp + rho)
        self.inverse = torch.cholesky_inverse(torch.linalg.cholesky(system))  # positive definite: rho > 0
        self.rho = rho
        self.dense = weight * self.scale

    def least_squares_step(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """(W0 H + rho (Z - U)) (H + rho I)^-1, written as W0 + rho (Z - U - W0) (H + rho I)^-1 (since
        H (H + rho I)^-1 = I - rho (H + rho I)^-1): one matmul per iteration."""
        return torch.addmm(self.dense, z - u - self.dense, self.inverse, alpha=self.rho)

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scale


@handles(AdmmUpdateConfig)
def admm_update(weight, hessian, keep, admm_iterations=20, admm_rho=1.0, admm_damp=0.1):
    """The kept weights of `weight` (the dense one) re-fitted on the fixed mask `keep`; zeros elsewhere."""
    _check(admm_iterations, admm_rho, admm_damp)
    problem = ScaledProblem(weight, hessian, admm_rho, admm_damp)
    z = problem.dense * keep
    u = torch.zeros_like(z)
    for _ in range(admm_iterations):
        w = problem.least_squares_step(z, u)
        z = (w + u) * keep
        u += w - z
    return problem.unscale(z)


def gradual_mask(scores: torch.Tensor, sparsity: float, target) -> torch.Tensor:
    """The mask at one step of the schedule: `sparsity` of each row pruned (unstructured), or, for N:M, the
    final N:M survivors always kept and the lowest of the rest pruned up to `sparsity` of the row."""
    if target.nm is None:
        return row_mask(scores, sparsity)
    return row_mask(scores.masked_fill(nm_mask(scores, *target.nm), float("inf")), sparsity)


@handles(AdmmConfig)
def admm_gradual(weight, hessian, target, admm_iterations=20, admm_rho=1.0, admm_damp=0.1, admm_gradual_steps=15):
    """Iteration t < steps prunes to s * (1 - (1 - (t+1)/steps)^3) (the paper's cubic schedule); the last
    schedule step reaches the target, and the remaining iterations re-fit on that final mask."""
    _check(admm_iterations, admm_rho, admm_damp)
    if not 1 <= admm_gradual_steps <= admm_iterations:
        raise LLMPruneError(f"--admm-gradual-steps must be between 1 and --admm-iterations {admm_iterations} "
                            f"(got {admm_gradual_steps})")
    problem = ScaledProblem(weight, hessian, admm_rho, admm_damp)
    z, u = problem.dense.clone(), torch.zeros_like(problem.dense)
    keep = torch.ones_like(z, dtype=torch.bool)
    for t in range(admm_iterations):
        w = problem.least_squares_step(z, u)
        if t < admm_gradual_steps:
            progress = (t + 1) / admm_gradual_steps
            final = t + 1 == admm_gradual_steps
            sparsity = target.sparsity * (1 - (1 - progress) ** 3)
            keep = (nm_mask((w + u).abs(), *target.nm) if final and target.nm
                    else gradual_mask((w + u).abs(), target.sparsity if final else sparsity, target))
        z = (w + u) * keep
        u += w - z
    return problem.unscale(z), keep
