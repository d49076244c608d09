"""Statistics of a linear layer's inputs, accumulated over calibration tokens in float32, by kind.

A kind is a small class registered here: `add(x)` for each batch of inputs (..., features), `finalize()`
once, returning what a method receives. Sums are accumulated in place and scaled once at the end: the
same numbers as a running mean, without rescaling the accumulator on every batch. A method that needs a
new statistic adds one class here and names its kind in `register(..., statistic=KIND)`.

Contract: a kind's public attributes are its running sums, tensors or int token counts, and nothing else until
`finalize()`; a name with a leading underscore is fixed at construction (a shape), not a sum. Processes that saw
different calibration windows then combine by summing every public attribute (`reduce_statistic`), which is how
data-parallel calibration needs no code per kind.
"""

from __future__ import annotations

import torch

STATISTICS: dict[str, type] = {}


def register_statistic(kind: str):
    def decorate(cls):
        STATISTICS[kind] = cls
        return cls

    return decorate


def new_statistic(kind: str, features: int, device: torch.device):
    return STATISTICS[kind](features, device)


def reduce_statistic(statistic, all_reduce) -> None:
    """Sum a statistic over processes in place (`all_reduce(tensor)` sums a tensor across them)."""
    sums = {name: value for name, value in vars(statistic).items() if not name.startswith("_")}
    tensors = [v for v in sums.values() if isinstance(v, torch.Tensor)]
    for name, value in sums.items():
        if isinstance(value, torch.Tensor):
            all_reduce(value)
        elif isinstance(value, int):  # a token count: summed as a tensor on the statistic's device
            count = torch.tensor(value, dtype=torch.int64, device=tensors[0].device if tensors else "cpu")
            all_reduce(count)
            setattr(statistic, name, int(count))
        else:
            raise TypeError(f"{type(statistic).__name__}.{name} is not a sum: a statistic holds tensors and counts")


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float()


@register_statistic("input_norms")
class InputNorms:
    """||X_j||_2 per input feature, over every calibration token (Wanda, RIA, OWL)."""

    def __init__(self, features: int, device: torch.device):
        self.total = torch.zeros(features, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        self.total.add_(_rows(x).square().sum(0))

    def finalize(self) -> torch.Tensor:
        return self.total.sqrt_()


@register_statistic("hessian")
class Hessian:
    """2/n X^T X over the n calibration tokens (SparseGPT, ADMM): the layer-wise least-squares Hessian.

    X^T X is symmetric, so only its upper triangle is accumulated and held, a panel of rows at a time (rows
    [a, b) against columns [a, n)), packed one after another in `upper`: at 4 panels this does 5/8 of the full
    product's work and holds 5/8 of its memory while the calibration batches run (the forward's own activations
    peak then). `finalize` unpacks it into the whole matrix, mirroring each panel into the lower triangle (which
    also makes the result exactly symmetric)."""

    PANELS = 4  # more, thinner panels save a little more work but run each GEMM less efficiently

    def __init__(self, features: int, device: torch.device):
        self._features = features
        self.tokens = 0
        self.upper = torch.zeros(sum((b - a) * (features - a) for a, b in self._spans()), dtype=torch.float32,
                                 device=device)

    def _spans(self) -> list[tuple[int, int]]:
        n = self._features
        panels = self.PANELS if n >= 256 else 1
        edges = [n * k // panels for k in range(panels + 1)]
        return list(zip(edges, edges[1:]))

    def _panels(self):
        """(a, b, rows [a, b) x columns [a, n) of X^T X as a view of `upper`) for each panel."""
        n, offset = self._features, 0
        for a, b in self._spans():
            size = (b - a) * (n - a)
            yield a, b, self.upper[offset:offset + size].view(b - a, n - a)
            offset += size

    def add(self, x: torch.Tensor) -> None:
        self.tokens += x.numel() // x.shape[-1]
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
            # On tensor cores: a product of two half-precision numbers is exact in float32 and the sums are
            # float32, so this is the float32 X^T X at many times the float32 rate (the GPU's cost of SparseGPT).
            x = x.reshape(-1, x.shape[-1])
            try:
                product = torch.mm(x.t(), x, out_dtype=torch.float32)
            except (TypeError, RuntimeError):  # a torch before mixed-precision mm (2.8)
                product = torch.mm(x.t().float(), x.float())
            for a, b, panel in self._panels():
                panel.add_(product[a:b, a:])
        else:
            x = _rows(x)
            for a, b, panel in self._panels():
                panel.addmm_(x[:, a:b].t(), x[:, a:])

    def finalize(self) -> torch.Tensor:
        total = torch.empty(self._features, self._features, dtype=torch.float32, device=self.upper.device)
        for a, b, panel in self._panels():  # the panel, then its mirror below it (small temporaries)
            total[a:b, a:] = panel
            total[b:, a:b] = panel[:, b - a:].t()
            diagonal = total[a:b, a:b]
            diagonal.copy_(diagonal.triu() + diagonal.triu(1).t())
        self.upper = None  # the packed sums are spent: freed before the method runs
        return total.mul_(2 / self.tokens)


@register_statistic("input_moments")
class InputMoments:
    """Per input feature, over every token: the mean, the variance and ||X_j||_2, as a dict (DSnoT, FLAP)."""

    def __init__(self, features: int, device: torch.device):
        self.tokens = 0
        self.sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(features, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        x = _rows(x).double()  # variance from sums of squares loses digits in float32 over many tokens
        self.tokens += x.shape[0]
        self.sum.add_(x.sum(0))
        self.sum_sq.add_(x.square().sum(0))

    def finalize(self) -> dict[str, torch.Tensor]:
        mean = self.sum / self.tokens
        variance = (self.sum_sq / self.tokens - mean.square()).clamp_min(0)
        return {"mean": mean.float(), "variance": variance.float(), "norms": self.sum_sq.sqrt().float()}
