"""Perplexity, the papers' protocol: exp(mean token NLL) over non-overlapping windows of the joined text.

(lm-eval's own `wikitext` task reports word perplexity over whole documents: a different number.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, device: torch.device | str = "cpu", progress: bool = True,
               desc: str = "perplexity") -> float:
    """Each window is scored on its own (no context carried over); every token but the first is predicted.
    One window at a time: on a CPU batching buys nothing, and a window's logits are already vocab x seqlen."""
    model_device = next(model.parameters()).device
    model.to(device)
    total, count = 0.0, 0
    try:
        for window in tqdm(windows, desc=desc, unit="window", disable=not progress):
            ids = window.unsqueeze(0).to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            total += float(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    finally:
        model.to(model_device)
    return math.exp(total / count)
