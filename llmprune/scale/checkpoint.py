"""Resume: after each layer, everything needed to continue is in one work folder, written atomically.

    model-IIIII-of-NNNNN.safetensors   each pruned layer's weights, under their full names (a streamed run's
                                       output shards: the same files become the output)
    hidden-IIIII.pt                    the inputs of layer I+1: the calibration windows' hidden states
    state.json                         the settings, the last complete layer and the report so far

Each file is written beside its final name and renamed over it; state.json is renamed last, so a run
killed at any instant leaves either the previous layer's checkpoint or this one's, never a mixture.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import LLMPruneError
from ..output.atomic import write_atomically

STATE = "state.json"


def settings_of(config, model: str, calibration: torch.Tensor | None, world: int = 1, **extra) -> dict:
    """What must not change between a run and its resumption (the device may: results are checked for it
    by the bit-identical test, not promised across devices)."""
    settings = {k: v for k, v in asdict(config).items() if k != "device"}
    digest = None
    if calibration is not None:
        digest = hashlib.sha256(calibration.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
    return settings | {"model": str(model), "calibration_sha256": digest, "world_size": world} | extra


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


STORED_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}  # a shard header's names


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """A safetensors file written tensor by tensor from the tensors' own memory. safetensors' save_file first
    copies every tensor into one bytes object: twice the layer in memory, which for a layer of 128 experts is
    gigabytes. Tensors follow the header in the order given, each right after the previous one (the format's
    rule); safe_open and from_pretrained read the file as any other."""
    with open(path, "wb") as f:
        _write_header(f, {name: (tensor.dtype, tensor.shape) for name, tensor in tensors.items()}, metadata)
        for tensor in tensors.values():
            _write_data(f, tensor.detach())


class StoredTensor:
    """One tensor of a safetensors file, read a range of rows at a time with pread: exactly those bytes.
    safetensors' own slices read the whole tensor first under its pread backend, and under mmap the pages they
    touch stay resident until the file is closed."""

    def __init__(self, path: str | Path, name: str):
        import struct

        with open(path, "rb") as f:
            length = struct.unpack("<Q", f.read(8))[0]
            entry = json.loads(f.read(length))[name]
        self.path, self.dtype, self.shape = path, STORED_DTYPES[entry["dtype"]], list(entry["shape"])
        self.begin = 8 + length + entry["data_offsets"][0]
        self.row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize

    def rows(self, start: int, stop: int) -> torch.Tensor:
        import os

        out = torch.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        buffer, done = memoryview(out.reshape(-1).view(torch.uint8).numpy()), 0
        fd = os.open(self.path, os.O_RDONLY)
        try:
            while done < len(buffer):  # a read may return less than asked
                read = os.preadv(fd, [buffer[done:]], self.begin + start * self.row_bytes + done)
                if read <= 0:
                    raise LLMPruneError(f"{self.path} ends inside its tensor data: the file is truncated")
                done += read
        finally:
            os.close(fd)
        return out


def copy_safetensor(source: str | Path, name: str, path: str | Path, dtype: torch.dtype | None = None,
                    metadata: dict | None = None, chunk_bytes: int = 64 << 20) -> int:
    """Tensor `name` of the safetensors file `source`, alone in a new file at `path`, floating point converted to
    `dtype`; read and written a block of rows at a time, so that a 151,936-word embedding (545 MB in float32)
    never sits in memory whole. Returns the bytes written as tensor data."""
    stored = StoredTensor(source, name)
    target = dtype if dtype is not None and stored.dtype.is_floating_point else stored.dtype
    count = stored.shape[0] if stored.shape else 1  # a scalar is one row of itself
    step = max(1, chunk_bytes // (math.prod(stored.shape[1:]) * max(stored.dtype.itemsize, target.itemsize) or 1))
    with open(path, "wb") as out:
        _write_header(out, {name: (target, stored.shape)}, metadata)
        for start in range(0, count, step):
            _write_data(out, stored.rows(start, min(start + step, count)).to(target))
    return math.prod(stored.shape) * target.itemsize


def _write_data(f, tensor: torch.Tensor) -> None:
    """A tensor's bytes, from its own memory (a contiguous copy only if it is a view)."""
    if tensor.numel():
        f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _write_header(f, entries: dict[str, tuple[torch.dtype, tuple]], metadata: dict | None) -> None:
    """The 8-byte length and the JSON header of a safetensors file, tensors laid out in `entries`' order."""
    import struct

    header, offset = {}, 0
    for name, (dtype, shape) in entries.items():
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, padded with spaces as safetensors does
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


