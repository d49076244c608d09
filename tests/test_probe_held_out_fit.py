"""scripts/probe_held_out_fit.py: its error measure against one computed from the activations, its OBS variant of
gradual ADMM against the runner's method where the two must agree, and a run end to end on a tiny random Llama."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from llmprune.inputs.data import load_text
from llmprune.pruning.methods import LayerTarget, get_method
from llmprune.testing import save_tiny_model_dir

SCRIPT = Path(__file__).parents[1] / "scripts" / "probe_held_out_fit.py"


@pytest.fixture(scope="module")
def probe(monkeypatch_module):
    spec = importlib.util.spec_from_file_location("probe_held_out_fit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def monkeypatch_module():
    """The script imports its neighbour benchlib as a program run from scripts/ would."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(SCRIPT.parent))
        yield patch


def test_relative_error_is_the_output_error_on_the_tokens(probe):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=generator, dtype=torch.float64)
    weight = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    pruned = weight * (torch.rand(5, 12, generator=generator) > 0.5)
    by_hand = float(((x @ (weight - pruned).t()) ** 2).sum() / ((x @ weight.t()) ** 2).sum())
    hessian = (2 / 64) * x.t() @ x  # the runner's scaling: any positive multiple gives the same ratio
    assert probe.relative_error(weight.float(), pruned.float(), hessian.float()) == pytest.approx(by_hand, rel=1e-5)


def test_obs_saliency_is_the_runners_admm_when_inputs_are_uncorrelated(probe):
    """With a diagonal X^T X every input's saliency weight is the same in the unit scaling: the masks, and so the
    weights, are the runner's gradual ADMM's exactly. On correlated inputs they differ."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 16, generator=generator)
    target = LayerTarget(0.5, (2, 4), (8,))
    admm = get_method("admm")
    diagonal = torch.diag(torch.rand(16, generator=generator) + 0.5)
    expected, _ = admm.fn(weight, diagonal, target, **admm.config().knobs())
    assert torch.equal(probe.admm_obs(weight, diagonal, target)[0], expected)
    x = torch.randn(32, 16, generator=generator)
    x[:, 1] = x[:, 0] + 0.01 * x[:, 1]  # input 1 all but repeats input 0
    correlated = x.t() @ x
    runner, _ = admm.fn(weight, correlated, target, **admm.config().knobs())
    assert not torch.equal(probe.admm_obs(weight, correlated, target)[1], runner != 0)


def test_a_run_writes_each_group_and_the_block_curve(probe, tmp_path, monkeypatch):
    model = save_tiny_model_dir(tmp_path / "tiny", text=load_text("wiki", "calib")[:20_000], vocab_size=600, layers=2)
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["probe", "--model", str(model), "--layers", "0,1", "--seqlen", "32",
                                      "--nsamples", "4", "--held-out-windows", "4", "--block-epochs", "2",
                                      "--block-lr", "1e-3", "--variants", "sparsegpt,admm,admm-obs", "--out", str(out)])
    probe.main()
    run = json.loads((out / "held_out_fit.json").read_text())["runs"][0]
    groups = [(g["layer"], g["group"]) for g in run["groups"]]
    assert groups == [(i, g) for i in (0, 1) for g in ("q_proj+k_proj+v_proj", "o_proj", "gate_proj+up_proj",
                                                        "down_proj")]
    for group in run["groups"]:
        for errors in group["errors"].values():
            assert 0 < errors["calibration"] < 1 and errors["held_out"] > 0
    assert run["summary_against_first"]["sparsegpt"] == {"calibration": 1.0, "held_out": 1.0}
    for block in run["blocks"]:
        curve = block["curve"]
        assert [c["epoch"] for c in curve] == [0, 1, 2]
        assert curve[-1]["calibration"] < curve[0]["calibration"]  # Adam fits the calibration windows


def test_whole_model_admm_is_the_runners_and_the_kernel_is_given_back(probe, tmp_path):
    """Through the swapped kernel, variant `admm` prunes exactly as the runner does; `admm-obs` does not; the
    runner's kernel is in place again afterwards."""
    from llmprune import PruneConfig, prune
    from llmprune.evaluation.perplexity import perplexity
    from llmprune.inputs.data import calibration_windows, eval_windows, tokenize
    from llmprune.inputs.models import load_model
    from llmprune.pruning.registry import HANDLERS, AdmmConfig

    path = save_tiny_model_dir(tmp_path / "tiny", text=load_text("wiki", "calib")[:20_000], vocab_size=600, layers=2)
    model, tokenizer, _ = load_model(str(path), "float32")
    calibration = calibration_windows(tokenize(tokenizer, load_text("wiki", "calib")[:20_000]), 4, 32, 0)
    windows = eval_windows(tokenize(tokenizer, load_text("wiki", "eval")[:20_000]), 32, 4)
    config = PruneConfig(method="admm", pattern="2:4", nsamples=4, seqlen=32)
    dense = {name: p.detach().clone() for name, p in model.state_dict().items()}
    runner_kernel = HANDLERS[AdmmConfig]
    prune(model, calibration, config, progress=False)
    expected = perplexity(model, windows, "cpu", progress=False)
    model.load_state_dict(dense)
    assert probe.whole_model_perplexity(model, calibration, windows, config, "admm")[0] == expected
    assert HANDLERS[AdmmConfig] is runner_kernel
    model.load_state_dict(dense)
    assert probe.whole_model_perplexity(model, calibration, windows, config, "admm-obs")[0] != expected
    assert HANDLERS[AdmmConfig] is runner_kernel
