"""The search's second round (--search-topk K, --search-steps N): distil the K best candidates before choosing.

A one-shot KL ranks shapes by how much they lose before any training; shapes differ in how much of that a
little training gets back (Minitron; NVIDIA ModelOpt's search distils its top candidates briefly for the same
reason). So each of the K candidates with the smallest one-shot KL is pruned again on a copy of the dense model,
distilled from the dense model for N steps with the recovery code (teacher: the dense model's top-k on windows
of the calibration text, computed once and shared; student: the candidate; LoRA or full per --recover-params),
and scored again by KL on the same validation windows. The candidate with the smallest KL after distillation
is chosen; both scores are kept (`kl`, `kl_distilled`). The held-out text is never read.
"""

from __future__ import annotations

import copy
import math

import torch

from ...errors import LLMPruneError


def distill_windows(tokens: torch.Tensor, steps: int, batch: int, seqlen: int, seed: int) -> torch.Tensor:
    """steps x batch non-overlapping windows of `seqlen`, drawn (seeded) from `tokens`: the calibration text
    before the search's validation windows."""
    count = tokens.numel() // seqlen
    needed = steps * batch
    if count < needed:
        raise LLMPruneError(f"--search-steps {steps} x --recover-batch {batch} windows of --recover-seqlen {seqlen} "
                            f"need {needed * seqlen} tokens, but the calibration text before the validation windows "
                            f"holds {tokens.numel()}: lower --search-steps, or give a larger --calib")
    windows = tokens[: count * seqlen].view(count, seqlen)
    chosen = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:needed]
    return windows[chosen.sort().values]


def search_recovery_config(recovery, steps: int, seed: int):
    """The recovery settings of the search's distillation: the run's (LoRA or full, lr, batch, seqlen, top-k,
    temperature), as distillation, for `steps` steps, no validation passes (the KL is the score), no hidden term."""
    from dataclasses import replace

    from ...config import RecoverConfig

    recovery = recovery or RecoverConfig()
    return replace(recovery, loss="distill", steps=steps, eval_every=0, distill_hidden=0.0, distill_alpha=0.0,
                   teacher_spill=None, seed=seed)


def prune_candidate(model, calibration, base, candidate, progress: bool = False):
    """Prune `model` in place to `candidate`'s shape, removing the very layers it names in `layers_removed` (when
    it names none, the layers are ranked as on any run)."""
    from .search import prune_shape

    return prune_shape(model, calibration, base, candidate.shape, progress, layers_removed=candidate.layers_removed)


def distill_candidates(model, calibration, validation, train_windows, base, found: list, topk: int, recovery,
                       progress: bool = True) -> dict:
    """Distil the `topk` best scored candidates of `found` (best first, as search_shapes returns them) and score
    them again; `found` is re-ordered in place: the distilled ones by `kl_distilled`, then the other scored
    ones by `kl`, then the unscored. `model` stays dense. Returns the record of the round (settings, seconds)."""
    import time

    from tqdm.auto import tqdm

    from ...recovery.distill import teacher_topk
    from ...recovery.train import train_recovery
    from .search import dense_log_probs, kl_to_dense

    started = time.perf_counter()
    chosen = [c for c in found if c.kl is not None and math.isfinite(c.kl)][:topk]
    if not chosen:
        return {}
    dense = dense_log_probs(model, validation)
    teacher = teacher_topk(model, train_windows, recovery.distill_topk, progress=progress,
                           temperature=recovery.distill_temperature, logit_chunk=recovery.loss_chunk)
    seconds = []
    for candidate in tqdm(chosen, desc=f"distilling the best {len(chosen)} candidates", unit="candidate",
                          disable=not progress):
        began = time.perf_counter()
        student = copy.deepcopy(model)
        prune_candidate(student, calibration, base, candidate, progress=False)
        train_recovery(student, train_windows, None, recovery, teacher=teacher, masks={}, progress=progress)
        candidate.kl_distilled = kl_to_dense(student, validation, dense)
        if not math.isfinite(candidate.kl_distilled):
            candidate.kl_distilled = math.inf
        seconds.append(round(time.perf_counter() - began, 1))
        del student
    found.sort(key=lambda c: (c.kl_distilled is None, c.kl is None,
                              c.kl_distilled if c.kl_distilled is not None else (c.kl or 0.0)))
    return {"candidates": len(chosen), "steps": recovery.steps, "batch": recovery.batch, "seqlen": recovery.seqlen,
            "params": recovery.params, "lr": recovery.lr, "topk": recovery.distill_topk,
            "windows": len(train_windows), "seconds_each": seconds,
            "seconds": round(time.perf_counter() - started, 1)}
