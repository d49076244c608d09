"""The one optimisation loop every recovery recipe runs: AdamW over batches of windows, with a validation curve.

What is trained (LoRA adapters, masked full weights) and what is minimised (LM loss, distillation) are the
caller's: it passes the parameters and a function from a batch of window indices to a loss.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

import torch
from tqdm.auto import tqdm

from llmprune.errors import LLMPruneError

# Validation perplexity this many times its starting value at a later point means the run is undoing the model,
# almost always a learning rate too high for it (measured: full fine-tuning of Qwen2.5-0.5B at 1e-4).
RISE_WARNING = 1.1


def epoch_order(n_windows: int, count: int, seed: int) -> torch.Tensor:
    """``count`` window indices: shuffled epochs over ``n_windows`` laid end to end, so every window is used equally
    often (each at most once when ``count <= n_windows``)."""
    generator = torch.Generator().manual_seed(seed)
    epochs = [torch.randperm(n_windows, generator=generator) for _ in range(-(-count // n_windows))]
    return torch.cat(epochs)[:count]


def adamw(params: list[torch.nn.Parameter], **options) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel (float CPU and CUDA tensors): one pass over each tensor, without the
    multi-tensor path's full-size temporaries, which raised full fine-tuning's peak memory by a share of the weights.
    Where fusing is not supported the plain (same arithmetic) implementation runs."""
    fusable = all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
    if fusable:
        try:
            return torch.optim.AdamW(params, fused=True, **options)
        except (RuntimeError, ValueError, TypeError):  # a torch or device without the fused kernel
            pass
    return torch.optim.AdamW(params, foreach=False, **options)


def train_loop(
    params: list[torch.nn.Parameter],
    batches: torch.Tensor,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    *,
    lr: float,
    weight_decay: float = 0.0,
    tokens_per_step: int,
    validate: Callable[[], float] | None = None,
    eval_every: int = 0,
    progress: bool = True,
    desc: str = "recovery",
) -> dict:
    """Run one AdamW step per row of ``batches`` ([steps, batch] window indices), gradients clipped to norm 1.

    ``validate`` (validation perplexity) is scored before the first step, every ``eval_every`` steps (0: never in
    between) and after the last. Returns ``losses`` (per step), ``curve`` (one point per validation: step, tokens,
    mean train loss since the previous point, val_ppl), ``seconds`` and ``validation_seconds``. A point more than
    ``RISE_WARNING`` times the first prints one warning naming a lower rate (the run goes on: it was asked for).
    """
    optimizer = adamw(params, lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    curve: list[dict] = []
    validation_seconds = 0.0
    warned = False

    def add_point(step: int) -> None:
        nonlocal validation_seconds, warned
        clock = time.perf_counter()
        val_ppl = validate()
        validation_seconds += time.perf_counter() - clock
        since = losses[curve[-1]["step"] if curve else 0 :]
        curve.append({"step": step, "tokens": step * tokens_per_step,
                      "train_loss": sum(since) / len(since) if since else None, "val_ppl": val_ppl})
        start_ppl = curve[0]["val_ppl"]
        if step and not warned and val_ppl > RISE_WARNING * start_ppl:  # shown with or without progress bars
            warned = True
            tqdm.write(f"llmprune: warning: recovery raised validation perplexity from {start_ppl:.2f} to "
                       f"{val_ppl:.2f} in {step} steps: the learning rate ({lr:g}) is too high for this model; "
                       f"try --recover-lr {lr / 10:g}", file=sys.stderr)

    start = time.perf_counter()
    if validate is not None:
        add_point(0)
    steps = len(batches)
    with tqdm(batches, desc=desc, unit="step", disable=not progress) as bar:
        for step, window_indices in enumerate(bar, 1):
            loss = loss_of(window_indices)
            if not torch.isfinite(loss):
                raise LLMPruneError(f"recovery loss became {loss.item()} at step {step}: "
                                    f"lower --recover-lr (now {lr:g})")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if validate is not None and (step == steps or (eval_every and step % eval_every == 0)):
                add_point(step)
            postfix = {"loss": f"{losses[-1]:.3f}"}
            if curve:
                postfix["val_ppl"] = f"{curve[-1]['val_ppl']:.2f}"
            bar.set_postfix(postfix)
    return {"losses": losses, "curve": curve, "seconds": time.perf_counter() - start,
            "validation_seconds": validation_seconds}
