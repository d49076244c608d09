"""The run report: one typed, versioned schema, written as report.json and read back by everything that shows it
(the summary printed at the end, the model card, `llmprune report` and its plots).

Field names are a contract: scripts and other tools read report.json. Add fields, never rename them; bump
SCHEMA_VERSION when a field's meaning changes, and teach `from_dict` to read the older form.
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from .errors import LLMPruneError
from .output.atomic import write_text_atomically

SCHEMA_VERSION = 2  # 1: the untyped dict of llmprune 0.1 (no schema_version, no per-linear layer index)
STRUCTURE_VERSION = 1  # the `structure` record's own version (absent from the untyped records before it)


@dataclass
class LinearRecord:
    """One pruned linear: its full module name, its decoder layer, shape (out, in), target and achieved sparsity."""

    name: str
    layer: int | None
    shape: list[int]
    sparsity: float
    achieved_sparsity: float

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class Perplexity:
    dataset: str
    seqlen: int
    windows: int
    dense: float | None = None
    pruned: float | None = None
    recovered: float | None = None
    description: str | None = None  # what `dataset` is (for `code`, which Python's standard library)


@dataclass
class Calibration:
    source: str
    nsamples: int
    seqlen: int
    seed: int
    description: str | None = None  # what `source` is (for `code`, which Python's standard library)


@dataclass
class StructureLayer:
    """One decoder layer of a channel or head prune: how many units it kept, and the indices of those it removed."""

    index: int
    kept: int
    removed: list[int]


@dataclass
class StructureRecord:
    """What a structured prune removed: report.json's `structure`. Counts are units of `unit` (channels, heads,
    kv_groups, layers) per decoder layer, or decoder layers; a --schedule's record counts against the dense model
    and keeps each stage's own record in `stages`. Fields that apply to one structure only are None otherwise."""

    kind: str  # channels, heads, layers or hidden
    method: str  # the importance (channels, heads), the layer importance (layers) or hidden importance (hidden)
    sparsity: float  # asked, of the structure
    unit: str
    achieved_sparsity: float
    units_before: int
    units_kept: int
    bias_compensation: bool = False
    bias_compensation_note: str | None = None
    layers: list[StructureLayer] = field(default_factory=list)  # channels and heads
    round_to: int | None = None  # channels
    heads_mode: str | None = None  # heads
    heads_after: int | None = None
    kv_heads_after: int | None = None
    removed_layers: list[int] | None = None  # layers: dense indices
    layer_scores: list[float] | None = None  # layers: the importance of each, lowest removed first
    target_params: int | None = None  # --target-params (or --remove-params) as a count of all parameters
    params_before: int = 0
    params_after: int = 0
    params_removed_fraction: float = 0.0
    decoder_params_before: int = 0
    decoder_params_after: int = 0
    decoder_params_removed_fraction: float = 0.0
    config_changes: dict = field(default_factory=dict)  # config key -> new value
    seconds: dict[str, float] = field(default_factory=dict)
    stages: list[StructureRecord] | None = None  # --schedule: each stage's own record
    shape: dict[str, float] | None = None  # a shape over several structures: axis -> sparsity asked
    shape_source: str | None = None  # where that shape came from: "search", or the --shape file
    version: int = STRUCTURE_VERSION

    def kept_layers(self) -> list[int] | None:
        """The dense index of each decoder layer the prune left (None: it removed no layer)."""
        removed = set(self.removed_layers or ())
        return [i for i in range(self.units_before) if i not in removed] if removed else None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> StructureRecord:
        """Reads every version, the untyped records before STRUCTURE_VERSION included (their keys are these)."""
        data = dict(data)
        version = data.get("version", 0)
        if version > STRUCTURE_VERSION:
            raise LLMPruneError(f"this report's structure record has version {version}, newer than this llmprune "
                                f"reads ({STRUCTURE_VERSION}): upgrade llmprune")
        data["version"] = STRUCTURE_VERSION
        data["layers"] = [layer if isinstance(layer, StructureLayer) else StructureLayer(**layer)
                          for layer in data.get("layers") or []]
        if data.get("stages") is not None:
            data["stages"] = [s if isinstance(s, StructureRecord) else cls.from_dict(s) for s in data["stages"]]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Report:
    """What a run did and measured. `zero_shot*` hold lm-eval's scores ({"tasks": {task: {...}}, "mean_acc"});
    `recovery` the fine-tuning record; `structure` what structured pruning removed (None when unstructured)."""

    model: str  # what the user passed (--model), e.g. the alias "llama"
    model_name: str  # the real model, e.g. "SmolLM2-135M-Instruct"
    architecture: str
    method: str
    sparsity: float
    pattern: str
    allocation: str
    achieved_sparsity: float
    layer_sparsity: list[float] = field(default_factory=list)
    layers: list[LinearRecord] = field(default_factory=list)
    base_model: str | None = None
    license: str | None = None
    update: str = "none"
    calibration: Calibration | None = None
    perplexity: Perplexity | None = None
    zero_shot_dense: dict | None = None
    zero_shot: dict | None = None
    recovery: dict | None = None
    structure: StructureRecord | None = None
    moe: dict | None = None  # {min_expert_tokens, rare_experts, blocks: {name: {layer, experts, tokens, rare}}, experts}
    coverage: dict | None = None  # {kinds: {kind: {pruned, zeros, dense, dense_by}}, unaccounted: [weight names]}
    scale: dict | None = None  # {stream, reason, ranks, checkpointed, resumed}
    gguf: dict | None = None  # {file, outtype, bytes} with --save-format gguf
    seconds: dict[str, float] = field(default_factory=dict)
    prune_phases: dict[str, float] = field(default_factory=dict)
    rss_after_load_bytes: int | None = None
    peak_rss_bytes: int | None = None
    device: str | None = None
    dtype: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    command: str | None = None
    pushed_to: str | None = None
    llmprune_version: str | None = None
    schema_version: int = SCHEMA_VERSION

    # ---------------------------------------------------------------- derived views

    def decoder_layers(self) -> list[tuple[int, float, float]]:
        """(layer index, target, achieved) per decoder layer, its linears weighted by size."""
        zeros: dict[int, float] = {}
        sizes: dict[int, int] = {}
        targets: dict[int, float] = {}
        for linear in self.layers:
            if linear.layer is None:
                continue
            zeros[linear.layer] = zeros.get(linear.layer, 0.0) + linear.achieved_sparsity * linear.numel
            sizes[linear.layer] = sizes.get(linear.layer, 0) + linear.numel
            targets[linear.layer] = linear.sparsity
        return [(i, targets[i], zeros[i] / sizes[i]) for i in sorted(sizes)]

    @property
    def uniform(self) -> bool:
        """Every layer had the run's own target (no allocation, no skipped layers)."""
        return all(abs(s - self.sparsity) < 1e-12 for s in self.layer_sparsity)

    # ---------------------------------------------------------------- (de)serialisation

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> Path:
        """Written beside the target, then renamed: a reader never sees half a report."""
        return write_text_atomically(path, self.to_json() + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        data = dict(data)
        version = data.get("schema_version", 1)
        if version > SCHEMA_VERSION:
            raise LLMPruneError(f"this report has schema version {version}, newer than this llmprune reads "
                                f"({SCHEMA_VERSION}): upgrade llmprune")
        if version == 1:
            data.setdefault("model_name", _display_name(data.get("base_model") or data.get("model") or "?"))
        data["schema_version"] = SCHEMA_VERSION
        data["layers"] = [LinearRecord(**{"layer": layer_index(linear["name"]), **linear})
                          for linear in data.get("layers") or []]
        for name, kind in (("perplexity", Perplexity), ("calibration", Calibration)):
            if isinstance(data.get(name), dict):
                data[name] = kind(**data[name])
        if isinstance(data.get("structure"), dict):
            data["structure"] = StructureRecord.from_dict(data["structure"])
        known = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls)
                   if f.name not in data and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise LLMPruneError(f"report.json lacks {', '.join(missing)}: it is not an llmprune report")
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def load(cls, path: str | Path) -> "Report":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LLMPruneError(f"{path} does not exist: is this an llmprune output directory?") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise LLMPruneError(f"cannot read {path}: {err}") from None
        if not isinstance(data, dict):
            raise LLMPruneError(f"{path} is not an llmprune report (a JSON object)")
        return cls.from_dict(data)


def layer_index(name: str) -> int | None:
    """The decoder layer a module name belongs to: the first `.N.` in it (None for lm_head and the like)."""
    match = re.search(r"\.(\d+)(?:\.|$)", name)
    return int(match[1]) if match else None


def _display_name(model: str) -> str:
    return model.rstrip("/").rsplit("/", 1)[-1].removesuffix(".gguf")


def display_name(source) -> str:
    """The name people know a model by: the Hub id's last part (SmolLM2-135M-Instruct), or the folder's name."""
    return _display_name(source.base_model or source.path if not source.gguf_file else
                         source.base_model or source.gguf_file)