class WorkFolder:
    """The checkpoint of one prune. `resume=False` starts afresh (clearing a previous run's folder);
    `resume=True` refuses, in one line, when there is nothing to resume or the settings differ."""

    def __init__(self, path: str | Path, settings: dict, prefix: str, layer_count: int, shard_count: int | None = None,
                 resume: bool = False, stored_form=None):
        self.path, self.settings, self.prefix = Path(path), settings, prefix
        self.stored_form = stored_form  # a streamed run's layer files are the output: in the source's stored form
        self.layer_count, self.shard_count = layer_count, shard_count or layer_count
        state = self.path / STATE
        if resume:
            if not state.is_file():
                raise LLMPruneError(f"--resume: {self.path} holds no interrupted run to resume; run without --resume")
            saved = json.loads(state.read_text())
            changed = sorted(k for k in settings.keys() | saved["settings"].keys()
                             if settings.get(k) != saved["settings"].get(k))
            if changed:
                raise LLMPruneError(f"--resume: the interrupted run in {self.path} used other settings "
                                    f"({', '.join(changed)}); repeat its settings or run without --resume")
            self.state = saved
        else:
            if self.path.exists():
                shutil.rmtree(self.path)
            self.state = None
        self.path.mkdir(parents=True, exist_ok=True)

    def layer_file(self, i: int) -> Path:
        return self.path / shard_name(i, self.shard_count)

    def restore(self, layers, calls, report, reshape=None) -> int:
        """Put back what the interrupted run had finished; returns the first layer left to prune. `reshape(i,
        layer)`, given by a prune that changes shapes, makes layer i (in memory or on the meta device) take the
        shapes it had when checkpointed, from the restored report; its weights are then read into it."""
        if self.state is None:
            return 0
        from safetensors.torch import load_file

        done = self.state["done"]
        report.restore_state(self.state["report"])
        for i in range(done + 1):
            if reshape is not None:
                reshape(i, layers[i])
            if next(layers[i].parameters()).device.type != "meta":  # held in memory: give it its pruned weights
                prefix = f"{self.prefix}.{i}."
                weights = {k[len(prefix):]: v for k, v in load_file(self.layer_file(i)).items()}
                layers[i].load_state_dict(weights)
        if calls is not None and done + 1 < len(layers):
            calls.hidden.copy_(torch.load(self.path / f"hidden-{done:05d}.pt", mmap=True, weights_only=True))
        return done + 1

    def save(self, i: int, layer, calls, report) -> None:
        from ..runtime import release_free_memory

        release_free_memory()  # the statistics and solves leave freed pieces in glibc's heaps: give them back
        # before the save's own copies (transformers' split of fused experts), or the two add up at the peak
        weights = {f"{self.prefix}.{i}.{k}": v.detach().to("cpu").contiguous() for k, v in layer.state_dict().items()}
        if self.stored_form is not None:
            weights = self.stored_form(weights)
        write_atomically(self.layer_file(i), lambda p: write_safetensors(weights, p, {"format": "pt"}))
        if calls is not None and i + 1 < self.layer_count:
            write_atomically(self.path / f"hidden-{i:05d}.pt", lambda p: torch.save(calls.hidden.to("cpu"), p))
        state = {"settings": self.settings, "done": i, "report": report.state()}
        write_atomically(self.path / STATE, lambda p: p.write_text(json.dumps(state, indent=1)))
        for old in self.path.glob("hidden-*.pt"):
            if old.name != f"hidden-{i:05d}.pt":
                old.unlink()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def default_work_dir(output: str | Path) -> Path:
    """Beside the output, on the same filesystem, so that finished shards are moved into it by renaming."""
    output = Path(output)
    return output.parent / f".{output.name}.work"


def check_resumable(work_dir: str | Path) -> None:
    """The cheap part of --resume's checks, for the start of a run (the settings are compared later)."""
    if not (Path(work_dir) / STATE).is_file():
        raise LLMPruneError(f"--resume: {work_dir} holds no interrupted run to resume; run without --resume")


def prune_resumable(model, calibration, config, work_dir, model_id: str, resume: bool = False, progress: bool = True,
                    **prune_options):
    """The in-memory runner with a checkpoint after every layer in `work_dir`; `resume` continues the last
    complete layer. `config`: a PruneConfig, or a StructuredConfig for a structured prune. The caller removes
    work_dir once the output is written. Returns the PruneReport."""
    from ..inputs.models import decoder_layers
    from ..pruning.runner import prune
    from ..pruning.structured import StructuredConfig, prune_structured

    prefix, layers = decoder_layers(model)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    work = WorkFolder(work_dir, settings_of(config, model_id, calibration, dtype=dtype, stream=False), prefix,
                      len(layers), resume=resume)
    run = prune_structured if isinstance(config, StructuredConfig) else prune
    return run(model, calibration, config, progress, checkpoint=work, **prune_options)
