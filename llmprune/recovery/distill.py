"""Distillation from the dense model: its next-token distributions, kept as top-k log-probabilities plus one
bucket for the rest, the targets of the KL loss (``distill_loss`` in recovery/losses.py) that trains the pruned
model (student) to match them.

Design choice: the teacher never sits beside the student. Its targets are computed in one dense pass over the
recovery windows before pruning (the same model object, before it is pruned) and kept in memory or spilled to
safetensors files, so training peaks at the student's own memory. Per token a target costs
``k * (2 + 4) + 4`` bytes (k float16 log-probabilities, k int32 token ids, one float32 bucket): 388 bytes at
k = 64, so 20 MB for the default budget of 100 steps x 2 x 256 tokens and 79 MB for four times that.

The student's distribution is collapsed onto the same k + 1 outcomes (the teacher's top-k tokens, and everything
else as one outcome) before the KL is taken, so the loss compares two proper distributions over the same events.
It is the full-vocabulary KL when k covers the vocabulary, and a lower bound of it otherwise (merging outcomes
cannot increase a KL).

Optionally the same pass keeps the outputs of a few decoder layers (``hidden_layers``, bfloat16, whose range
holds any residual stream: ``2 * hidden`` bytes per token per layer, 59 MB per layer for the default budget at hidden size 576), for a hidden-state term
(``hidden_loss`` in recovery/losses.py) that pulls each surviving layer's output towards the dense model's.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llmprune.errors import LLMPruneError
from llmprune.recovery.losses import log_mass_outside

MANIFEST = "teacher.json"
FIELDS = ("logprobs", "indices", "rest")


@dataclass
class TeacherTargets:
    """The teacher's top-k log-probabilities at ``temperature`` for every position of every window in ``windows``.

    Stored in chunks of consecutive windows: each chunk is a dict of tensors (in memory) or a safetensors file
    (spilled; read a few rows at a time, so the file is never held whole). ``offset`` and ``windows`` describe the
    slice this object covers, so :meth:`subset` hands one share of the budget to each stage of a schedule.
    """

    windows: torch.Tensor  # [n, seqlen] token ids the teacher scored; training must use exactly these
    vocab_size: int
    topk: int
    temperature: float
    chunk_windows: int
    chunks: list = field(repr=False)  # dict[str, Tensor] per chunk, or Path per spilled chunk
    offset: int = 0
    hidden_layers: tuple[int, ...] = ()  # decoder layers (of the dense model) whose outputs were kept
    hidden_size: int = 0

    def __len__(self) -> int:
        return len(self.windows)

    @property
    def bytes_per_token(self) -> int:
        return self.topk * (2 + 4) + 4 + 2 * self.hidden_size * len(self.hidden_layers)

    def subset(self, start: int, stop: int) -> TeacherTargets:
        """Targets of windows[start:stop] (no copy)."""
        if not 0 <= start < stop <= len(self):
            raise LLMPruneError(f"teacher subset [{start}, {stop}) is outside its {len(self)} windows")
        return replace(self, windows=self.windows[start:stop], offset=self.offset + start)

    def rows(self, window_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-probs float32 [b, seqlen, k], token ids int64 [b, seqlen, k], bucket float32 [b, seqlen, 1])."""
        logprobs, indices, rest = self._read(window_indices, FIELDS)
        return logprobs.float(), indices.long(), rest.float().unsqueeze(-1)

    def hidden_rows(self, window_indices: torch.Tensor) -> dict[int, torch.Tensor]:
        """Dense layer index -> that layer's output, float32 [b, seqlen, hidden], for each of ``hidden_layers``."""
        read = self._read(window_indices, tuple(_hidden_field(layer) for layer in self.hidden_layers))
        return {layer: tensor.float() for layer, tensor in zip(self.hidden_layers, read)}

    def _read(self, window_indices: torch.Tensor, names: tuple[str, ...]) -> list[torch.Tensor]:
        by_chunk: dict[int, list[tuple[int, int]]] = {}  # chunk -> (slot in the batch, row in the chunk)
        for slot, index in enumerate(window_indices.tolist()):
            position = index + self.offset
            by_chunk.setdefault(position // self.chunk_windows, []).append((slot, position % self.chunk_windows))
        rows: list = [None] * len(window_indices)
        for chunk_index, slots in by_chunk.items():
            read = _read_rows(self.chunks[chunk_index], [row for _, row in slots], names)
            for j, (slot, _) in enumerate(slots):
                rows[slot] = tuple(read[name][j] for name in names)
        return [torch.stack(column) for column in zip(*rows)]

    @classmethod
    def load(cls, spill_dir: str | Path) -> TeacherTargets:
        """Targets spilled by :func:`teacher_topk` (``spill_dir``), e.g. by another process."""
        spill_dir = Path(spill_dir)
        manifest_path = spill_dir / MANIFEST
        if not manifest_path.is_file():
            raise LLMPruneError(f"{spill_dir} holds no teacher targets ({MANIFEST} missing): compute them with "
                                f"teacher_topk(..., spill_dir=...)")
        manifest = json.loads(manifest_path.read_text())
        from safetensors.torch import load_file

        windows = load_file(str(spill_dir / "windows.safetensors"))["windows"]
        return cls(windows=windows, vocab_size=manifest["vocab_size"], topk=manifest["topk"],
                   temperature=manifest["temperature"], chunk_windows=manifest["chunk_windows"],
                   chunks=[spill_dir / name for name in manifest["chunks"]],
                   hidden_layers=tuple(manifest.get("hidden_layers", ())), hidden_size=manifest.get("hidden_size", 0))


def _hidden_field(layer: int) -> str:
    return f"hidden.{layer}"


def _read_rows(chunk, rows: list[int], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    if isinstance(chunk, dict):
        index = torch.tensor(rows)
        return {name: chunk[name][index] for name in names}
    from safetensors import safe_open

    # Opened per read: the mapping is released at once, so spilled targets do not pile up in resident memory.
    with safe_open(str(chunk), framework="pt") as handle:
        return {name: torch.stack([handle.get_slice(name)[row] for row in rows]) for name in names}


def output_vocab_size(model) -> int:
    """How many outcomes the model's logits have (its output embedding's rows)."""
    return model.get_output_embeddings().weight.shape[0]


@torch.inference_mode()
def teacher_topk(model, windows: torch.Tensor, k: int, batch_size: int = 4, progress: bool = True, *,
                 temperature: float = 1.0, spill_dir: str | Path | None = None,
                 chunk_windows: int = 64, hidden_layers: tuple[int, ...] = (),
                 logit_chunk: int = 128) -> TeacherTargets:
    """The dense ``model``'s top-``k`` log-probabilities at ``temperature`` on every position of ``windows``
    ([n, seqlen] LongTensor), and the log of the mass outside the top k. Call it before pruning.

    Kept in memory unless ``spill_dir`` is given: then written there as safetensors chunks of ``chunk_windows``
    windows (plus a manifest, so :meth:`TeacherTargets.load` reads them back). Memory per token: ``k * 6 + 4``
    bytes (float16 log-probs, int32 ids, float32 bucket); the only other cost is ``logit_chunk`` tokens' logits
    (and their softmax) at a time where the model splits into decoder and head (recovery/chunked.py), else one
    batch's. ``hidden_layers``: decoder layer indices whose outputs are kept too (bfloat16, for
    :func:`~llmprune.recovery.losses.hidden_loss`).
    """
    if windows.dim() != 2 or windows.dtype != torch.long or windows.shape[0] == 0:
        raise LLMPruneError(f"teacher windows must be a LongTensor [n_windows, seqlen], got {windows.dtype} "
                            f"{list(windows.shape)}")
    vocab = output_vocab_size(model)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise LLMPruneError(f"distillation top-k must be a positive integer, got {k!r}: set --distill-topk, e.g. 64")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise LLMPruneError(f"distillation temperature must be a positive number, got {temperature!r}: "
                            f"set --distill-temperature, e.g. 1.0")
    k = min(k, vocab)
    hidden_layers = tuple(sorted(set(hidden_layers)))
    if hidden_layers:
        from llmprune.inputs.models import decoder_layers

        layers = decoder_layers(model)[1]
        if hidden_layers[0] < 0 or hidden_layers[-1] >= len(layers):
            raise LLMPruneError(f"hidden layers {list(hidden_layers)} are outside the model's {len(layers)} decoder "
                                f"layers")
    if spill_dir is not None:
        spill_dir = Path(spill_dir)
        spill_dir.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    hidden_size = 0
    from llmprune.evaluation.perplexity import PROBE_TOKENS
    from llmprune.recovery.chunked import split_head

    split = split_head(model, windows[:1, :PROBE_TOKENS].to(device)) if logit_chunk else None
    try:
        with tqdm(total=len(windows), desc="teacher top-k", unit="window", disable=not progress) as bar, \
                capture_layer_outputs(model, hidden_layers) as outputs:
            for chunk_start in range(0, len(windows), chunk_windows):
                chunk_stop = min(chunk_start + chunk_windows, len(windows))
                parts = {name: [] for name in (*FIELDS, *map(_hidden_field, hidden_layers))}
                for start in range(chunk_start, chunk_stop, batch_size):
                    batch = windows[start : min(start + batch_size, chunk_stop)].to(device)
                    logprobs, indices, rest = _batch_topk(model, split, batch, k, temperature, logit_chunk)
                    parts["logprobs"].append(logprobs.to(torch.float16).cpu())
                    parts["indices"].append(indices.to(torch.int32).cpu())
                    parts["rest"].append(rest.squeeze(-1).cpu())
                    for layer in hidden_layers:
                        parts[_hidden_field(layer)].append(outputs[layer].to(torch.bfloat16).cpu())
                        hidden_size = outputs[layer].shape[-1]
                    bar.update(len(batch))
                chunk = {name: torch.cat(tensors) for name, tensors in parts.items()}
                chunks.append(_store_chunk(chunk, spill_dir, len(chunks)))
    finally:
        model.train(was_training)
    targets = TeacherTargets(windows=windows.cpu().clone(), vocab_size=vocab, topk=k, temperature=float(temperature),
                             chunk_windows=chunk_windows, chunks=chunks, hidden_layers=hidden_layers,
                             hidden_size=hidden_size)
    if spill_dir is not None:
        from safetensors.torch import save_file

        from llmprune.output.atomic import write_json_atomically

        save_file({"windows": targets.windows}, str(spill_dir / "windows.safetensors"))
        # The manifest last and whole: TeacherTargets.load finds complete targets or none.
        write_json_atomically(spill_dir / MANIFEST, {
            "vocab_size": vocab, "topk": k, "temperature": float(temperature), "chunk_windows": chunk_windows,
            "chunks": [path.name for path in chunks], "hidden_layers": list(hidden_layers),
            "hidden_size": hidden_size})
    return targets


def _batch_topk(model, split, batch: torch.Tensor, k: int, temperature: float, chunk: int):
    """topk_with_bucket over a batch [b, s]: through ``split`` (decoder, then head) ``chunk`` tokens at a time,
    or over the model's logits whole."""
    if split is None:
        return topk_with_bucket(model(input_ids=batch, use_cache=False).logits, k, temperature)
    hidden = split.decoder(input_ids=batch, use_cache=False).last_hidden_state.flatten(0, 1)
    pieces = [topk_with_bucket(split.head(hidden[start : start + chunk]), k, temperature)
              for start in range(0, len(hidden), chunk)]
    return tuple(torch.cat(column).unflatten(0, batch.shape) for column in zip(*pieces))


def _store_chunk(chunk: dict[str, torch.Tensor], spill_dir: Path | None, number: int):
    if spill_dir is None:
        return chunk
    from safetensors.torch import save_file

    path = spill_dir / f"teacher-{number:05d}.safetensors"
    save_file(chunk, str(path))
    return path


def topk_with_bucket(logits: torch.Tensor, k: int, temperature: float):
    """From logits [..., vocab]: the top-k log-probabilities at ``temperature`` and their ids, and the log of the
    probability outside them ([..., 1]; -inf when k covers the vocabulary)."""
    logprobs = F.log_softmax(logits.float() / temperature, dim=-1)
    top, indices = logprobs.topk(k, dim=-1)
    return top, indices, log_mass_outside(logprobs, indices)


def evenly_spaced_layers(n_layers: int, count: int) -> tuple[int, ...]:
    """``count`` decoder layer indices spread evenly over ``n_layers``, the last layer always among them."""
    count = min(count, n_layers)
    return tuple(sorted({n_layers - 1 - round(i * n_layers / count) for i in range(count)}))


@contextmanager
def capture_layer_outputs(model, layers: tuple[int, ...]):
    """While open, ``outputs[i]`` is the hidden-state output of decoder layer ``i`` (for each of ``layers``) from
    the model's latest forward: a forward hook, so any decoder family works and the tensor stays in the graph."""
    outputs: dict[int, torch.Tensor] = {}
    if not layers:
        yield outputs
        return
    from llmprune.inputs.models import decoder_layers

    modules = decoder_layers(model)[1]

    def keep(index):
        def hook(module, args, output):
            outputs[index] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    handles = [modules[index].register_forward_hook(keep(index)) for index in layers]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
