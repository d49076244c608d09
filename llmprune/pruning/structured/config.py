"""What a structured prune removes and how, validated on construction (before any model is touched).

The structure settings are written here once: their defaults, help and allowed values. PruneConfig takes the
same fields (`same_as`), so the CLI flags and a config file's keys are these; `PruneConfig.structured()` builds
this config from a run's settings. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import LLMPruneError
from ...options import check_at_least, check_choice, check_finite, option, settle
from .. import registry

STRUCTURES = ("channels", "heads", "layers")
HEADS_MODES = ("query", "groups")
LAYER_IMPORTANCES = ("influence", "skip_loss")
BIAS_COMPENSATIONS = ("auto", "on", "off")
DEFAULT_METHOD = "flap"  # channels and heads; layers are scored by `layer_importance`
DEFAULT_SPARSITY = 0.2


@dataclass(frozen=True)
class StructuredConfig:
    """`sparsity` is the fraction of the structure removed: of each layer's MLP intermediate channels, of
    each layer's attention heads (query heads, or KV groups with their query heads) or of the decoder layers.
    `structure`, `method`, `sparsity` and `device` are the run's (PruneConfig's) settings of the same names."""

    structure: str = "channels"
    method: str | None = None  # importance of channels/heads (None: flap); layers: none
    sparsity: float = DEFAULT_SPARSITY
    round_to: int = option(64, "kept MLP widths are multiples of this (hardware likes them; 1 = exact)",
                           group="structured")
    bias_compensation: str = option("auto", "fold the removed channels' or heads' mean output into the next "
                                    "linear's bias (auto: on for flap, where the family can carry a bias)",
                                    group="structured", choices=BIAS_COMPENSATIONS)
    heads_mode: str = option("query", "query: remove the same number of query heads from every KV group; "
                             "groups: remove whole KV groups with their query heads", group="structured",
                             choices=HEADS_MODES)
    layer_importance: str = option("influence", "how --structure layers ranks layers: influence = 1 - cos(input, "
                                   "output) over the calibration tokens (ShortGPT); skip_loss = calibration loss "
                                   "increase when the layer alone is skipped (one model pass per layer)",
                                   group="structured", choices=LAYER_IMPORTANCES)
    batch_size: int = option(8, "windows per layer forward; lower it if memory runs out", group="calibration")
    device: str | None = None

    def __post_init__(self):
        if self.bias_compensation in (None, True, False):  # the API's auto/on/off as None/True/False
            settle(self, "bias_compensation", {None: "auto", True: "on", False: "off"}[self.bias_compensation])
        if self.structure not in STRUCTURES:
            raise LLMPruneError(f"--structure must be one of none, {', '.join(STRUCTURES)} (got '{self.structure}')")
        for name in ("bias_compensation", "heads_mode", "layer_importance"):
            check_choice(self, name)
        if self.structure == "layers":
            if self.method is not None:
                raise LLMPruneError(f"--method {self.method} scores channels and heads; --structure layers is scored "
                                    f"by --layer-importance ({' or '.join(LAYER_IMPORTANCES)}): drop --method")
            if self.bias_compensation == "on":
                raise LLMPruneError("--bias-compensation applies to channels and heads, not to whole layers: drop it")
        else:
            settle(self, "method", self.method or DEFAULT_METHOD)
            registry.get_importance(self.method)
        check_finite(self.sparsity, "--sparsity")
        if not 0 < self.sparsity < 1:
            raise LLMPruneError(f"--sparsity of a structure must be in (0, 1) (got {self.sparsity:g})")
        check_at_least(self, ("round_to", "batch_size"))

    @property
    def compensate(self) -> bool:
        """The asked-for compensation; auto resolves to on for flap (the runner may still turn an auto request
        off when the family has no bias to carry it, and says so in the report)."""
        if self.structure == "layers":
            return False
        return self.method == "flap" if self.bias_compensation == "auto" else self.bias_compensation == "on"

    @property
    def needs_calibration(self) -> bool:
        """Every scorer but plain magnitude reads calibration activations (or gradients); so does compensation."""
        if self.structure == "layers":
            return True
        return registry.get_importance(self.method).needs is not None or self.bias_compensation == "on"
