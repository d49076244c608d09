"""The by-layer sensitivity scan against an independent reference (each cell: a deep copy pruned by the runner
with every other layer skipped, scored by the model's own forward), and its cost counted in decoder-layer passes."""

import copy
import math

import pytest
import torch

from llmprune import PruneConfig, prune
from llmprune.evaluation.perplexity import perplexity
from llmprune.inputs.models import decoder_layers
from llmprune.pruning.scan import scan_sensitivity
from tiny_models import VOCAB, tiny_model


def tokens(n, seqlen=16, seed=0):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def count_layer_passes(model, counts):
    """Hooks adding the decoder layers' real forwards to `counts`: calls, and sequences (a call on a batch of b
    windows is b). A layer whose forward is replaced on the instance (a recorder or a stub) computes nothing:
    not counted."""
    def hook(module, args, kwargs):
        if "forward" not in module.__dict__:
            hidden = args[0] if args else kwargs["hidden_states"]
            counts["calls"] += 1
            counts["sequences"] += hidden.shape[0]

    return [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in decoder_layers(model)[1]]


def reference_scan(model, calibration, windows, config, sparsities, counts=None):
    """Each cell computed the plain way: a fresh copy per cell, pruned by the runner with every other layer
    skipped, scored by the model's own forward. `counts`: layer passes are added there."""
    prefix, layers = decoder_layers(model)

    def loss(m):
        return math.log(perplexity(m, windows, progress=False, chunk=0))

    handles = count_layer_passes(model, counts) if counts is not None else []
    dense = loss(model)
    table = []
    for i in range(len(layers)):
        row = []
        for s in sparsities:
            pruned = copy.deepcopy(model)  # a copy made after the hooks: it carries them
            skip = rf"{prefix}\.(?!{i}\.)\d+\."
            prune(pruned, calibration, PruneConfig(**{**config, "sparsity": s, "skip": skip}), progress=False)
            row.append(loss(pruned))
        table.append(row)
    for h in handles:
        h.remove()
    return dense, table


@pytest.mark.parametrize("family,method", [("llama", "wanda"), ("llama", "sparsegpt"), ("opt", "wanda"),
                                           ("gpt2", "sparsegpt"), ("gemma3", "wanda"), ("llama", "magnitude")])
def test_layer_scan_equals_the_reference(family, method):
    model = tiny_model(family, layers=3)
    dense_state = copy.deepcopy(model.state_dict())
    calibration, windows = tokens(6), tokens(3, seed=1)
    config = {"method": method, "batch_size": 4}
    sparsities = [0.5, 0.8]
    table = scan_sensitivity(model, calibration, windows, PruneConfig(sparsity=0.5, **config), sparsities,
                             progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense_state.items())  # left dense
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(model)[1])  # no stub left behind
    dense, expected = reference_scan(model, calibration, windows, config, sparsities)
    assert table.dense_loss == pytest.approx(dense, rel=1e-5)
    assert torch.tensor(table.loss) == pytest.approx(torch.tensor(expected), rel=1e-5)  # goal: within 1%
    # stricter: each cell's loss increase over dense within 1% (the increases are small on a random model)
    increase = torch.tensor(table.loss, dtype=torch.float64) - table.dense_loss
    assert increase == pytest.approx(torch.tensor(expected, dtype=torch.float64) - dense, rel=1e-2)


def test_layer_scan_without_calibration_for_magnitude():
    model = tiny_model("llama", layers=2)
    windows = tokens(2, seed=3)
    table = scan_sensitivity(model, None, windows, PruneConfig(method="magnitude", sparsity=0.5), [0.6],
                             progress=False)
    _, expected = reference_scan(model, None, windows, {"method": "magnitude"}, [0.6])
    assert torch.tensor(table.loss) == pytest.approx(torch.tensor(expected), rel=1e-5)


def old_passes(layers, sparsities, calibration, windows):
    """Layer passes of a cell-by-cell scan: per cell (layer i) i propagations and one statistics pass over the
    calibration, and the whole model over the windows; plus the dense loss. In sequences, `calibration` is the
    number of windows; in calls, the number of batches."""
    triangle = layers * (layers + 1) // 2
    return sparsities * (calibration * triangle + layers * layers * windows) + layers * windows


def new_passes(layers, sparsities, calibration, windows):
    """One dense pass over calibration and windows; per cell (layer i) layers i..N-1 over the windows."""
    return layers * calibration + layers * windows + sparsities * windows * layers * (layers + 1) // 2


def test_layer_passes_counted_and_the_embedded_model_ratio():
    layers, nsamples, batch, n_windows, sparsities = 4, 6, 4, 3, [0.5, 0.7]
    model = tiny_model("llama", layers=layers)
    calibration, windows = tokens(nsamples), tokens(n_windows, seed=1)
    counts = {"calls": 0, "sequences": 0}
    handles = count_layer_passes(model, counts)
    scan_sensitivity(model, calibration, windows, PruneConfig(method="wanda", sparsity=0.5, batch_size=batch),
                     sparsities, progress=False)
    new = dict(counts)
    for h in handles:
        h.remove()
    counts.update(calls=0, sequences=0)
    reference_scan(model, calibration, windows, {"method": "wanda", "batch_size": batch}, sparsities, counts)
    old = dict(counts)
    batches = math.ceil(nsamples / batch)  # validation windows run one a call
    assert new == {"sequences": new_passes(layers, len(sparsities), nsamples, n_windows),
                   "calls": new_passes(layers, len(sparsities), batches, n_windows)}
    assert old == {"sequences": old_passes(layers, len(sparsities), nsamples, n_windows),
                   "calls": old_passes(layers, len(sparsities), batches, n_windows)}
    # the embedded model with the scan's defaults: 30 layers, 0.5,0.7,0.8, --nsamples 32, --val-windows 8:
    # 66480 / 12360 sequence passes (5.4x); in calls (calibration in batches of 8) 27420 / 11520 (2.4x)
    ratio = old_passes(30, 3, 32, 8) / new_passes(30, 3, 32, 8)
    assert ratio >= 4, ratio


@pytest.mark.slow
def test_embedded_model_cells_equal_the_reference_and_pass_counts(embedded):
    """The real 30-layer model, short windows: a few cells against the reference, and the pass count."""
    model, tokenizer, _ = embedded
    from llmprune.inputs.data import load_text, tokenize

    text = tokenize(tokenizer, load_text("wiki", "calib"))
    calibration, windows = text[:4 * 32].view(4, 32), text[-2 * 32:].view(2, 32)
    config = {"method": "wanda", "batch_size": 2}
    counts = {"calls": 0, "sequences": 0}
    handles = count_layer_passes(model, counts)
    table = scan_sensitivity(model, calibration, windows, PruneConfig(sparsity=0.7, **config), [0.7], progress=False)
    for h in handles:
        h.remove()
    assert counts["sequences"] == new_passes(30, 1, 4, 2)
    prefix = decoder_layers(model)[0]
    for i in (0, 29):
        pruned = copy.deepcopy(model)
        prune(pruned, calibration, PruneConfig(sparsity=0.7, skip=rf"{prefix}\.(?!{i}\.)\d+\.", **config),
              progress=False)
        assert table.loss[i][0] == pytest.approx(math.log(perplexity(pruned, windows, progress=False)), rel=1e-2)
        del pruned
    assert table.dense_loss == pytest.approx(math.log(perplexity(model, windows, progress=False)), rel=1e-2)
