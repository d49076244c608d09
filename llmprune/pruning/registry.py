"""Every pruning method, weight update, structured importance and sparsity allocation, by name: its one-line
summary, its config class (the knobs it reads, each a field made with `option(...)`) and the module of its
handler, imported on first use. Torch-free: `--help` lists these and the CLI generates their flags from the
config classes without importing a kernel.

Adding a method is a config class and one `register_method(...)` here, and its kernel in methods/NAME.py,
bound to the config class by a decorator:

    # here                                              # methods/mine.py (torch)
    @dataclass(frozen=True)                             @handles(MineConfig)
    class MineConfig(KnobConfig):                       def mine(weight, statistic, target, my_knob):
        my_knob: float = option(0.5, "Mine: ...",           ...
                                group="pruning")
    register_method("mine", MineConfig, statistic="input_norms", summary="...")

The runner calls the handler with the config's fields as keywords, so a kernel stays a pure function over
tensors and numbers. A knob's flag is its field's (--my-knob); PruneConfig holds the chosen method's config.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from typing import Callable

from ..errors import LLMPruneError
from ..options import check_at_least, check_finite, option

# ------------------------------------------------------------------ the knob configs


@dataclass(frozen=True)
class KnobConfig:
    """A method's, update's or allocation's own settings: every field is one knob."""

    def knobs(self) -> dict:
        """The knobs as keywords for the handler."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def check_with(self, prune) -> None:
        """Checks that need the rest of the prune's settings (its pattern, its sparsity); none by default."""

    def compares(self, default: str) -> str:
        """The unstructured selection group these knobs give the method ("row" or "matrix"); its own by default."""
        return default


@dataclass(frozen=True)
class MagnitudeConfig(KnobConfig):
    """Magnitude has no knobs."""


@dataclass(frozen=True)
class WandaConfig(KnobConfig):
    """Wanda has no knobs."""


@dataclass(frozen=True)
class RiaConfig(KnobConfig):
    ria_alpha: float = option(0.5, "RIA: exponent a of the input norm ||X_j||^a in the score", group="pruning")

    def __post_init__(self):
        check_finite(self.ria_alpha, "--ria-alpha", nonnegative=True)


@dataclass(frozen=True)
class SparseGPTConfig(KnobConfig):
    blocksize: int = option(128, "SparseGPT: columns per lazy-update block", group="pruning")
    percdamp: float = option(0.01, "SparseGPT: damping added to the Hessian diagonal, as a fraction of its mean",
                             group="pruning")
    sparsegpt_compare: str = option(
        "matrix", "SparseGPT, unstructured: which weights of a block of columns compete for pruning: matrix (all of "
        "each stacked matrix's, the paper's) or row (each output row loses the same share, Wanda's comparison "
        "group; see docs/methods.md)", choices=("matrix", "row"),
        group="pruning")

    def __post_init__(self):
        check_at_least(self, ("blocksize",))
        check_finite(self.percdamp, "--percdamp", positive=True)
        if self.sparsegpt_compare not in ("matrix", "row"):
            raise LLMPruneError(f"--sparsegpt-compare must be matrix or row (got {self.sparsegpt_compare!r})")

    def compares(self, default: str) -> str:
        return self.sparsegpt_compare

    def check_with(self, prune) -> None:
        if prune.nm and self.blocksize % prune.nm[1]:
            raise LLMPruneError(f"--blocksize {self.blocksize} must be a multiple of M={prune.nm[1]} for "
                                f"{prune.pattern}")


@dataclass(frozen=True)
class AdmmUpdateConfig(KnobConfig):
    admm_iterations: int = option(20, "ADMM (--update admm, --method admm): iterations", group="pruning")
    admm_rho: float = option(1.0, "ADMM: penalty rho, relative to the unit-scaled X^T X", group="pruning")
    admm_damp: float = option(0.1, "ADMM: ridge towards the dense weights, relative to the unit-scaled X^T X",
                              group="pruning")

    def __post_init__(self):
        check_at_least(self, ("admm_iterations",))
        check_finite(self.admm_rho, "--admm-rho", positive=True)
        check_finite(self.admm_damp, "--admm-damp", nonnegative=True)


