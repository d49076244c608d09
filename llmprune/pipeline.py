"""A whole run, as the CLI does it, in phases:

    preflight -> load -> calibration -> dense evaluation -> prune -> evaluation -> recovery -> save -> push

`run(RunConfig)` is the Python entry point for everything the command line does; `prune()` (pruning/runner.py)
is the entry point for pruning a model already in memory. Every check that can fail runs in `preflight`, or as
soon as what it needs exists, before minutes of work.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .config import RunConfig
from .errors import LLMPruneError
from .report import Calibration, Perplexity, Report, display_name


@dataclass
class DenseScores:
    """The dense model's scores: a sweep over methods of one model computes them once and passes them back in."""

    perplexity: float | None
    zero_shot: dict | None


@dataclass
class Plan:
    """What preflight resolved, for the phases after it."""

    device: object
    dtype: str
    tasks: list[str] | None
    needs_calibration: bool


class Stopwatch:
    """Wall time per phase, summed over the phase's visits (evaluation happens three times)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def run(config: RunConfig, progress: bool = True, command: str | None = None,
        dense: DenseScores | None = None) -> Report:
    """Run the whole job described by `config`; returns the report (also written to --output).
    `dense`: the dense model's scores from an earlier run with the same model and evaluation settings."""
    clock = Stopwatch()
    plan = preflight(config)
    with clock("load"):
        model, tokenizer, source = load(config, plan, progress)
    with clock("calibrate"):
        calib_tokens, calibration = calibration_data(tokenizer, config, plan, progress)
    with clock("evaluate"):
        windows, dense = evaluate_dense(model, tokenizer, config, plan, dense, progress)
    with clock("prune"):
        pruned = prune_model(model, calibration, config, progress)
    with clock("evaluate"):
        ppl_pruned = _perplexity(model, windows, plan, progress, "pruned")
    recovery = None
    if config.recover:
        with clock("recover"):
            recovery = recover(model, calib_tokens, pruned, config, progress)
        with clock("evaluate"):
            ppl_recovered = _perplexity(model, windows, plan, progress, "recovered")
    with clock("evaluate"):
        zero_shot = _zero_shot(model, tokenizer, plan, config, progress, "recovered" if recovery else "pruned")
    clock.seconds["calibrate"] += pruned.seconds.get("capture", 0.0)  # the runner's capture is calibration
    clock.seconds["prune"] -= pruned.seconds.get("capture", 0.0)
    clock.seconds["total"] = time.perf_counter() - clock.started  # saving excluded: the same for every method
    report = assemble_report(model, source, config, plan, pruned, dense, windows, ppl_pruned,
                             ppl_recovered if recovery else None, zero_shot, recovery, clock.seconds, command)
    if config.output:
        _say(progress, f"writing {config.output}")
        save_output(model, tokenizer, config, report, recovery)
    if config.push_to_hub:
        from .output.publish import push

        _say(progress, f"pushing {config.output} to {config.push_to_hub}")
        report.pushed_to = push(config.output, config.push_to_hub, private=config.private)
    return report


# ------------------------------------------------------------------ phases


def preflight(config: RunConfig) -> Plan:
    """Everything that can be checked before loading the model: output, Hub, device, model files, texts."""
    from .evaluation.zeroshot import resolve_tasks
    from .inputs.data import check_source
    from .inputs.models import check_model_files, resolve_model
    from .output.atomic import check_output
    from .pruning.methods import get_method
    from .runtime import resolve_device, resolve_dtype

    pc = config.prune
    if config.output:
        check_output(config.output, config.overwrite)
    if config.push_to_hub:
        from .output.publish import check_push

        check_push(config.push_to_hub)
    tasks = resolve_tasks(config.tasks) if config.tasks else None
    device = resolve_device(pc.device)
    source = resolve_model(config.model)  # a mistyped path fails now, not after the text is read
    seqlens = {"--seqlen": pc.seqlen} | ({"--recover-seqlen": config.recovery.seqlen} if config.recover else {})
    check_model_files(source, seqlens, config.trust_remote_code)
    method = get_method(pc.method)
    needs_calibration = method.statistic is not None or pc.allocation != "uniform" or pc.update != "none"
    if needs_calibration:
        check_source(config.calib, "calib", pc.nsamples * pc.seqlen, "--nsamples or --seqlen")
    if config.recover:
        check_source(config.recovery.data or config.calib, "calib", config.recovery.text_tokens,
                     "--recover-steps, --recover-batch or --recover-seqlen")
    if config.eval != "none":
        check_source(config.eval, "eval", min_tokens=pc.seqlen)
    return Plan(device, resolve_dtype(config.dtype, device), tasks, needs_calibration)


