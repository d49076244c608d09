"""The vocabulary-sized end of a training step, a chunk of tokens at a time.

A recovery step's largest tensors are not activations but logits: batch x seqlen x vocab floats, and the loss
makes several of them (log-softmax, the bucket's scatter, their gradients). At 2 x 256 tokens and SmolLM2's
49,152-token vocabulary each is 100 MB; at Gemma 3's 262,144 tokens each is 537 MB. So the model runs up to its
final hidden state (its decoder), and the head and loss run on ``chunk`` tokens at a time under activation
checkpointing: only the hidden state is kept, and the backward pass recomputes one chunk's logits at a time.
The head's matmul runs twice (a few percent of a step); the loss and its gradient are the same.

Which families this applies to is found, not listed: :func:`split_head` checks on one window that the decoder's
output through the output embedding gives the model's own logits, and returns None where it does not (a logit
soft-cap, a scale after the head), in which case the caller uses the model's logits whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class HeadSplit:
    decoder: nn.Module  # input_ids -> last_hidden_state (final norm included)
    head: nn.Module  # hidden -> logits


@torch.no_grad()
def split_head(model: nn.Module, sample_ids: torch.Tensor) -> HeadSplit | None:
    """The model as decoder + output embedding, if that reproduces its logits on ``sample_ids`` [1, s]."""
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if decoder is model or not isinstance(head, nn.Module):
        return None
    was_training = model.training
    model.eval()
    try:
        reference = model(input_ids=sample_ids, use_cache=False).logits
        output = decoder(input_ids=sample_ids, use_cache=False)
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None or hidden.shape[:-1] != sample_ids.shape:
            return None
        logits = head(hidden)
    except (TypeError, ValueError, RuntimeError):
        return None
    finally:
        model.train(was_training)
    if logits.shape != reference.shape or not torch.allclose(logits, reference, rtol=1e-4, atol=1e-4):
        return None
    return HeadSplit(decoder, head)


def chunked_sum(hidden: torch.Tensor, head: nn.Module, token_loss: Callable[..., torch.Tensor],
                per_token: tuple[torch.Tensor, ...], chunk: int) -> torch.Tensor:
    """Sum over all tokens of ``token_loss(logits, *rows)`` (which returns the sum over the tokens it is given),
    ``chunk`` tokens at a time, each chunk's logits recomputed in the backward pass instead of kept.

    ``hidden`` [b, s, d]; each of ``per_token`` [b, s, ...] is cut the same way as the hidden state."""
    flat = hidden.flatten(0, 1)
    rows = [tensor.flatten(0, 1) for tensor in per_token]

    def piece(h: torch.Tensor, *chunk_rows: torch.Tensor) -> torch.Tensor:
        return token_loss(head(h), *chunk_rows)

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk):
        stop = start + chunk
        total = total + checkpoint(piece, flat[start:stop], *(r[start:stop] for r in rows), use_reentrant=False)
    return total
