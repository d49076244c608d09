"""Every setting, written once: a dataclass field with its help, validated on construction, frozen after.

The CLI is generated from these fields (`cli.py` reads `option(...)` metadata: flag, help, group, choices),
`--config FILE` fills them from YAML or JSON (such as the `llmprune_config.json` each output carries), and
the Python API builds them directly. A method's, update's or allocation's own knobs are fields of its config
class in pruning/registry.py (PruneConfig holds the chosen ones); the structure settings are
StructuredConfig's (pruning/structured/config.py). Nothing here imports torch, transformers or peft, nor any
algorithm module: only those torch-free declarations.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from .errors import LLMPruneError
from .options import check_at_least, check_finite, flag_of, option, same_as, settle
from .pruning import registry
from .pruning.registry import KnobConfig
from .pruning.structured.config import DEFAULT_SPARSITY, STRUCTURES, StructuredConfig, axis_config, parse_structures

__all__ = ["PruneConfig", "RecoverConfig", "RunConfig", "option", "load_config_file", "parse_pattern"]

DTYPES = ("auto", "float32", "bfloat16", "float16")
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # the llama.cpp names, as `llama-quantize` and its converter use them
DEFAULT_METHOD = "wanda"
KNOB_ROLES = ("method", "update", "allocation")  # each role's chosen entry reads PruneConfig.<role>_config


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


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how: the algorithm, its data, and the chosen method's, update's and allocation's
    knobs (`method_config`, `update_config`, `allocation_config`: instances of the config classes registered
    with them, or mappings of their fields; None gives the defaults)."""

    method: str | None = option(None, "how each weight (or, with --structure, each channel or head) is scored; "
                                "see methods below (default: wanda; flap with --structure channels or heads; "
                                "none with --structure layers, ranked by --layer-importance)", group="pruning",
                                metavar="NAME")
    sparsity: float | None = option(None, "fraction of each pruned linear's weights set to zero, in [0, 1) "
                                    "(default: 0.5, or 1-N/M for an N:M pattern); with --structure, the fraction "
                                    f"of that structure removed (default {DEFAULT_SPARSITY})", group="pruning")
    structure: str = option("none", "remove whole structures and save a smaller ordinary model: MLP channels, "
                            "attention heads, decoder layers, hidden (embedding) channels, or the routed experts of a "
                            "mixture of experts (none: zero single weights); a comma list of the first four with "
                            "--target-params prunes the shape a search over them picks (see `llmprune search`)",
                            group="structured", metavar="none|" + "|".join(STRUCTURES) + "|experts|A,B,..")
    expert_importance: str = option("reap", "how --structure experts ranks each MoE layer's experts: reap = mean "
                                    "over its routed tokens of routing weight x output norm (Cerebras 2025); "
                                    "frequency = tokens routed to it", group="structured",
                                    choices=("reap", "frequency"))
    remove_params: float | None = option(None, "with --structure: remove about this fraction of the decoder "
                                         "layers' parameters (chooses --sparsity)", group="structured")
    target_params: str | None = same_as(StructuredConfig, "target_params")
    round_to: int = same_as(StructuredConfig, "round_to")
    bias_compensation: str = same_as(StructuredConfig, "bias_compensation")
    heads_mode: str = same_as(StructuredConfig, "heads_mode")
    layer_importance: str = same_as(StructuredConfig, "layer_importance")
    hidden_importance: str = same_as(StructuredConfig, "hidden_importance")
    search_limit: int = same_as(StructuredConfig, "search_limit")
    search_windows: int = same_as(StructuredConfig, "search_windows")
    search_topk: int = same_as(StructuredConfig, "search_topk")
    search_steps: int = same_as(StructuredConfig, "search_steps")
    shape: str | None = option(None, "with --structure: prune to the shape in this file instead of searching: a "
                               "candidates.json of `llmprune search` (its best candidate) or {\"shape\": "
                               "{\"channels\": 0.25, \"hidden\": 0.125}} (docs/structured.md)", group="structured",
                               metavar="FILE")
    pattern: str = option("unstructured", "unstructured, or N:M such as 2:4 or 4:8 (see patterns below)",
                          group="pruning")
    update: str = option("none", "re-fit the kept weights after the mask is chosen: none, or a registered "
                         "update", group="pruning", metavar="NAME")
    skip: str | None = option(None, "linears whose full name matches stay dense (lm_head and embeddings are "
                              "never pruned)", group="pruning", metavar="REGEX")
    allocation: str = option("uniform", "per-layer sparsity: uniform (the same everywhere), owl (outlier-weighted, "
                             "Yin et al. 2023), or scan:FILE (from `llmprune scan`: least sensitive layers pruned "
                             "most)", group="pruning", metavar="uniform|owl|scan:FILE")
    min_expert_tokens: int = option(128, "mixture of experts: an expert routed fewer calibration tokens than this "
                                    "is rare, and its statistics come from --rare-experts (fewer give noisy norms "
                                    "and a Hessian of low rank)", group="pruning")
    rare_experts: str = option("all-tokens", "mixture of experts: a rare expert takes its statistics from all of its "
                               "layer's tokens (all-tokens), or is pruned by weight magnitude (magnitude)",
                               group="pruning", choices=("all-tokens", "magnitude"))
    method_config: KnobConfig | dict | None = option(None, cli=False)
    update_config: KnobConfig | dict | None = option(None, cli=False)
    allocation_config: KnobConfig | dict | None = option(None, cli=False)
    nsamples: int = option(32, "random calibration windows", group="calibration")
    seqlen: int = option(512, "tokens per window (calibration and perplexity)", group="calibration")
    seed: int = option(0, "seed of the window sampling, of recovery and of lm-eval (local generators)",
                       group="calibration")
    batch_size: int = same_as(StructuredConfig, "batch_size")
    device: str | None = option(None, "where each layer is pruned: cpu, cuda, cuda:1 (default: cuda if available, "
                                "else cpu)", group="model")

    def __post_init__(self):
        if self.structure != "none":
            if self.structure != "experts":
                settle(self, "structure", ",".join(parse_structures(self.structure)))
            if self.several and self.target_params is None and self.shape is None:
                raise LLMPruneError(f"--structure {self.structure}: several structures are pruned to a budget, "
                                    "whose shape a search picks: give --target-params (or --shape FILE)")
            budgets = [flag for flag, value in (("--remove-params", self.remove_params),
                                                ("--target-params", self.target_params),
                                                ("--sparsity", self.sparsity), ("--shape", self.shape))
                       if value is not None]
            if len(budgets) > 1:
                raise LLMPruneError(f"{' and '.join(budgets)} each set how much is removed: give one of them")
            if self.remove_params is not None:
                check_finite(self.remove_params, "--remove-params", positive=True)
            elif self.sparsity is None and self.target_params is None and self.shape is None:
                settle(self, "sparsity", DEFAULT_SPARSITY)
            if self.shape is not None:
                if self.structure == "experts":
                    raise LLMPruneError("--shape gives channels, heads, layers and hidden fractions: not --structure "
                                        "experts")
                from .pruning.structured.shape_file import read_shape_file

                read_shape_file(self.shape, self.axes)  # a missing or mismatched file fails now
            if self.structure == "experts":  # whole routed experts: pruning/expert_removal.py
                from .pruning.expert_removal import check_expert_removal

                check_expert_removal(self)
            else:
                self.structured()  # validates the structured settings (and the method as an importance)
            if self.several and self.method is not None and not {"channels", "heads"} & set(self.axes):
                raise LLMPruneError(f"--method scores channels and heads; --structure {self.structure} has "
                                    "neither: drop --method")
            if self.pattern != "unstructured" or self.update != "none" or self.allocation != "uniform":
                raise LLMPruneError(f"--structure {self.structure} removes whole structures: --pattern, --update and "
                                    "--allocation apply to unstructured pruning (prune the output again for that)")
            if any(getattr(self, f"{role}_config") for role in KNOB_ROLES):
                raise LLMPruneError(f"--structure {self.structure} scores channels, heads or layers: the knobs of "
                                    "unstructured methods do not apply")
            check_at_least(self, ("nsamples", "seqlen"))
            return
        for name in ("remove_params", "target_params", "shape"):
            if getattr(self, name) is not None:
                raise LLMPruneError(f"{flag_of(self, name)} chooses how much of a structure to remove: give "
                                    "--structure too")
        settle(self, "method", self.method or DEFAULT_METHOD)
        for role, entry in self.chosen().items():
            settle(self, f"{role}_config", _knob_config(role, getattr(self, role), entry,
                                                        getattr(self, f"{role}_config")))
        nm = parse_pattern(self.pattern)
        if self.sparsity is not None:
            check_finite(self.sparsity, "--sparsity")
        if nm:
            implied = 1 - nm[0] / nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise LLMPruneError(
                    f"--pattern {self.pattern} prunes exactly {implied:g} of the weights, but --sparsity is "
                    f"{self.sparsity:g}: drop --sparsity or set it to {implied:g}"
                )
            settle(self, "sparsity", implied)
            if self.allocation != "uniform":
                raise LLMPruneError(f"--allocation {self.allocation} varies sparsity per layer, which an N:M "
                                    "pattern fixes: use it with --pattern unstructured")
        elif self.sparsity is None:
            settle(self, "sparsity", 0.5)
        if not 0 <= self.sparsity < 1:
            raise LLMPruneError(f"--sparsity must be in [0, 1) (got {self.sparsity:g})")
        check_at_least(self, ("nsamples", "seqlen", "batch_size", "min_expert_tokens"))
        if self.rare_experts not in ("all-tokens", "magnitude"):
            raise LLMPruneError(f"--rare-experts must be all-tokens or magnitude (got '{self.rare_experts}')")
        for role in KNOB_ROLES:
            knobs = getattr(self, f"{role}_config")
            if knobs is not None:
                knobs.check_with(self)
        if self.allocation.startswith("scan:") and not Path(self.allocation.removeprefix("scan:")).is_file():
            raise LLMPruneError(f"cannot read the scan table {self.allocation.removeprefix('scan:')}: write it "
                                "with `llmprune scan`")
        if self.skip is not None:
            try:
                re.compile(self.skip)
            except re.error as err:
                raise LLMPruneError(f"--skip is not a valid regular expression: {err}") from None

    @property
    def axes(self) -> list[str]:
        """The structures pruned, in the order a shape over several is pruned ([] for none)."""
        return [] if self.structure == "none" else self.structure.split(",")

    @property
    def several(self) -> bool:
        return len(self.axes) > 1

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    def chosen(self) -> dict:
        """The registry entries this unstructured prune uses, by role: method, update (or None), allocation."""
        return {"method": registry.get_method(self.method),
                "update": registry.get_update(self.update) if self.update != "none" else None,
                "allocation": registry.get_allocation(self.allocation)}

    def search_base(self, sparsity: float = 0.5) -> StructuredConfig:
        """The settings a shape's axes share, for search.py (its `axis_config` gives each axis its own)."""
        return replace(self, structure="channels", target_params=None, shape=None,
                       sparsity=sparsity).structured(sparsity)

    def structured(self, sparsity: float | None = None) -> StructuredConfig:
        """The settings of a structured prune, validated (pruning/structured/config.py). `sparsity`: the one
        chosen for --remove-params or --target-params (until it is chosen, 0.5 stands in for the checks)."""
        if sparsity is None:
            sparsity = 0.5 if self.sparsity is None else self.sparsity
        if self.several:  # the first axis's config (each axis's settings validate)
            configs = [axis_config(self.search_base(sparsity), axis, sparsity) for axis in self.axes]
            return configs[0]
        return StructuredConfig(structure=self.structure, method=self.method, sparsity=sparsity,
                                round_to=self.round_to, bias_compensation=self.bias_compensation,
                                heads_mode=self.heads_mode, layer_importance=self.layer_importance,
                                hidden_importance=self.hidden_importance, target_params=self.target_params,
                                search_limit=self.search_limit, search_windows=self.search_windows,
                                search_topk=self.search_topk, search_steps=self.search_steps,
                                batch_size=self.batch_size, device=self.device)