def load(config: RunConfig, plan: Plan, progress: bool):
    """The model on the CPU in eval mode, checked once (finite weights, prunable shapes), and room to save it."""
    from .inputs.models import load_model
    from .output.atomic import check_free_space
    from .pruning.runner import check_model

    _say(progress, f"loading {config.model} ({plan.dtype})")
    model, tokenizer, source = load_model(config.model, plan.dtype, config.trust_remote_code)
    check_model(model, config.prune)
    if config.output:
        check_free_space(config.output, sum(p.numel() * p.element_size() for p in model.parameters()))
    return model, tokenizer, source


def calibration_data(tokenizer, config: RunConfig, plan: Plan, progress: bool):
    """The calibration text's tokens (recovery trains on them too) and the calibration windows."""
    from .inputs.data import calibration_windows, load_text, tokenize

    if not (plan.needs_calibration or config.recover):
        return None, None
    _say(progress, f"calibration text: {config.calib}")
    tokens = tokenize(tokenizer, load_text(config.calib, "calib"))
    if config.recover and config.recovery.tokens > tokens.numel():
        rc = config.recovery
        raise LLMPruneError(f"recovery needs {rc.steps} x {rc.batch} x {rc.seqlen} = {rc.tokens} tokens but "
                            f"{config.calib}'s training text holds {tokens.numel()}: lower --recover-steps, "
                            "--recover-batch or --recover-seqlen, or use a larger --calib source")
    pc = config.prune
    windows = calibration_windows(tokens, pc.nsamples, pc.seqlen, pc.seed) if plan.needs_calibration else None
    return tokens, windows


def evaluate_dense(model, tokenizer, config: RunConfig, plan: Plan, dense: DenseScores | None, progress: bool):
    """The held-out windows, and the dense model's perplexity and zero-shot scores (unless given)."""
    from .inputs.data import eval_windows, load_text, tokenize

    windows = None
    if config.eval != "none":
        windows = eval_windows(tokenize(tokenizer, load_text(config.eval, "eval")), config.prune.seqlen,
                               config.eval_windows)
    if dense is None:
        dense = DenseScores(_perplexity(model, windows, plan, progress, "dense"),
                            _zero_shot(model, tokenizer, plan, config, progress, "dense"))
    return windows, dense


def prune_model(model, calibration, config: RunConfig, progress: bool):
    from .pruning.runner import prune

    return prune(model, calibration, config.prune, progress=progress, checked=True)


def recover(model, calib_tokens, pruned, config: RunConfig, progress: bool) -> dict:
    """LoRA on the calibration source's training part (never the held-out part), keeping the masks."""
    import tempfile

    from .inputs.data import calibration_windows
    from .inputs.models import weight_matrix
    from .recovery.lora import recover_lora

    rc = config.recovery
    train_ids = calibration_windows(calib_tokens, rc.steps * rc.batch, rc.seqlen, rc.seed)
    linears = {layer["name"]: model.get_submodule(layer["name"]) for layer in pruned.layers}
    adapter_dir = Path(tempfile.mkdtemp(prefix="llmprune-adapter-")) if config.keep_adapter else None
    _, stats = recover_lora(model, train_ids, rc, pruned_linears=linears, progress=progress, adapter_dir=adapter_dir)
    weights = [weight_matrix(module) for module in linears.values()]  # counted again: the merged weights
    stats["achieved_sparsity"] = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    if adapter_dir is not None:
        stats["adapter"] = "adapter"  # its folder in the output
        stats["_adapter_dir"] = str(adapter_dir)  # where it waits until save_output moves it (not reported)
    return stats


