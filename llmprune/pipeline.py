"""A whole run, as the CLI does it: load, calibrate, evaluate dense, prune, evaluate pruned, save.

`run(RunConfig)` is the Python entry point for everything the command line does; `prune()` (runner)
is the entry point for pruning a model already in memory.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from . import __version__
from .config import RunConfig
from .inputs.data import calibration_windows, check_source, eval_windows, load_text, tokenize
from .pruning.methods import get_method
from .inputs.models import load_model, resolve_model, weight_matrix
from .output.atomic import atomic_directory, check_output
from .evaluation.perplexity import perplexity
from .output.publish import check_push, push, write_model_card
from .recovery.lora import recover_lora
from .pruning.runner import check_model
from .runtime import current_rss_bytes, peak_rss_bytes, resolve_device, resolve_dtype
from .evaluation.zeroshot import evaluate_zero_shot, resolve_tasks
from .pruning.runner import prune as prune_layers


def run(config: RunConfig, progress: bool = True, command: str | None = None, dense_cache: dict | None = None) -> dict:
    """Run the whole job described by `config`; returns the report (also written to --output).

    `dense_cache`: a dict kept by a caller that runs several configs of one model (a sweep); the dense
    model's perplexity and zero-shot scores are computed once and reused while their settings match."""
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    pc = config.prune
    if config.output:
        check_output(config.output, config.overwrite)
    if config.push_to_hub:
        check_push(config.push_to_hub)
    tasks = resolve_tasks(config.tasks) if config.tasks else None
    device = resolve_device(pc.device)
    resolve_model(config.model)  # a mistyped path fails now, not after the text is read
    method = get_method(pc.method)
    needs_calibration = method.statistic is not None or pc.allocation != "uniform"
    sources = [config.calib] if needs_calibration or config.recover else []
    for source in sources + ([config.eval] if config.eval != "none" else []):
        check_source(source)

    clock = time.perf_counter()
    dtype = resolve_dtype(config.dtype, device)
    _say(progress, f"loading {config.model} ({dtype})")
    model, tokenizer, source = load_model(config.model, dtype, config.trust_remote_code)
    seconds["load"] = time.perf_counter() - clock
    check_model(model, pc)
    rss_loaded = current_rss_bytes()

    clock = time.perf_counter()
    calibration, calib_tokens = None, None
    if needs_calibration or config.recover:
        _say(progress, f"calibration text: {config.calib}")
        calib_tokens = tokenize(tokenizer, load_text(config.calib, "calib"))  # recovery trains on it too
    if needs_calibration:
        calibration = calibration_windows(calib_tokens, pc.nsamples, pc.seqlen, pc.seed)
    seconds["calibrate"] = time.perf_counter() - clock

    clock = time.perf_counter()
    ppl = None
    dense_key = (config.model, dtype, str(device), config.eval, pc.seqlen, config.eval_windows, tuple(tasks or ()),
                 config.limit, config.num_fewshot, pc.seed, config.eval_batch_size)
    dense = dense_cache.get(dense_key) if dense_cache is not None else None
    if config.eval != "none":
        windows = eval_windows(tokenize(tokenizer, load_text(config.eval, "eval")), pc.seqlen, config.eval_windows)
        dense_ppl = dense["ppl"] if dense else perplexity(model, windows, device, progress, desc="perplexity (dense)")
        ppl = {"dataset": config.eval, "seqlen": pc.seqlen, "windows": len(windows), "dense": dense_ppl}
    zero_shot_dense = dense["zero_shot"] if dense else _zero_shot(model, tokenizer, tasks, config, progress, "dense")
    if dense_cache is not None:
        dense_cache[dense_key] = {"ppl": ppl and ppl["dense"], "zero_shot": zero_shot_dense}
    seconds["evaluate"] = time.perf_counter() - clock

    clock = time.perf_counter()
    pruned = prune_layers(model, calibration, pc, progress=progress)
    seconds["prune"] = time.perf_counter() - clock
    seconds["calibrate"] += pruned.seconds.get("capture", 0.0)
    seconds["prune"] -= pruned.seconds.get("capture", 0.0)

    clock = time.perf_counter()
    if ppl is not None:
        ppl["pruned"] = perplexity(model, windows, device, progress, desc="perplexity (pruned)")
    seconds["evaluate"] += time.perf_counter() - clock

    recovery, adapter_dir = None, None
    if config.recover:
        clock = time.perf_counter()
        if config.keep_adapter:  # trained before the output exists; moved into it with the rest
            adapter_dir = Path(tempfile.mkdtemp(prefix="llmprune-adapter-"))
        recovery = _recover(model, calib_tokens, pruned, config, progress, adapter_dir)
        if adapter_dir is not None:
            recovery["adapter"] = "adapter"  # its folder in the output (save_output copies it there)
        seconds["recover"] = time.perf_counter() - clock
        if ppl is not None:
            ppl["recovered"] = perplexity(model, windows, device, progress, desc="perplexity (recovered)")
    clock = time.perf_counter()
    zero_shot = _zero_shot(model, tokenizer, tasks, config, progress, "recovered" if recovery else "pruned")
    seconds["evaluate"] += time.perf_counter() - clock

    summary = pruned.to_dict()
    report = {
        "llmprune_version": __version__,
        "model": config.model,
        "base_model": source.base_model,
        "license": source.license,
        "architecture": type(model).__name__,
        "method": pc.method,
        "sparsity": pc.sparsity,
        "pattern": pc.pattern,
        "allocation": pc.allocation,
        "calibration": {"source": config.calib, "nsamples": pc.nsamples, "seqlen": pc.seqlen, "seed": pc.seed}
        if needs_calibration else None,
        "achieved_sparsity": summary["achieved_sparsity"],
        "layer_sparsity": summary["layer_sparsity"],
        "layers": summary["layers"],
        "perplexity": ppl,
        "zero_shot_dense": zero_shot_dense,
        "zero_shot": zero_shot,
        "recovery": recovery,
        "seconds": seconds,
        "prune_phases": summary["seconds"],
        "rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": peak_rss_bytes(),
        "device": str(device),
        "dtype": dtype,
        "versions": {"llmprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "command": command,
    }
    seconds["total"] = time.perf_counter() - started  # saving excluded: it is the same for every method
    try:
        if config.output:
            _say(progress, f"writing {config.output}")
            save_output(model, tokenizer, config, report, adapter_dir)
    finally:
        if adapter_dir is not None:
            shutil.rmtree(adapter_dir, ignore_errors=True)
    if config.push_to_hub:
        _say(progress, f"pushing {config.output} to {config.push_to_hub}")
        report["pushed_to"] = push(config.output, config.push_to_hub, private=config.private)
    return report


def _zero_shot(model, tokenizer, tasks, config: RunConfig, progress: bool, which: str) -> dict | None:
    if not tasks:
        return None
    _say(progress, f"zero-shot ({which}): {', '.join(tasks)}")
    return evaluate_zero_shot(model, tokenizer, tasks, limit=config.limit, num_fewshot=config.num_fewshot,
                              batch_size=config.eval_batch_size, seed=config.prune.seed)


def _recover(model, calib_tokens, pruned, config: RunConfig, progress: bool, adapter_dir: Path | None) -> dict:
    """LoRA on the calibration source's training part (never the held-out part), keeping the masks."""
    rc = config.recovery
    train_ids = calibration_windows(calib_tokens, rc.steps * rc.batch, rc.seqlen, rc.seed)
    linears = {layer["name"]: model.get_submodule(layer["name"]) for layer in pruned.layers}
    _, stats = recover_lora(model, train_ids, rc, pruned_linears=linears, progress=progress, adapter_dir=adapter_dir)
    weights = [weight_matrix(module) for module in linears.values()]  # counted again: the merged weights
    stats["achieved_sparsity"] = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return stats


def save_output(model, tokenizer, config: RunConfig, report: dict, adapter_dir: Path | None = None) -> None:
    with atomic_directory(config.output, config.overwrite) as staging:
        if adapter_dir is not None:
            shutil.copytree(adapter_dir, staging / "adapter")  # the unmerged LoRA adapter (peft format)
        model.save_pretrained(staging)  # safetensors
        tokenizer.save_pretrained(staging)
        config.save(staging / "llmprune_config.json")
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        write_model_card(staging, report)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"llmprune: {message}", file=sys.stderr, flush=True)
