"""What a structured prune removes and how, validated on construction (before any model is touched)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import LLMPruneError

STRUCTURES = ("channels", "heads", "layers")
HEADS_MODES = ("query", "groups")
LAYER_IMPORTANCES = ("influence", "skip_loss")
DEFAULT_METHOD = "flap"  # channels and heads; layers are scored by `layer_importance`


@dataclass
class StructuredConfig:
    """`sparsity` is the fraction of the structure removed: of each layer's MLP intermediate channels, of
    each layer's attention heads (query heads, or KV groups with their query heads) or of the decoder layers."""

    structure: str = "channels"
    method: str | None = None  # importance of channels/heads: magnitude, wanda, flap, taylor (None: flap)
    sparsity: float = 0.2
    round_to: int = 64  # kept MLP widths are multiples of this (1: exact)
    bias_compensation: bool | None = None  # None: on for flap where the family can carry a bias, else off
    heads_mode: str = "query"  # query: the same number of query heads out of every KV group; groups: whole KV groups
    layer_importance: str = "influence"  # influence: 1 - cos(input, output); skip_loss: loss increase when skipped
    batch_size: int = 8
    device: str | None = None

    def __post_init__(self):
        from .importance import get_importance

        if self.structure not in STRUCTURES:
            raise LLMPruneError(f"--structure must be one of none, {', '.join(STRUCTURES)} (got '{self.structure}')")
        if self.structure == "layers":
            if self.method is not None:
                raise LLMPruneError(f"--method {self.method} scores channels and heads; --structure layers is scored "
                                    f"by --layer-importance ({' or '.join(LAYER_IMPORTANCES)}): drop --method")
            if self.layer_importance not in LAYER_IMPORTANCES:
                raise LLMPruneError(f"--layer-importance must be one of {', '.join(LAYER_IMPORTANCES)} "
                                    f"(got '{self.layer_importance}')")
        else:
            self.method = self.method or DEFAULT_METHOD
            get_importance(self.method)
        if self.heads_mode not in HEADS_MODES:
            raise LLMPruneError(f"--heads-mode must be one of {', '.join(HEADS_MODES)} (got '{self.heads_mode}')")
        if not 0 < self.sparsity < 1:
            raise LLMPruneError(f"--sparsity of a structure must be in (0, 1) (got {self.sparsity:g})")
        if self.round_to < 1:
            raise LLMPruneError(f"--round-to must be at least 1 (got {self.round_to})")
        if self.batch_size < 1:
            raise LLMPruneError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.structure == "layers" and self.bias_compensation:
            raise LLMPruneError("--bias-compensation applies to channels and heads, not to whole layers: drop it")

    @property
    def compensate(self) -> bool:
        """The asked-for compensation; `None` (auto) resolves to on for flap (the runner may still turn an
        auto request off when the family has no bias to carry it, and says so in the report)."""
        if self.structure == "layers":
            return False
        return self.method == "flap" if self.bias_compensation is None else self.bias_compensation