@dataclass(frozen=True)
class AdmmConfig(AdmmUpdateConfig):
    """--method admm: the update's knobs, and the schedule of its gradual mask."""

    admm_gradual_steps: int = option(15, "--method admm: iterations over which the sparsity rises to the target",
                                     group="pruning")

    def __post_init__(self):
        super().__post_init__()
        check_at_least(self, ("admm_gradual_steps",))
        if self.admm_gradual_steps > self.admm_iterations:
            raise LLMPruneError(f"--admm-gradual-steps {self.admm_gradual_steps} must not exceed --admm-iterations "
                                f"{self.admm_iterations}")


@dataclass(frozen=True)
class DsnotConfig(KnobConfig):
    dsnot_cycles: int = option(50, "DSnoT: most grow/prune swaps per row", group="pruning")
    dsnot_threshold: float = option(0.1, "DSnoT: a row stops once its expected output error is at most this",
                                    group="pruning")

    def __post_init__(self):
        check_at_least(self, ("dsnot_cycles",), minimum=0)
        check_finite(self.dsnot_threshold, "--dsnot-threshold", nonnegative=True)


@dataclass(frozen=True)
class OwlConfig(KnobConfig):
    owl_m: float = option(5.0, "OWL: a score is an outlier above M x the mean (SmolLM2: 7 works best)",
                          group="pruning")
    owl_lambda: float = option(0.08, "OWL: layer sparsities span sparsity +/- lambda", group="pruning")

    def __post_init__(self):
        check_finite(self.owl_m, "--owl-m", positive=True)
        check_finite(self.owl_lambda, "--owl-lambda", nonnegative=True)

    def check_with(self, prune) -> None:
        if not (prune.sparsity - self.owl_lambda >= 0 and prune.sparsity + self.owl_lambda < 1):
            raise LLMPruneError(f"--owl-lambda {self.owl_lambda:g} must keep every layer's sparsity, "
                                f"{prune.sparsity:g} +/- lambda, inside [0, 1)")


@dataclass(frozen=True)
class ScanAllocationConfig(KnobConfig):
    scan_max_shift: float = option(0.1, "--allocation scan:FILE: each layer's sparsity stays within the target "
                                   "+/- this", group="pruning")

    def __post_init__(self):
        check_finite(self.scan_max_shift, "--scan-max-shift", nonnegative=True)


# ------------------------------------------------------------------ entries


HANDLERS: dict[type, Callable] = {}  # config class -> the kernel that reads it (bound by @handles)


def handles(config: type):
    """Bind a kernel to the config class it reads: `@handles(RiaConfig)` above `def ria(...)`."""
    def bind(fn):
        HANDLERS[config] = fn
        return fn

    return bind


def _handler(config: type, module: str) -> Callable:
    if config not in HANDLERS:
        importlib.import_module(f"{__package__}.{module}")  # its @handles binds it
    return HANDLERS[config]


@dataclass(frozen=True)
class Handled:
    """A registration whose kernel reads a config class: a method or an update."""

    name: str
    config: type  # a KnobConfig subclass: the knobs it reads
    statistic: str | None  # what the runner accumulates for it (statistics.py); None: no calibration data
    summary: str
    module: str = ""  # where its handler lives, relative to llmprune.pruning

    @property
    def fn(self) -> Callable:
        return _handler(self.config, self.module)

    @property
    def knobs(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self.config))


@dataclass(frozen=True)
class Method(Handled):
    """fn(weight, statistic, target, **knobs) -> (new_weight, keep_mask)."""

    compares: str = "row"  # unstructured selection group: "row" (each output row) or "matrix" (each stacked matrix)


@dataclass(frozen=True)
class Update(Handled):
    """fn(weight, statistic, keep, **knobs) -> new_weight, zero where keep is False."""


@dataclass(frozen=True)
class ImportanceEntry:
    """A structured importance: scores whole channels or heads (its handler: structured/importance/NAME.py)."""

    name: str
    needs: str | None  # "statistics", "gradients" or None (weights alone)
    summary: str


@dataclass(frozen=True)
class Allocation:
    """How per-layer sparsity is chosen (--allocation NAME, or scan:FILE); the runner applies it."""

    name: str
    config: type | None  # its knobs, or None for an allocation without any
    summary: str


