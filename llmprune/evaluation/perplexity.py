"""Perplexity, the papers' protocol: exp(mean token NLL) over non-overlapping windows of the joined text.

(lm-eval's own `wikitext` task reports word perplexity over whole documents: a different number.)

The vocabulary-sized logits are made a chunk of tokens at a time where the model splits into decoder and head
(recovery/chunked.py checks that it does): a 512-token window of a 151,936-token vocabulary would otherwise be
311 MB of float32 logits, and as much again inside the softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

LOGIT_CHUNK = 128  # tokens whose logits exist at once
PROBE_TOKENS = 8  # the split of decoder and head is checked on this many tokens of the first window


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, device: torch.device | str = "cpu", progress: bool = True,
               desc: str = "perplexity", chunk: int = LOGIT_CHUNK) -> float:
    """Each window is scored on its own (no context carried over); every token but the first is predicted.
    One window at a time: on a CPU batching buys nothing. ``chunk``: tokens whose logits are made at once
    (0: the model's logits whole)."""
    from ..recovery.chunked import split_head

    model_device = next(model.parameters()).device
    model.to(device)
    total, count = 0.0, 0
    try:
        split = split_head(model, windows[:1, :PROBE_TOKENS].to(device)) if chunk else None
        for window in tqdm(windows, desc=desc, unit="window", disable=not progress):
            ids = window.unsqueeze(0).to(device)
            total += nll_sum(model, ids, split, chunk)
            count += ids.shape[1] - 1
    finally:
        model.to(model_device)
    return math.exp(total / count)


def nll_sum(model, ids: torch.Tensor, split=None, chunk: int = LOGIT_CHUNK) -> float:
    """The summed next-token NLL of ``ids`` [b, s] (every token but each row's first is predicted): through
    ``split`` (a HeadSplit of ``model``) ``chunk`` tokens at a time, or from the model's logits whole."""
    targets = ids[:, 1:].flatten()
    if split is None:
        logits = model(input_ids=ids, use_cache=False).logits
        return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, reduction="sum"))
    hidden = split.decoder(input_ids=ids, use_cache=False).last_hidden_state[:, :-1].flatten(0, 1)
    total = 0.0
    for start in range(0, len(targets), chunk):
        logits = split.head(hidden[start : start + chunk]).float()
        total += float(F.cross_entropy(logits, targets[start : start + chunk], reduction="sum"))
    return total
