"""Configuration as dataclasses, validated on construction. The CLI only fills these in."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import LLMPruneError
from .pruning.methods import get_method, get_update
from .recovery.lora import RecoverConfig

ALLOCATIONS = ("uniform", "owl")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """'unstructured' -> None; 'N:M' -> (N, M), N weights kept out of every M consecutive inputs."""
    if pattern == "unstructured":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", pattern)
    if not match:
        raise LLMPruneError(f"--pattern must be 'unstructured' or N:M such as 2:4 (got '{pattern}')")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise LLMPruneError(f"--pattern {pattern}: N:M keeps N of every M weights, so it needs 0 < N < M")
    return n, m


@dataclass
class PruneConfig:
    """What to prune and how. `sparsity` None means 0.5 unstructured, or 1 - N/M for an N:M pattern."""

    method: str = "wanda"
    sparsity: float | None = None
    pattern: str = "unstructured"
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    skip: str | None = None
    blocksize: int = 128
    percdamp: float = 0.01
    allocation: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    update: str = "none"
    ria_alpha: float = 0.5  # RIA: exponent of the input norm ||X_j|| in the score
    admm_iterations: int = 20  # ADMM (--update admm, --method admm): iterations
    admm_rho: float = 1.0  # ADMM: penalty rho, relative to the unit-scaled X^T X
    admm_damp: float = 0.1  # ADMM: ridge towards the dense weights, relative to the unit-scaled X^T X
    admm_gradual_steps: int = 15  # --method admm: iterations over which the sparsity rises to the target
    dsnot_cycles: int = 50  # DSnoT: most grow/prune swaps per row
    dsnot_threshold: float = 0.1  # DSnoT: a row stops once |expected output error| is at most this
    scan_max_shift: float = 0.1  # --allocation scan: each layer's sparsity stays within the target +/- this
    device: str | None = None

    def __post_init__(self):
        get_method(self.method)
        if self.update != "none":
            get_update(self.update)
        nm = parse_pattern(self.pattern)
        if nm:
            implied = 1 - nm[0] / nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise LLMPruneError(
                    f"--pattern {self.pattern} prunes exactly {implied:g} of the weights, but --sparsity is "
                    f"{self.sparsity:g}: drop --sparsity or set it to {implied:g}"
                )
            self.sparsity = implied
            if self.blocksize % nm[1]:
                raise LLMPruneError(f"--blocksize {self.blocksize} must be a multiple of M={nm[1]} for {self.pattern}")
            if self.allocation != "uniform":
                raise LLMPruneError("--allocation owl varies sparsity per layer, which an N:M pattern fixes: "
                                    "use it with --pattern unstructured")
        elif self.sparsity is None:
            self.sparsity = 0.5
        if not 0 <= self.sparsity < 1:
            raise LLMPruneError(f"--sparsity must be in [0, 1) (got {self.sparsity:g})")
        for name in ("nsamples", "seqlen", "batch_size", "blocksize"):
            if getattr(self, name) < 1:
                raise LLMPruneError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.percdamp <= 0:
            raise LLMPruneError(f"--percdamp must be positive (got {self.percdamp:g})")
        if self.allocation not in ALLOCATIONS:
            raise LLMPruneError(f"--allocation must be one of {', '.join(ALLOCATIONS)} (got '{self.allocation}')")
        if self.allocation == "owl":
            if self.owl_m <= 0:
                raise LLMPruneError(f"--owl-m must be positive (got {self.owl_m:g})")
            if not (0 <= self.owl_lambda and self.sparsity - self.owl_lambda >= 0 and self.sparsity + self.owl_lambda < 1):
                raise LLMPruneError(f"--owl-lambda {self.owl_lambda:g} must keep every layer's sparsity, "
                                    f"{self.sparsity:g} +/- lambda, inside [0, 1)")
        if self.skip is not None:
            try:
                re.compile(self.skip)
            except re.error as err:
                raise LLMPruneError(f"--skip is not a valid regular expression: {err}") from None

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)


@dataclass
class RunConfig:
    """A whole run: which model and text, what to evaluate, where to write. `prune` holds the algorithm,
    `recovery` the LoRA settings used when `recover` is "lora"."""

    model: str = "llama"
    prune: PruneConfig = field(default_factory=PruneConfig)
    calib: str = "wiki"
    eval: str = "wiki"
    eval_windows: int = 40
    tasks: str | None = None
    limit: int | None = None
    num_fewshot: int = 0
    eval_batch_size: int = 16
    recover: str | None = None
    recovery: RecoverConfig = field(default_factory=RecoverConfig)
    keep_adapter: bool = False
    dtype: str = "auto"
    output: str | None = None
    overwrite: bool = False
    push_to_hub: str | None = None
    private: bool = False
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.eval_windows < 0:
            raise LLMPruneError("--eval-windows must be 0 (all) or more")
        if self.limit is not None and self.limit < 1:
            raise LLMPruneError(f"--limit must be at least 1 document per task (got {self.limit})")
        if self.recover not in (None, "lora"):
            raise LLMPruneError(f"--recover must be lora (got '{self.recover}')")
        if self.recover and self.prune.sparsity == 0:
            raise LLMPruneError("--recover lora with --sparsity 0 has nothing to recover: prune first")
        if self.push_to_hub and not self.output:
            raise LLMPruneError("--push-to-hub uploads the --output directory: give --output DIR too")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def save(self, path: Path) -> None:
        path.write_text(self.to_json() + "\n")