METHODS: dict[str, Method] = {}
UPDATES: dict[str, Update] = {}
IMPORTANCES: dict[str, ImportanceEntry] = {}
ALLOCATIONS: dict[str, Allocation] = {}


def register_method(name: str, config: type, statistic: str | None, summary: str, compares: str = "row",
                    module: str | None = None) -> None:
    METHODS[name] = Method(name, config, statistic, summary, module or f"methods.{name}", compares)


def register_update(name: str, config: type, statistic: str, summary: str, module: str | None = None) -> None:
    UPDATES[name] = Update(name, config, statistic, summary, module or f"methods.{name}")


def register_importance(name: str, needs: str | None, summary: str) -> None:
    IMPORTANCES[name] = ImportanceEntry(name, needs, summary)


def register_allocation(name: str, config: type | None, summary: str) -> None:
    ALLOCATIONS[name] = Allocation(name, config, summary)


register_method("magnitude", MagnitudeConfig, statistic=None, summary="|W|; needs no calibration data")
register_method("wanda", WandaConfig, statistic="input_norms",
                summary="|W| * ||X||_2 per input feature (Sun et al. 2023)")
register_method("sparsegpt", SparseGPTConfig, statistic="hessian", compares="matrix",
                summary="OBS sparse regression with weight updates (Frantar & Alistarh 2023)")
register_method("ria", RiaConfig, statistic="input_norms",
                summary="relative importance times ||X||^a (Zhang et al. 2024)")
register_method("dsnot", DsnotConfig, statistic="input_moments",
                summary="Wanda mask refined by training-free grow/prune swaps (Zhang et al. 2024)")
register_method("admm", AdmmConfig, statistic="hessian", summary="gradual mask on ADMM-updated weights (Boza 2024)")
register_update("admm", AdmmUpdateConfig, statistic="hessian",
                summary="re-fit the kept weights to the dense outputs by ADMM (Boza 2024)")
register_importance("magnitude", needs=None, summary="L2 norm of the unit's weights; needs no calibration data")
register_importance("wanda", needs="statistics", summary="sum of |W| * ||X||_2 over the unit's weights (Wanda-sp)")
register_importance("flap", needs="statistics", summary="variance of the channel's input x squared norm of its "
                    "output column, standardized (FLAP)")
register_importance("taylor", needs="gradients", summary="sum of |w * dL/dw| over the unit's weights (LLM-Pruner)")
register_allocation("uniform", None, summary="the same sparsity in every layer")
register_allocation("owl", OwlConfig, summary="outlier-weighted layer sparsities (Yin et al. 2023)")
register_allocation("scan", ScanAllocationConfig, summary="scan:FILE, from `llmprune scan`: the least sensitive "
                    "layers pruned most")


# ------------------------------------------------------------------ lookups


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise LLMPruneError(f"unknown --method '{name}': choose one of {', '.join(METHODS)} (see --help)")
    return METHODS[name]


def get_update(name: str) -> Update:
    if name not in UPDATES:
        raise LLMPruneError(f"unknown --update '{name}': choose one of none, {', '.join(UPDATES)} (see --help)")
    return UPDATES[name]


def get_importance(name: str) -> ImportanceEntry:
    if name not in IMPORTANCES:
        raise LLMPruneError(f"--method '{name}' has no structured importance: choose one of "
                            f"{', '.join(IMPORTANCES)} with --structure channels or heads")
    return IMPORTANCES[name]


def get_allocation(value: str) -> Allocation:
    """--allocation uniform, owl or scan:FILE."""
    name = "scan" if value.startswith("scan:") else value
    if name not in ALLOCATIONS or value == "scan":
        raise LLMPruneError(f"--allocation must be uniform, owl or scan:FILE (got '{value}')")
    return ALLOCATIONS[name]


def knob_configs() -> list[type]:
    """Every registered config class, once, in registration order: the CLI makes one flag per field."""
    found = [entry.config for table in (METHODS, UPDATES, ALLOCATIONS) for entry in table.values()]
    return [config for config in dict.fromkeys(found) if config is not None]
