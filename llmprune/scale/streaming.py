"""Models larger than memory: a weightless skeleton, and each decoder layer read from the safetensors shards
only while it is worked on, pruned, and written to the output's shards as it goes.

    skeleton        accelerate's init_empty_weights: every parameter on the meta device, costing nothing
    embeddings etc. the tensors outside the decoder layers (the output head only when evaluating); of the input
                    embedding only the rows the calibration's tokens use (input_rows)
    StreamedLayers  load(i): layer i's tensors, and only those, via safetensors.safe_open; done(i): freed
    streamed_prune  the runner's loop (unstructured or structured) with this store and a WorkFolder, whose
                    layer files become the output

The output is a standard sharded safetensors directory (one shard per decoder layer, one per other
tensor, model.safetensors.index.json) that from_pretrained loads. The dense model is never whole in memory.
"""

from __future__ import annotations

import json
import math
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from ..errors import LLMPruneError
from ..inputs.models import DTYPES, decoder_layers, linears, weight_matrix
from ..runtime import available_memory_bytes, map_large_allocations, release_free_memory, resolve_device
from .checkpoint import STORED_DTYPES, StoredTensor, WorkFolder, copy_safetensor, default_work_dir, settings_of, \
    shard_name, write_safetensors

INDEX = "model.safetensors.index.json"


def weight_map(model_dir: str | Path) -> dict[str, Path]:
    """{tensor name: shard file} of a safetensors model directory; anything else is a one-line error."""
    model_dir = Path(model_dir)
    if model_dir.suffix == ".gguf" or model_dir.is_file():
        raise LLMPruneError(f"--stream reads safetensors shards, and {model_dir} is a single file; convert it with "
                            f"save_pretrained (safetensors) or run without --stream")
    if not (model_dir / "config.json").is_file():
        raise LLMPruneError(f"--stream needs a local Hugging Face model directory with config.json: {model_dir}")
    if (model_dir / INDEX).is_file():
        mapping = json.loads((model_dir / INDEX).read_text())["weight_map"]
        return {name: model_dir / shard for name, shard in mapping.items()}
    if (model_dir / "model.safetensors").is_file():
        from safetensors import safe_open

        with safe_open(model_dir / "model.safetensors", "pt") as f:
            return dict.fromkeys(f.keys(), model_dir / "model.safetensors")
    raise LLMPruneError(f"--stream reads safetensors, and {model_dir} holds none (pickled .bin weights cannot be read "
                        f"piecewise): convert it with save_pretrained(safe_serialization=True) or run without --stream")


def weight_bytes(model_dir: str | Path) -> int:
    return sum(f.stat().st_size for f in set(weight_map(model_dir).values()))


def should_stream(model_dir: str | Path, share: float = 0.5) -> tuple[bool, str]:
    """The auto rule: stream when the weights on disk exceed `share` of the memory available now."""
    available = available_memory_bytes(torch.device("cpu")) or 0  # unknown: stream, the safe side
    size = weight_bytes(model_dir)
    gib = 2 ** 30
    return size > share * available, (f"the weights take {size / gib:.1f} GiB and {available / gib:.1f} GiB of memory "
                                      f"is available")