def _knob_config(role: str, name: str, entry, given):
    """The chosen entry's config: its defaults, a mapping of its fields, or an instance of its class."""
    wanted = entry.config if entry is not None else None
    if isinstance(given, KnobConfig) and type(given) is not wanted and given == type(given)():
        given = None  # another entry's defaults (a `replace` that changed the name): the new entry's defaults
    if wanted is None:
        if given:
            raise LLMPruneError(f"--{role} {name} has no settings, but {role}_config gives {given!r}")
        return None
    if given is None:
        return wanted()
    if isinstance(given, dict):
        return wanted(**_checked_keys(wanted, given))
    if type(given) is not wanted:
        raise LLMPruneError(f"{role}_config is a {type(given).__name__}, but --{role} {name} reads "
                            f"{wanted.__name__}")
    return given


RECOVERY_LOSSES = ("lm", "distill")
RECOVERY_PARAMS = ("lora", "full")
RECOVERY_PRECISIONS = ("float32", "bf16")
# full: 1e-4 (the rate before 2026-12-05) threw Qwen2.5-0.5B's channel prune from validation perplexity 7.68 to
# 15.8 in 5 steps; 1e-5 took it to 6.95 in 10, and on SmolLM2-135M kept two thirds of 1e-4's gain (docs/results.md).
DEFAULT_RECOVERY_LR = {"lora": 5e-4, "full": 1e-5}


