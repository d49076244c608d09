"""What a structured prune removes and how, validated on construction (before any model is touched).

The structure settings are written here once: their defaults, help and allowed values. PruneConfig takes the
same fields (`same_as`), so the CLI flags and a config file's keys are these; `PruneConfig.structured()` builds
this config from a run's settings. Torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...errors import LLMPruneError
from ...options import check_at_least, check_choice, check_finite, option, settle
from .. import registry

STRUCTURES = ("channels", "heads", "layers", "hidden")
HEADS_MODES = ("query", "groups")
LAYER_IMPORTANCES = ("influence", "skip_loss")
BIAS_COMPENSATIONS = ("auto", "on", "off")
HIDDEN_IMPORTANCES = ("activation", "magnitude")  # hidden.py's IMPORTANCES (kept torch-free here)
AXES = ("layers", "heads", "channels", "hidden")  # the order a shape over several structures is pruned in
UNSCORED = ("layers", "hidden")  # structures --method does not score (their own importance fields do)
COUNT_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9}
DEFAULT_METHOD = "flap"  # channels and heads; layers are scored by `layer_importance`
DEFAULT_SPARSITY = 0.2


@dataclass(frozen=True)
class StructuredConfig:
    """`sparsity` is the fraction of the structure removed: of each layer's MLP intermediate channels, of
    each layer's attention heads (query heads, or KV groups with their query heads), of the decoder layers, or
    of the hidden size (the width kept is the allowed multiple of `round_to` nearest to the rest).
    `structure`, `method`, `sparsity` and `device` are the run's (PruneConfig's) settings of the same names."""

    structure: str = "channels"
    method: str | None = None  # importance of channels/heads (None: flap); layers: none
    sparsity: float = DEFAULT_SPARSITY
    round_to: int = option(64, "kept MLP and hidden widths are multiples of this (hardware likes them; 1 = exact)",
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
    hidden_importance: str = option("activation", "how --structure hidden ranks hidden (embedding) channels: "
                                    "activation = each norm's mean |output| per channel over the calibration "
                                    "tokens (Minitron); magnitude = the L2 norm of every weight in the channel",
                                    group="structured", choices=HIDDEN_IMPORTANCES)
    target_params: str | None = option(None, "with --structure: prune to this many parameters of the whole "
                                       "model, embeddings included: a count (90M, 1.2B, 90000000) or a fraction "
                                       "(0.67); chooses --sparsity (or the hidden width) whose exact count is "
                                       "nearest, at most 2 percent over", group="structured", metavar="N")
    search_limit: int = option(8, "several structures: candidate shapes pruned on a copy and scored by KL to "
                               "the dense model, evenly spread over the list ordered by shape", group="structured")
    search_windows: int = option(8, "several structures: validation windows of --seqlen cut from the end of the "
                                 "calibration text, which score the candidates", group="structured")
    search_topk: int = option(0, "several structures: distil this many of the best candidates (by KL) from the "
                              "dense model for --search-steps steps on the calibration text, score them by KL "
                              "again and choose the best after distillation (Minitron's recipe; 0: off, choose by "
                              "the one-shot KL)", group="structured", metavar="K")
    search_steps: int = option(50, "several structures, with --search-topk: distillation steps per candidate "
                               "(--recover-batch windows of --recover-seqlen each; LoRA or full per "
                               "--recover-params)", group="structured", metavar="N")
    batch_size: int = option(8, "windows per layer forward; lower it if memory runs out", group="calibration")
    device: str | None = None

    def __post_init__(self):
        if self.bias_compensation in (None, True, False):  # the API's auto/on/off as None/True/False
            settle(self, "bias_compensation", {None: "auto", True: "on", False: "off"}[self.bias_compensation])
        if self.structure not in STRUCTURES:
            raise LLMPruneError(f"--structure must be one of none, {', '.join(STRUCTURES)} (got '{self.structure}')")
        for name in ("bias_compensation", "heads_mode", "layer_importance", "hidden_importance"):
            check_choice(self, name)
        if self.target_params is not None:
            parse_param_target(self.target_params)
        if self.structure in UNSCORED:
            scorer = "--layer-importance" if self.structure == "layers" else "--hidden-importance"
            if self.method is not None:
                raise LLMPruneError(f"--method {self.method} scores channels and heads; --structure {self.structure} "
                                    f"is scored by {scorer}: drop --method")
            if self.bias_compensation == "on":
                raise LLMPruneError(f"--bias-compensation applies to channels and heads, not to --structure "
                                    f"{self.structure}: drop it")
        else:
            settle(self, "method", self.method or DEFAULT_METHOD)
            registry.get_importance(self.method)
        check_finite(self.sparsity, "--sparsity")
        if not 0 < self.sparsity < 1:
            raise LLMPruneError(f"--sparsity of a structure must be in (0, 1) (got {self.sparsity:g})")
        check_at_least(self, ("round_to", "batch_size", "search_limit", "search_windows", "search_steps"))
        check_at_least(self, ("search_topk",), minimum=0)

    @property
    def compensate(self) -> bool:
        """The asked-for compensation; auto resolves to on for flap (the runner may still turn an auto request
        off when the family has no bias to carry it, and says so in the report)."""
        if self.structure in UNSCORED:
            return False
        return self.method == "flap" if self.bias_compensation == "auto" else self.bias_compensation == "on"

    @property
    def needs_calibration(self) -> bool:
        """Every scorer but plain magnitude reads calibration activations (or gradients); so does compensation."""
        if self.structure == "layers":
            return True
        if self.structure == "hidden":
            return self.hidden_importance == "activation"
        return registry.get_importance(self.method).needs is not None or self.bias_compensation == "on"


def parse_param_target(value) -> tuple[str, float]:
    """--target-params as ("count", parameters) or ("fraction", of the whole model): a count with an optional
    K/M/B suffix (90M, 1.2B, 90000000), or a number in (0, 1)."""
    text = str(value).strip().upper().replace("_", "")
    scale = COUNT_SUFFIXES.get(text[-1:], 1)
    try:
        number = float(text[:-1] if scale > 1 else text)
    except ValueError:
        number = float("nan")
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise LLMPruneError(f"--target-params must be a parameter count such as 90M, 1.2B or 90000000, or a "
                            f"fraction of the model in (0, 1) such as 0.67 (got {value!r})")
    if scale == 1 and number < 1:
        return "fraction", number
    if scale == 1 and number == 1:
        raise LLMPruneError("--target-params 1 keeps the whole model: give a fraction below 1 or a count")
    return "count", number * scale


def parse_structures(text: str) -> list[str]:
    """--structure a,b,... as axes in AXES order; each at most once, all known."""
    names = [name.strip() for name in str(text).split(",") if name.strip()]
    unknown = [name for name in names if name not in STRUCTURES]
    if not names or unknown or len(set(names)) != len(names):
        raise LLMPruneError(f"--structure takes none, or a comma list of distinct structures from "
                            f"{', '.join(STRUCTURES)} (got '{text}')")
    return [axis for axis in AXES if axis in names]


def axis_config(base: StructuredConfig, axis: str, sparsity: float) -> StructuredConfig:
    """The one-axis config of a shape's `axis` (--method and --bias-compensation apply to channels and heads)."""
    from dataclasses import replace

    scored = axis in ("channels", "heads")
    return replace(base, structure=axis, sparsity=sparsity, target_params=None,
                   method=base.method if scored else None,
                   bias_compensation=base.bias_compensation if scored else "auto")