class StreamedModel:
    """A model skeleton whose decoder layers are read from `model_dir` on demand."""

    def __init__(self, model_dir: str | Path, dtype: str = "float32", trust_remote_code: bool = False):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.dir, self.dtype = Path(model_dir), DTYPES[dtype]
        self.files = weight_map(model_dir)
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        with init_empty_weights():  # parameters on the meta device; buffers (rotary tables) real and small
            self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype, trust_remote_code=trust_remote_code)
        self.model.tie_weights()  # init_empty_weights skips it; a tied head must be the embeddings object
        self.model.eval()
        self.prefix, self.layers = decoder_layers(self.model)
        self.targets, self.converters = stored_names(self.model, self.files)
        # stored in another form than the model's (per-expert tensors fused at load): the output is written back
        # in the stored form, as save_pretrained would
        self.converted = any(target != name for name, (target, _) in self.targets.items())
        in_layers = [n for n in self.files if self.targets[n][0].startswith(f"{self.prefix}.")]
        self.rest = [n for n in self.files if n not in in_layers]  # embeddings, final norm, head
        head, embedding = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        self.tied = head is None or head.weight is embedding.weight
        head_names = [] if self.tied else [f"{name}.weight" for name, m in self.model.named_modules() if m is head]
        # The input embedding stored as one plain tensor is read by rows (input_rows); in any other form, whole.
        embedding_param = next(f"{name}.weight" for name, m in self.model.named_modules() if m is embedding)
        stored = [n for n in self.rest if self.targets[n][0] == embedding_param]
        self.embedding_name = stored[0] if len(stored) == 1 and self.targets[stored[0]][1] is None else None
        self.load_tensors([n for n in self.rest if n not in head_names and n != self.embedding_name], self.model, "",
                          "cpu")

    @contextmanager
    def input_rows(self, token_ids: torch.Tensor):
        """Within the block, the input embedding computes from only the rows of the tokens in `token_ids`, each
        token mapped to its row. A prune embeds its calibration once, for the capture: a 151,936-word vocabulary
        (545 MB in float32, 0.2x of a 0.5B model) then costs a few thousand rows."""
        if self.embedding_name is None:  # read whole at construction
            yield
            return
        embedding, used = self.model.get_input_embeddings(), torch.unique(token_ids)
        stored = StoredTensor(self.files[self.embedding_name], self.embedding_name)
        vocab = stored.shape[0]
        if not 0 <= int(used[0]) <= int(used[-1]) < vocab:
            raise LLMPruneError(f"token ids {int(used[0])}..{int(used[-1])} fall outside the model's {vocab}-word "
                                f"embedding: the calibration was tokenized for another model")
        rows = nn.Parameter(torch.cat([stored.rows(int(i), int(i) + 1) for i in used]).to(self.dtype),  # a pread a row
                            requires_grad=False)
        full = embedding.weight  # stays the parameter between calls: parameter counts see the whole table
        padding = getattr(embedding, "padding_idx", None)  # an index of the whole table; it matters to gradients only

        def forward(ids, *args, **kwargs):
            embedding.weight, embedding.padding_idx = rows, None
            try:
                return type(embedding).forward(embedding, torch.searchsorted(used.to(ids.device), ids), *args, **kwargs)
            finally:
                embedding.weight, embedding.padding_idx = full, padding

        embedding.forward = forward
        try:
            yield
        finally:
            del embedding.forward  # back to the class's forward

    def load_tensors(self, names, module: nn.Module, strip: str, device) -> None:
        """Read the stored tensors `names` (each shard opened once, only these tensors read) into `module`'s
        parameters, converted as from_pretrained converts them (e.g. per-expert matrices stacked into one)."""
        from contextlib import ExitStack
        from copy import deepcopy

        from accelerate.utils import set_module_tensor_to_device
        from safetensors import safe_open
        from transformers.core_model_loading import dot_natural_key

        groups: dict[str, list[str]] = {}  # parameter -> the stored tensors it is made of, experts in order
        for name in sorted(names, key=dot_natural_key):
            groups.setdefault(self.targets[name][0], []).append(name)
        with ExitStack() as stack:
            files = {file: stack.enter_context(safe_open(file, "pt", device="cpu", backend="pread"))  # owned copies:
                     for file in dict.fromkeys(self.files[n] for n in names)}  # no mapped pages linger
            for target, stored in groups.items():
                pattern = self.targets[stored[0]][1]
                if pattern is None:  # the tensor as it is stored (or renamed)
                    values = {target: files[self.files[stored[0]]].get_tensor(stored[0])}
                else:  # transformers' own converter for this parameter, given the tensors read
                    converter = deepcopy(self.converters[pattern])
                    for name in stored:
                        converter.add_tensor(target, name, self.targets[name][1],
                                             files[self.files[name]].get_tensor(name))
                    values = converter.convert(target, model=self.model, config=self.model.config)
                for name, value in values.items():
                    value = value[0] if isinstance(value, list) else value
                    set_module_tensor_to_device(module, name[len(strip):], device, value=value)
                del values
        if module is self.model and self.model.config.get_text_config().tie_word_embeddings:
            self.model.tie_weights()

    def stored_form(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`weights` (full parameter names) under the names and layout of the source's shards: transformers'
        save-time reversal of its load-time conversion (its split of gate and up copies them: one fused matrix's
        worth of memory while a layer is written)."""
        if not self.converted:
            return weights
        from transformers.core_model_loading import revert_weight_conversion

        return {name: value.contiguous() for name, value in revert_weight_conversion(self.model, weights).items()}

    def free(self, module: nn.Module) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name, _ in list(module.named_parameters()):
            set_module_tensor_to_device(module, name, "meta")

    def layer_names(self, i: int) -> list[str]:
        """The stored tensors that make layer i's parameters."""
        return [n for n in self.files if self.targets[n][0].startswith(f"{self.prefix}.{i}.")]


def stored_names(model: nn.Module, files) -> tuple[dict[str, tuple[str, str | None]], dict]:
    """({stored tensor name: (the parameter it loads into, the source pattern of the converter that builds that
    parameter, or None)}, {source pattern: converter}), by the rules from_pretrained applies
    (transformers.conversion_mapping): a family's renamings, and converters such as the one stacking a Hub
    checkpoint's per-expert `mlp.experts.E.gate_proj.weight` and `up_proj` into the fused `mlp.experts.gate_up_proj`.
    A name already the model's own is left as it is (a checkpoint stored in the fused form)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    params = model.state_dict()  # meta tensors: names only
    targets = {}
    for name in files:
        target, pattern = rename_source_key(name, renamings, converters, model.base_model_prefix, params)
        if target not in params and name in params:
            target, pattern = name, None
        targets[name] = (target, pattern)
    return targets, {p: converter for converter in converters for p in converter.source_patterns}


class StreamedLayers:
    """The runner's store for a StreamedModel: a layer exists in memory from load(i) to done(i). The
    embeddings serve only the capture, which comes before any layer is read: the first load drops them."""

    def __init__(self, streamed: StreamedModel, device: torch.device):
        self.streamed, self.device = streamed, device

    def load(self, i: int) -> nn.Module:
        if any(p.device.type != "meta" for p in self.streamed.model.parameters()):
            self.streamed.free(self.streamed.model)
        layer, prefix = self.streamed.layers[i], f"{self.streamed.prefix}.{i}."
        self.streamed.load_tensors(self.streamed.layer_names(i), layer, prefix, self.device)
        release_free_memory()  # the conversion's transient copies (per-expert tensors stacked) are freed now
        missing = [n for n, p in layer.named_parameters() if p.device.type == "meta"]
        if missing:
            raise LLMPruneError(f"{self.streamed.dir} lacks {prefix}{missing[0]}: the shards do not match config.json")
        for name, module in linears(layer).items():
            if not torch.isfinite(weight_matrix(module)).all():
                raise LLMPruneError(f"{prefix}{name} has NaN or Inf weights: the model file is damaged")
        return layer

    def done(self, i: int, layer: nn.Module) -> None:
        self.streamed.free(layer)
        release_free_memory()


@contextmanager
def streamed_prune(model_dir, out_dir, calibration, config, *, dtype: str = "float32", work_dir=None,
                   resume: bool = False, offload_activations=None, overwrite: bool = False, parallel=None,
                   progress: bool = True, trust_remote_code: bool = False):
    """Prune a safetensors model directory into `out_dir` without ever holding the dense model; `config` is a
    PruneConfig, or a StructuredConfig for a structured prune (the layers written shrink, and the config written
    states the new shapes). Yields (PruneReport, staging): the output folder, complete but not yet in place, where
    the caller may evaluate the model (streamed_perplexity(staging, ...)) and add files (report, model card); it
    becomes `out_dir` when the block ends without an error. `work_dir` (default: beside out_dir) holds the
    checkpoint; `resume` continues it. Under `parallel` (a DataParallel) `calibration` is this rank's share and
    only rank 0 writes: the other ranks get staging None."""
    from ..output.atomic import atomic_directory, check_output
    from ..pruning.runner import prune
    from ..pruning.structured import StructuredConfig, prune_structured

    writer = parallel is None or parallel.rank == 0
    if writer:
        check_output(out_dir, overwrite)
    if resume and parallel is not None and parallel.world > 1:
        raise LLMPruneError("--resume continues a single-process run; run it without torchrun")
    map_large_allocations()
    streamed = StreamedModel(model_dir, dtype, trust_remote_code)
    device = resolve_device(config.device)
    layer_count = len(streamed.layers)
    shard_count = layer_count + len(streamed.rest)
    work = None
    if writer:
        settings = settings_of(config, Path(model_dir).resolve(), calibration, 1 if parallel is None else parallel.world,
                               dtype=dtype, stream=True)
        work = WorkFolder(work_dir or default_work_dir(out_dir), settings, streamed.prefix, layer_count, shard_count,
                          resume, stored_form=streamed.stored_form)
    run = prune_structured if isinstance(config, StructuredConfig) else prune
    with streamed.input_rows(calibration):
        report = run(streamed.model, calibration, config, progress, store=StreamedLayers(streamed, device),
                     checkpoint=work, parallel=parallel, offload_activations=offload_activations)
    if writer:
        with atomic_directory(out_dir, overwrite) as staging:
            write_output(streamed, work, staging, report.structure)
            yield report, staging
        work.remove()
    else:
        yield report, None
    if parallel is not None:
        parallel.barrier()


def prune_streamed(model_dir, out_dir, calibration, config, **options):
    """streamed_prune, its output put in place as it is: returns the PruneReport."""
    with streamed_prune(model_dir, out_dir, calibration, config, **options) as (report, _):
        return report


def write_output(streamed: StreamedModel, work: WorkFolder, staging: Path, structure=None) -> None:
    """Move the pruned layers' shards in, write each other tensor as its own shard, the index and every
    non-weight file of the source (config, tokenizer, generation config). After a structured prune (`structure`,
    its record) the config is the pruned model's, and the shards of the layers it removed are left out, those
    after them renumbered."""
    from safetensors import safe_open

    removed = set(structure.removed_layers or ()) if structure is not None else set()
    kept = [i for i in range(work.layer_count) if i not in removed]
    shard_count = len(kept) + len(streamed.rest)
    mapping: dict[str, str] = {}
    total = 0
    for new, old in enumerate(kept):
        shard = shard_name(new, shard_count)
        if removed:  # names and shard numbers change: rewrite it
            old_prefix, new_prefix = f"{streamed.prefix}.{old}.", f"{streamed.prefix}.{new}."
            with safe_open(work.layer_file(old), "pt") as f:
                tensors = {new_prefix + name[len(old_prefix):]: f.get_tensor(name) for name in f.keys()}
            write_safetensors(tensors, staging / shard, {"format": "pt"})
        else:
            shutil.move(work.layer_file(old), staging / shard)
        with safe_open(staging / shard, "pt") as f:
            for name in f.keys():
                mapping[name] = shard
                piece = f.get_slice(name)
                total += math.prod(piece.get_shape()) * STORED_DTYPES[piece.get_dtype()].itemsize
    for j, name in enumerate(streamed.rest):  # floating point in the run's dtype, as from_pretrained(dtype=...)
        shard = shard_name(len(kept) + j, shard_count)  # then save_pretrained would write them
        total += copy_safetensor(streamed.files[name], name, staging / shard, streamed.dtype, {"format": "pt"})
        mapping[name] = shard
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(mapping.items()))}
    (staging / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    weights = set(streamed.files.values()) | {streamed.dir / INDEX}
    for source in streamed.dir.iterdir():
        if source.is_file() and source not in weights and not source.name.endswith((".bin", ".pt", ".pth")):
            shutil.copy2(source, staging / source.name)
    if structure is not None:  # the shapes changed: the config is the pruned model's, as save_pretrained writes it
        streamed.model.config.to_json_file(staging / "config.json")
    config = json.loads((staging / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = str(streamed.dtype).removeprefix("torch.")  # what the shards now hold
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")


@torch.inference_mode()
def streamed_perplexity(model_dir, windows: torch.Tensor, device=None, dtype: str = "float32", batch_size: int = 8,
                        offload_activations=None, progress: bool = True, trust_remote_code: bool = False) -> float:
    """The perplexity protocol of evaluation/perplexity.py, layer by layer: every window's hidden states go
    through layer i before layer i+1 is read. The model's own forward then applies its final norm and head,
    with the decoder layers replaced by the states they would have produced."""
    import math

    from tqdm.auto import tqdm

    from ..pruning.runner import capture_layer_calls, propagate

    device = resolve_device(device) if not isinstance(device, torch.device) else device
    map_large_allocations()
    streamed = StreamedModel(model_dir, dtype, trust_remote_code)
    store = StreamedLayers(streamed, device)
    with streamed.input_rows(windows):
        calls = capture_layer_calls(streamed.model, streamed.layers, windows, batch_size, device, progress,
                                    offload_activations)
    for i in tqdm(range(len(streamed.layers)), desc="perplexity (streamed)", unit="layer", disable=not progress):
        layer = store.load(i)
        propagate(layer, i, calls)
        store.done(i, layer)
    # The final norm and the head; the forward below also embeds the windows (for nothing: layer 0 is replaced), so
    # the input embedding comes back by rows, or whole where it is the head.
    streamed.load_tensors([n for n in streamed.rest if streamed.tied or n != streamed.embedding_name], streamed.model,
                          "", "cpu")
    model_device = next(p.device for p in streamed.model.parameters() if p.device.type != "meta")
    with nullcontext() if streamed.tied else streamed.input_rows(windows):
        total, count = _head_nll(streamed, calls, windows, model_device)
    return math.exp(total / count)


def _head_nll(streamed: StreamedModel, calls, windows: torch.Tensor, model_device) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens) of the windows, given the last layer's states in `calls`."""
    from ..evaluation.perplexity import PROBE_TOKENS, nll_sum
    from ..recovery.chunked import split_head

    total, count, split = 0.0, 0, None
    for batch, rows in enumerate(calls.batches):
        final = calls.hidden[rows].to(model_device)
        ids = windows[rows].to(model_device)
        if batch == 0:  # does decoder + head give the model's logits? (checked on a few tokens, as perplexity does)
            with _replaced_layers(streamed.layers, final[:1, :PROBE_TOKENS]):
                split = split_head(streamed.model, ids[:1, :PROBE_TOKENS])
        with _replaced_layers(streamed.layers, final):
            total += nll_sum(streamed.model, ids, split)
        count += ids[:, 1:].numel()
    return total, count


@contextmanager
def _replaced_layers(layers, final: torch.Tensor):
    """The model's own forward with its decoder layers standing in: layer 0 yields the last layer's output
    (``final``), the rest pass it on."""
    for j, layer in enumerate(layers):
        layer.forward = (lambda hidden_states, *a, **k: final) if j == 0 else \
            (lambda hidden_states, *a, **k: hidden_states)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