@dataclass(frozen=True)
class RecoverConfig:
    """Recovery after the prune: the loss (`RunConfig.recover`), which weights train, and the budget.

    Defaults fit a couple of CPU cores; LoRA's lr suits such short runs (docs/results.md has the measurements)."""

    loss: str = option("lm", "", cli=False)  # set from RunConfig.recover (lm or distill)
    params: str = option("lora", "which weights train: LoRA adapters merged through the mask, or every weight "
                         "of the pruned linears with its gradient masked (zeros stay exactly zero; a structurally "
                         "smaller model trains every weight)", group="recovery", flag="--recover-params",
                         choices=RECOVERY_PARAMS)
    steps: int = option(100, "optimizer steps", group="recovery", flag="--recover-steps")
    lr: float | None = option(None, "AdamW learning rate (default: 5e-4 for LoRA, 1e-5 for full)",
                              group="recovery", flag="--recover-lr")
    batch: int = option(2, "windows per step", group="recovery", flag="--recover-batch")
    seqlen: int = option(256, "tokens per training window", group="recovery", flag="--recover-seqlen")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay", group="recovery",
                                 flag="--recover-weight-decay")
    eval_every: int = option(25, "score the validation slice every N steps (0: before and after only)",
                             group="recovery")
    val_windows: int = option(8, "validation windows cut from the end of the recovery text (never the held-out "
                              "part)", group="recovery", flag="--recover-val-windows")
    data: str | None = option(None, "recovery text source (its training part; default: --calib)",
                              group="recovery", flag="--recover-data", metavar="SOURCE")
    precision: str = option("float32", "training arithmetic: float32, or bf16 mixed precision (matmuls in "
                            "bfloat16 under autocast; weights, gradients and optimizer state stay float32): for "
                            "GPUs and CPUs with AMX (on AVX-512 BF16 alone it measured slower than float32)",
                            group="recovery", flag="--recover-precision", choices=RECOVERY_PRECISIONS)
    loss_chunk: int = option(128, "tokens per chunk of the vocabulary-sized end of a step (head, softmax, loss "
                             "and their gradients, recomputed a chunk at a time in the backward pass: a lower peak, "
                             "the more so the larger the vocabulary); 0: whole batches at once",
                             group="recovery", flag="--recover-loss-chunk")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass: less memory, about "
                                          "a third more time", group="recovery")
    distill_temperature: float = option(1.0, "distillation: softmax temperature of teacher and student",
                                        group="recovery")
    distill_alpha: float = option(0.0, "distillation: share of the plain LM loss mixed in (0: pure KL)",
                                  group="recovery")
    distill_topk: int = option(64, "distillation: the dense teacher's top-k tokens kept per position, the rest "
                               "as one bucket", group="recovery")
    distill_hidden: float = option(0.0, "distillation: weight of a hidden-state term, the relative squared error "
                                   "between matched decoder layers' outputs of the pruned and the dense model "
                                   "(0: off; the teacher pass then also keeps those layers' outputs)",
                                   group="recovery")
    distill_hidden_layers: int = option(4, "distillation: how many dense layers' outputs --distill-hidden "
                                        "matches, evenly spaced, the last included (layers a structured prune "
                                        "removed are skipped)", group="recovery")
    teacher_spill: str | None = option(None, "distillation: keep the teacher's targets in this folder instead "
                                       "of memory", group="recovery", metavar="DIR")
    r: int = option(8, "LoRA rank", group="recovery", flag="--lora-r")
    alpha: float = option(16, "LoRA scaling numerator (alpha / r)", group="recovery", flag="--lora-alpha")
    targets: list[str] | None = option(None, "comma list of linear names, e.g. q_proj,v_proj (default: every "
                                       "pruned linear)", group="recovery", flag="--lora-targets")
    dropout: float = option(0.0, "LoRA dropout on the adapters' input", group="recovery", flag="--lora-dropout")
    seed: int = option(0, "", cli=False)  # the run's --seed

    def __post_init__(self) -> None:
        if self.loss not in RECOVERY_LOSSES:
            raise LLMPruneError(f"--recover must be one of lora, {', '.join(RECOVERY_LOSSES)} (got '{self.loss}')")
        if self.params not in RECOVERY_PARAMS:
            raise LLMPruneError(f"--recover-params must be one of {', '.join(RECOVERY_PARAMS)} (got '{self.params}')")
        if self.precision not in RECOVERY_PRECISIONS:
            raise LLMPruneError(f"--recover-precision must be one of {', '.join(RECOVERY_PRECISIONS)} "
                                f"(got '{self.precision}')")
        if self.lr is None:
            settle(self, "lr", DEFAULT_RECOVERY_LR[self.params])
        check_at_least(self, ("steps", "batch", "r", "distill_topk", "val_windows", "distill_hidden_layers"))
        check_at_least(self, ("eval_every", "loss_chunk"), minimum=0)
        check_at_least(self, ("seqlen",), minimum=2)  # a next-token loss needs two tokens
        check_finite(self.lr, "--recover-lr", positive=True)
        check_finite(self.alpha, "--lora-alpha", positive=True)
        check_finite(self.weight_decay, "--recover-weight-decay", nonnegative=True)
        check_finite(self.distill_temperature, "--distill-temperature", positive=True)
        check_finite(self.distill_alpha, "--distill-alpha", nonnegative=True)
        check_finite(self.distill_hidden, "--distill-hidden", nonnegative=True)
        check_finite(self.dropout, "--lora-dropout", nonnegative=True)
        if self.distill_alpha > 1:
            raise LLMPruneError(f"--distill-alpha is the LM loss's share, in [0, 1] (got {self.distill_alpha:g})")
        if not self.dropout < 1.0:
            raise LLMPruneError(f"--lora-dropout must be in [0, 1) (got {self.dropout!r})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise LLMPruneError(f"recovery seed must be an integer, got {self.seed!r}")
        if self.targets is not None:
            if isinstance(self.targets, str) or not self.targets or not all(isinstance(t, str) and t.strip() for t in self.targets):
                raise LLMPruneError(f"--lora-targets must be a non-empty comma list of linear names, got "
                                    f"{self.targets!r}: e.g. q_proj,v_proj (or omit it for every pruned linear)")
            settle(self, "targets", list(dict.fromkeys(t.strip() for t in self.targets)))

    @property
    def tokens(self) -> int:
        """Tokens trained on."""
        return self.steps * self.batch * self.seqlen

    @property
    def text_tokens(self) -> int:
        """Tokens the recovery text must hold: the training windows and the validation slice."""
        return (self.steps * self.batch + self.val_windows) * self.seqlen


@dataclass(frozen=True)
class RunConfig:
    """A whole run: which model and text, what to evaluate, where to write. `prune` holds the algorithm,
    `recovery` the fine-tuning settings used when `recover` is set."""

    model: str = option("llama", "an alias (llama, smollm2-135m: the embedded SmolLM2-135M-Instruct, offline), "
                        "a Hub id, a local HF directory, or a .gguf file", group="model")
    dtype: str = option("auto", "weights' dtype; auto = float32 on CPU, bfloat16 on CUDA", group="model",
                        choices=DTYPES)
    trust_remote_code: bool = option(False, "allow model code from the Hub repo (only for repos you trust)",
                                     group="model")
    offline: bool = option(False, "never contact the Hugging Face Hub: models from local files or the cache, "
                           "tasks from llmprune's offline copies", group="model")
    prune: PruneConfig = option(factory=PruneConfig, cli=False)
    calib: str = option("wiki", "calibration text source (see text sources below)", group="calibration",
                        metavar="SOURCE")
    eval: str = option("wiki", "perplexity text source (its held-out part), or none", group="evaluation",
                       metavar="SOURCE")
    eval_windows: int = option(40, "perplexity windows of --seqlen tokens; 0 = all of the held-out text",
                               group="evaluation")
    tasks: str | None = option(None, "zero-shot tasks through lm-evaluation-harness, comma separated: task names "
                               "or suites (wanda-suite = boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,"
                               "openbookqa; all-offline adds piqa,lambada_openai)", group="evaluation")
    limit: int | None = option(None, "documents per zero-shot task (default: all)", group="evaluation")
    num_fewshot: int = option(0, "few-shot examples per prompt", group="evaluation")
    eval_batch_size: int = option(16, "the most sequences per lm-eval batch; long ones go in smaller batches, "
                                  "so their logits fit in half the free memory", group="evaluation")
    recover: str | None = option(None, "recover after pruning, keeping the sparsity pattern exactly: lm = next-token "
                                 "loss, distill = match the dense model's distributions (top-k KL); lora = lm "
                                 "with --recover-params lora (the default)", group="recovery",
                                 choices=("lora", "lm", "distill"))
    recovery: RecoverConfig = option(factory=RecoverConfig, cli=False)
    keep_adapter: bool = option(False, "also save the unmerged adapter in DIR/adapter (peft format)",
                                group="recovery", flag="--recover-keep-adapter")
    schedule: str | None = option(None, "gradual pruning: comma list of rising sparsities, e.g. 0.3,0.4,0.5; each "
                                  "stage prunes further (keeping earlier zeros; with --structure, removing more units "
                                  "until that fraction of the dense count is gone) and, with --recover, recovers for "
                                  "an equal share of the budget", group="pruning", metavar="S1,S2,..")
    stream: bool = option(False, "read the model layer by layer from its safetensors files and write the output "
                          "as it goes: the dense model is never whole in memory (automatic when its weights "
                          "exceed half the available memory)", group="scale")
    offload_activations: str | None = option(None, "keep the calibration activations in a file in this folder "
                                             "instead of memory", group="scale", metavar="DIR")
    checkpoint: bool = option(False, "save every finished layer in the work folder, so that --resume can continue "
                              "after a crash (streamed runs always do)", group="scale")
    resume: bool = option(False, "continue an interrupted run from its work folder (the same settings)",
                          group="scale")
    work_dir: str | None = option(None, "the checkpoint folder (default: .NAME.work beside --output)",
                                  group="scale", metavar="DIR")
    output: str | None = option(None, "write the pruned model (safetensors), tokenizer, llmprune_config.json, "
                                "report.json and a model card (README.md) here (default: print the report only)",
                                group="output", metavar="DIR")
    overwrite: bool = option(False, "replace an existing --output", group="output")
    save_format: str = option("hf", "hf: a Hugging Face folder; gguf: the same plus NAME-OUTTYPE.gguf in it, for "
                              "llama.cpp (Llama family)", group="output", choices=("hf", "gguf"))
    gguf_outtype: str = option("f16", "weight type of the GGUF's matrices (norms and biases stay f32)",
                               group="output", choices=GGUF_OUTTYPES)
    push_to_hub: str | None = option(None, "upload --output to this Hub model repo (token from HF_TOKEN or "
                                     "`hf auth login`)", group="output", metavar="OWNER/NAME")
    private: bool = option(False, "with --push-to-hub: make the repo private (a new one, or an existing one)",
                           group="output")

    def __post_init__(self):
        if isinstance(self.prune, dict):
            settle(self, "prune", PruneConfig(**_checked_keys(PruneConfig, self.prune)))
        if isinstance(self.recovery, dict):
            settle(self, "recovery", RecoverConfig(**_checked_keys(RecoverConfig, self.recovery)))
        if self.recover in ("lm", "distill") and self.recovery.loss != self.recover:
            settle(self, "recovery", replace(self.recovery, loss=self.recover))
        if self.recovery.distill_hidden and not (self.recover and self.recovery.loss == "distill"):
            raise LLMPruneError("--distill-hidden adds to the distillation loss: use it with --recover distill")
        check_at_least(self, ("eval_windows", "num_fewshot"), minimum=0)
        check_at_least(self, ("eval_batch_size",))
        if self.limit is not None:
            check_at_least(self, ("limit",))
        if self.recover not in (None, "lora", "lm", "distill"):
            raise LLMPruneError(f"--recover must be lora, lm or distill (got '{self.recover}')")
        if self.recover and self.prune.sparsity == 0:
            raise LLMPruneError(f"--recover {self.recover} with --sparsity 0 has nothing to recover: prune first")
        if self.push_to_hub and not self.output:
            raise LLMPruneError("--push-to-hub uploads the --output directory: give --output DIR too")
        if self.push_to_hub and self.offline:
            raise LLMPruneError("--offline never contacts the Hub, so --push-to-hub cannot run: drop one of them")
        for name in ("remove_params", "target_params", "shape"):
            if getattr(self.prune, name) is not None and self.schedule:
                flag = flag_of(PruneConfig, name)
                raise LLMPruneError(f"{flag} chooses one sparsity; a --schedule names each stage's: give "
                                    f"--schedule with sparsities (e.g. 0.1,0.2) and drop {flag}")
        if self.prune.structure == "hidden" and self.schedule:
            raise LLMPruneError("--structure hidden shrinks the hidden size once: drop --schedule")
        if self.schedule is not None:
            self.schedule_sparsities()
        if (self.resume or self.checkpoint) and not (self.output or self.work_dir):
            raise LLMPruneError("--resume and --checkpoint keep their work beside --output: give --output DIR")
        if self.save_format == "gguf" and not self.output:
            raise LLMPruneError("--save-format gguf writes into the --output folder: give --output DIR")
        if self.dtype not in DTYPES:
            raise LLMPruneError(f"--dtype must be one of {', '.join(DTYPES)} (got '{self.dtype}')")

    def schedule_sparsities(self) -> list[float]:
        """--schedule as rising sparsities ending at the run's own; [sparsity] without a schedule (a
        --remove-params run's sparsity is chosen once the model is loaded: the pipeline's Plan holds it)."""
        if self.schedule is None:
            return [self.prune.sparsity]
        try:
            stages = [float(s) for s in str(self.schedule).split(",") if s.strip()]
        except ValueError:
            raise LLMPruneError(f"--schedule must be a comma list of sparsities such as 0.3,0.4,0.5 (got "
                                f"'{self.schedule}')") from None
        if not stages or any(not 0 < s < 1 for s in stages) or stages != sorted(set(stages)):
            raise LLMPruneError(f"--schedule sparsities must rise strictly inside (0, 1) (got '{self.schedule}')")
        if self.prune.nm:
            raise LLMPruneError("--schedule raises unstructured sparsity step by step; an N:M pattern is one step")
        if abs(stages[-1] - self.prune.sparsity) > 1e-9:
            raise LLMPruneError(f"--schedule ends at {stages[-1]:g} but --sparsity is {self.prune.sparsity:g}: end "
                                f"the schedule at the target, or drop --sparsity")
        return stages

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: Path) -> None:
        path.write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        return cls(**_checked_keys(cls, data))


