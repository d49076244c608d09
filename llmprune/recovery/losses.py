"""What recovery minimises, as functions of tensors: the next-token loss, the KL to the dense model's top-k
distributions (collapsed onto the same k + 1 outcomes), the hidden-state term, and their mix for one step.

A step's loss may be computed a chunk of tokens at a time (recovery/chunked.py): :func:`token_loss_share` returns
a chunk's share of the step's mean, so the shares of a step's chunks add up to it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NO_TARGET = -100  # the label of a position with no next token (cross_entropy's ignore_index)


def next_token_labels(ids: torch.Tensor) -> torch.Tensor:
    """Each position's next token ([b, s] -> [b, s]); :data:`NO_TARGET` at each window's last position."""
    return torch.cat([ids[:, 1:], ids.new_full((len(ids), 1), NO_TARGET)], dim=1)


def log_mass_outside(logprobs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """log(sum of exp(logprobs) outside ``indices``) ([..., 1]; -inf when they cover the vocabulary), summed over
    the outside directly: log1p(-sum of the top k) loses everything when the top k hold nearly all the mass, which
    is the common case."""
    if indices.shape[-1] == logprobs.shape[-1]:
        return torch.full_like(logprobs[..., :1], -math.inf)
    return logprobs.scatter(-1, indices, -math.inf).logsumexp(-1, keepdim=True)


def distill_loss(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_indices: torch.Tensor,
                 teacher_rest: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) on the k + 1 outcomes (top-k tokens, the rest), times T^2.

    ``student_logits`` [..., vocab]; teacher tensors as ``TeacherTargets.rows`` returns them. The T^2 factor
    keeps the gradient's scale independent of the temperature (Hinton et al.). The teacher's k + 1 log-probs are
    renormalised first: float16 storage leaves their sum a hair off 1.
    """
    logits = student_logits.float()
    if temperature != 1:  # at T = 1 no vocabulary-sized copy (logits / 1 is logits)
        logits = logits / temperature
    student = F.log_softmax(logits, dim=-1)
    student_top = student.gather(-1, teacher_indices)
    if teacher_indices.shape[-1] < student.shape[-1]:
        student_top = torch.cat([student_top, log_mass_outside(student, teacher_indices)], dim=-1)
        teacher = torch.cat([teacher_logprobs, teacher_rest], dim=-1)
    else:  # no outside: the bucket is empty for both
        teacher = teacher_logprobs
    teacher = F.log_softmax(teacher, dim=-1)
    kl = (teacher.exp() * (teacher - student_top)).sum(-1)
    return kl.mean() * temperature**2


def hidden_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layer pairs and tokens of the relative squared error ||s - t||^2 / ||t||^2 between the student's
    and the teacher's layer outputs ([b, s, hidden] each). Relative, so layers whose residual stream has grown
    large do not drown the others; per token, so one token's outlier features do not weigh on every token."""
    terms = []
    for s, t in zip(student, teacher, strict=True):
        t = t.to(s.device, torch.float32)
        error = (s.float() - t).pow(2).sum(-1)
        terms.append((error / t.pow(2).sum(-1).clamp_min(1e-12)).mean())
    return torch.stack(terms).mean()


def token_loss_share(logits: torch.Tensor, labels: torch.Tensor, *teacher_rows: torch.Tensor, loss: str,
                     alpha: float, temperature: float, step_tokens: int, step_predicted: int) -> torch.Tensor:
    """These tokens' share of a step's loss, from their ``logits`` [n, vocab], ``labels`` [n] and (``loss`` =
    "distill") the teacher's rows for them [n, ...].

    ``lm``: the next-token cross-entropy summed here over the step's ``step_predicted`` tokens that have a next
    token; ``distill``: the KL summed here over all ``step_tokens``, mixed with the LM term as
    ``(1 - alpha) * KL + alpha * LM``. Summed over a step's chunks, the shares give the step's mean loss.
    """
    logits = logits.float()
    if loss == "lm" or alpha:
        lm = F.cross_entropy(logits, labels, ignore_index=NO_TARGET, reduction="sum") / step_predicted
        if loss == "lm":
            return lm
    kl = distill_loss(logits, *teacher_rows, temperature) * len(logits) / step_tokens
    return (1 - alpha) * kl + alpha * lm if alpha else kl
