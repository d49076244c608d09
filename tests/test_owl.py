"""OWL (pruning/owl.py): outliers counted by hand, layer sparsities computed by hand from the documented map,
and the runner's ratios against the dense model's own forward."""

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from llmprune import PruneConfig, prune
from llmprune.inputs.models import linears
from llmprune.pruning import runner
from llmprune.pruning.owl import outlier_ratio, owl_sparsities
from llmprune.pruning.registry import OwlConfig


def test_outlier_ratio_counted_by_hand():
    # Eight scores summing to 80: mean 10.
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 52.0]])
    assert outlier_ratio(scores, 2.0) == 1 / 8  # above 20: 52
    assert outlier_ratio(scores, 0.5) == 3 / 8  # above 5: 6, 7, 52 (5 itself is not above)
    assert outlier_ratio(scores, 6.0) == 0.0  # above 60: none
    assert outlier_ratio(scores, 0.05) == 1.0  # above 0.5: all


def test_layer_sparsities_by_hand():
    """Ratios map linearly onto [target - lambda, target + lambda], most outliers lowest, then a shift makes the
    parameter-weighted mean the target."""
    # Equal sizes: ratios 0.1, 0.3, 0.2 scale to 0, 1, 0.5 -> 0.6, 0.4, 0.5, whose mean is already 0.5.
    assert owl_sparsities([0.1, 0.3, 0.2], [10, 10, 10], 0.5, 0.1) == pytest.approx([0.6, 0.4, 0.5], abs=1e-12)
    # Sizes 1 and 3: 0.6 and 0.4 weigh in at (0.6 + 3 * 0.4) / 4 = 0.45, so both shift up by 0.05.
    assert owl_sparsities([0.1, 0.3], [1, 3], 0.5, 0.1) == pytest.approx([0.65, 0.45], abs=1e-12)
    # No spread between the ratios: every layer gets the target.
    assert owl_sparsities([0.2, 0.2, 0.2], [1, 2, 3], 0.7, 0.08) == pytest.approx([0.7, 0.7, 0.7], abs=1e-12)
    # 0.15 and -0.05 average to the target 0.05; the negative one is clamped to 0 (the runner refuses that).
    assert owl_sparsities([0.0, 1.0], [1, 1], 0.05, 0.1) == pytest.approx([0.15, 0.0], abs=1e-12)


def test_runner_ratios_are_the_dense_models_wanda_outliers(monkeypatch):
    """The runner counts each layer's outliers among |W| * ||X|| over all its linears, X the dense model's inputs
    (not those of an already pruned layer): recomputed here in float64 from hooks on the model's own forward."""
    model = tiny_model("llama", layers=4, hidden=64)
    with torch.no_grad():  # layers with different outlier counts: large weights in a few input columns
        for index, columns in ((1, 2), (2, 6)):
            for module in linears(model.model.layers[index]).values():
                module.weight[:, :columns] *= 30
    calibration = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    m, target, lam = 4.0, 0.6, 0.1

    squares, hooks = {}, []
    for index, layer in enumerate(model.model.layers):
        for name, module in linears(layer).items():
            def record(module, args, key=(index, name)):
                x = args[0].detach().double().reshape(-1, args[0].shape[-1])
                squares[key] = squares.get(key, 0) + x.square().sum(0)
            hooks.append(module.register_forward_pre_hook(record))
    with torch.no_grad():
        model(calibration)
    for hook in hooks:
        hook.remove()
    expected, sizes = [], []
    for index, layer in enumerate(model.model.layers):
        scores = torch.cat([(module.weight.detach().double().abs() * squares[index, name].sqrt()).flatten()
                            for name, module in linears(layer).items()])
        expected.append(float((scores > m * scores.mean()).double().mean()))
        sizes.append(scores.numel())
    assert len(set(expected)) == len(expected), expected  # distinct ratios: a mix-up of layers would show

    measured = []

    def recorded_ratio(scores, m):
        measured.append(outlier_ratio(scores, m))
        return measured[-1]

    monkeypatch.setattr(runner, "outlier_ratio", recorded_ratio)
    report = prune(model, calibration, PruneConfig(method="wanda", sparsity=target, allocation="owl",
                                                   allocation_config=OwlConfig(owl_m=m, owl_lambda=lam)), progress=False)
    # float32 scores against float64 ones: a score within rounding of the threshold may count differently
    # (here none does; two are allowed).
    assert measured == pytest.approx(expected, abs=2 / min(sizes))
    assert report.layer_sparsity == pytest.approx(owl_sparsities(expected, sizes, target, lam), abs=1e-3)