def _checked_keys(cls, data: dict) -> dict:
    """Refuse keys a config class does not have (a typo in a config file must not be ignored); nested configs
    are built from their mappings, and a prune's flat knobs go to the config that reads them."""
    if cls is PruneConfig:
        data = route_knobs(data)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise LLMPruneError(f"unknown setting(s) {', '.join(unknown)} in the config file: known are "
                            f"{', '.join(known)}")
    nested = {"prune": PruneConfig, "recovery": RecoverConfig}
    return {k: (nested[k](**_checked_keys(nested[k], v)) if k in nested and isinstance(v, dict) else v)
            for k, v in data.items()}


def _knob_fields() -> dict[str, type]:
    """Every knob's name -> a config class that declares it."""
    return {f.name: config for config in registry.knob_configs() for f in fields(config)}


def route_knobs(values: dict) -> dict:
    """Prune settings with knobs by name among them (flags such as --ria-alpha, or a flat config file) as
    PruneConfig's fields: each knob goes into the config of the method, update or allocation that reads it.
    A knob that none of them reads is refused, unless it holds its default (a flat file lists every knob)."""
    owners = _knob_fields()
    flat = {k: v for k, v in values.items() if k in owners}
    if not flat:
        return values
    routed = {k: v for k, v in values.items() if k not in flat}
    entries = {}
    if routed.get("structure", "none") == "none":
        update, allocation = routed.get("update", "none"), routed.get("allocation", "uniform")
        entries = {"method": registry.get_method(routed.get("method") or DEFAULT_METHOD),
                   "update": registry.get_update(update) if update != "none" else None,
                   "allocation": registry.get_allocation(allocation)}
    used = set()
    for role, entry in entries.items():
        mine = {f.name for f in fields(entry.config)} & set(flat) if entry and entry.config else set()
        if mine:
            earlier = routed.get(f"{role}_config")
            earlier = earlier.knobs() if isinstance(earlier, KnobConfig) else dict(earlier or {})
            routed[f"{role}_config"] = {**earlier, **{k: flat[k] for k in sorted(mine)}}
            used |= mine
    for name in sorted(set(flat) - used):
        owner = owners[name]
        owner(**{name: flat[name]})  # a bad value is refused as such first
        if flat[name] != owner.__dataclass_fields__[name].default:
            readers = {(role, entry.name) for role, table in
                       (("method", registry.METHODS), ("update", registry.UPDATES), ("allocation", registry.ALLOCATIONS))
                       for entry in table.values() if entry.config and name in entry.config.__dataclass_fields__}
            this = (f"--structure {routed['structure']}" if not entries else ", ".join(
                f"--{role} {entries[role].name if entries[role] else 'none'}" for role in KNOB_ROLES
                if role in {role for role, _ in readers}))
            raise LLMPruneError(f"{flag_of(owner, name)} is a setting of "
                                f"{' or '.join(f'--{role} {reader}' for role, reader in sorted(readers))}, and this "
                                f"run uses {this}: drop it")
    return routed


def prune_config_from(given: dict, base: dict | None = None) -> PruneConfig:
    """PruneConfig from settings by field or knob name (`given`, such as the flags) over a config file's "prune"
    mapping (`base`). A file's knobs of a method (update, allocation) that `given` replaces are dropped."""
    values = dict(base or {})
    for role in KNOB_ROLES:
        if role in given and given[role] != values.get(role):
            values.pop(f"{role}_config", None)
    names = {f.name for f in fields(PruneConfig)} | set(_knob_fields())
    values.update({k: v for k, v in given.items() if k in names})
    return PruneConfig(**_checked_keys(PruneConfig, values))


def load_config_file(path: str | Path) -> dict:
    """A YAML or JSON file of settings, nested as RunConfig is ({"model": ..., "prune": {...}})."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise LLMPruneError(f"cannot read --config {path}: {err.strerror}") from None
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise LLMPruneError(f"--config {path} is not valid YAML or JSON: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LLMPruneError(f"--config {path} must hold a mapping of settings (got {type(data).__name__})")
    return data
