"""Whole-model passes over the calibration windows, where a layer-by-layer pass cannot answer: the loss's
gradient (Taylor importance) and the loss with one layer skipped. They run where the model is loaded."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm



def _batches(calibration: torch.Tensor, batch_size: int):
    return [calibration[s:s + batch_size] for s in range(0, len(calibration), batch_size)]


def loss_gradients(model: nn.Module, calibration: torch.Tensor, modules: dict[str, nn.Module], batch_size: int,
                   progress: bool = False) -> dict[str, torch.Tensor]:
    """d(mean token loss over all windows)/d weight of each module, float32, as (out, in) matrices.

    Memory is bounded: gradients are asked only of these weights (every other parameter is frozen for the
    pass), one batch of windows is forward/backward at a time, and each weight's gradient is added into a
    float32 accumulator by a hook the moment autograd produces it, then freed. Peak: the accumulators (the
    size of the pruned structure's weights in float32) plus one batch's activations."""
    device = next(model.parameters()).device
    flags = {p: p.requires_grad for p in model.parameters()}
    weights = {name: m.weight for name, m in modules.items()}
    sums = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}
    handles = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        def accumulate(weight, total):
            total.add_(weight.grad.float())
            weight.grad = None

        for name, weight in weights.items():
            weight.requires_grad_(True)
            handles.append(weight.register_post_accumulate_grad_hook(lambda w, total=sums[name]: accumulate(w, total)))
        with torch.enable_grad():
            for batch in tqdm(_batches(calibration, batch_size), desc="taylor: gradients", unit="batch",
                              disable=not progress):
                batch = batch.to(device)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                (loss * (len(batch) / len(calibration))).backward()
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    # GPT-2's Conv1D stores (in, out): hand back (out, in) like weight_matrix
    return {name: total if isinstance(modules[name], nn.Linear) else total.t() for name, total in sums.items()}


@torch.no_grad()
def calibration_loss(model: nn.Module, calibration: torch.Tensor, batch_size: int) -> float:
    """Mean token loss over the calibration windows (equal lengths, so the mean of the batch means)."""
    device = next(model.parameters()).device
    total = 0.0
    for batch in _batches(calibration, batch_size):
        total += float(model(input_ids=batch.to(device), labels=batch.to(device), use_cache=False).loss) * len(batch)
    return total / len(calibration)


def skip_layer(layer: nn.Module):
    """Context: the layer passes its input through unchanged (its class's forward is restored on exit)."""

    class _Skipped:
        def __enter__(self):
            layer.forward = lambda hidden_states, *args, **kwargs: hidden_states
            return layer

        def __exit__(self, *exc):
            del layer.forward

    return _Skipped()


def skip_losses(model: nn.Module, layers: nn.ModuleList, calibration: torch.Tensor, batch_size: int,
                progress: bool = False) -> list[float]:
    """The calibration loss increase when each layer alone is skipped: len(layers) + 1 model passes."""
    base = calibration_loss(model, calibration, batch_size)
    increases = []
    for layer in tqdm(layers, desc="skip loss", unit="layer", disable=not progress):
        with skip_layer(layer):
            increases.append(calibration_loss(model, calibration, batch_size) - base)
    return increases