def assemble_report(model, source, config, plan, pruned, dense, windows, ppl_pruned, ppl_recovered, zero_shot,
                    recovery, seconds, command) -> Report:
    import torch
    import transformers

    from .runtime import current_rss_bytes, peak_rss_bytes

    pc = config.prune
    summary = pruned.to_dict()
    perplexity = None
    if windows is not None:
        perplexity = Perplexity(config.eval, pc.seqlen, len(windows), dense.perplexity, ppl_pruned, ppl_recovered)
    return Report.from_dict({
        "llmprune_version": __version__,
        "model": config.model,
        "model_name": display_name(source),
        "base_model": source.base_model,
        "license": source.license,
        "architecture": type(model).__name__,
        "method": pc.method,
        "update": pc.update,
        "sparsity": pc.sparsity,
        "pattern": pc.pattern,
        "allocation": pc.allocation,
        "calibration": Calibration(config.calib, pc.nsamples, pc.seqlen, pc.seed).__dict__
        if plan.needs_calibration else None,
        "achieved_sparsity": summary["achieved_sparsity"],
        "layer_sparsity": summary["layer_sparsity"],
        "layers": summary["layers"],
        "perplexity": perplexity.__dict__ if perplexity else None,
        "zero_shot_dense": dense.zero_shot,
        "zero_shot": zero_shot,
        "recovery": {k: v for k, v in recovery.items() if not k.startswith("_")} if recovery else None,
        "seconds": seconds,
        "prune_phases": summary["seconds"],
        "rss_after_load_bytes": current_rss_bytes(),
        "peak_rss_bytes": peak_rss_bytes(),
        "device": str(plan.device),
        "dtype": plan.dtype,
        "versions": {"llmprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "command": command,
    })


def save_output(model, tokenizer, config: RunConfig, report: Report, recovery: dict | None = None) -> None:
    """Model (safetensors), tokenizer, config, report and card, all or nothing."""
    import shutil

    from .output.atomic import atomic_directory
    from .output.publish import write_model_card

    adapter_dir = (recovery or {}).get("_adapter_dir")
    try:
        with atomic_directory(config.output, config.overwrite) as staging:
            if adapter_dir:
                shutil.copytree(adapter_dir, staging / "adapter")  # the unmerged LoRA adapter (peft format)
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            config.save(staging / "llmprune_config.json")
            report.save(staging / "report.json")
            write_model_card(staging, report)
    finally:
        if adapter_dir:
            shutil.rmtree(adapter_dir, ignore_errors=True)


# ------------------------------------------------------------------ helpers


def _perplexity(model, windows, plan: Plan, progress: bool, which: str) -> float | None:
    import math

    from .evaluation.perplexity import perplexity

    if windows is None:
        return None
    value = perplexity(model, windows, plan.device, progress, desc=f"perplexity ({which})")
    if not math.isfinite(value):
        raise LLMPruneError(f"the {which} model's perplexity is {value}: its outputs overflow or are NaN "
                            f"(try --dtype float32, or a lower --sparsity)")
    return value


def _zero_shot(model, tokenizer, plan: Plan, config: RunConfig, progress: bool, which: str) -> dict | None:
    if not plan.tasks:
        return None
    from .evaluation.zeroshot import evaluate_zero_shot

    _say(progress, f"zero-shot ({which}): {', '.join(plan.tasks)}")
    return evaluate_zero_shot(model, tokenizer, plan.tasks, limit=config.limit, num_fewshot=config.num_fewshot,
                              batch_size=config.eval_batch_size, seed=config.prune.seed)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"llmprune: {message}", file=sys.stderr, flush=True)

