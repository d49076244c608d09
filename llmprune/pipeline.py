"""A whole run, as the CLI does it, in phases:

    preflight -> load -> calibration -> dense evaluation -> prune -> evaluation -> recovery -> save -> push

`run(RunConfig)` is the Python entry point for everything the command line does; `prune()` (pruning/runner.py)
is the entry point for pruning a model already in memory. Every check that can fail runs in `preflight`, or as
soon as what it needs exists, before minutes of work.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager, nullcontext
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
    source: object = None  # the resolved ModelSource
    stream: bool = False
    stream_reason: str | None = None
    parallel: object = None  # a DataParallel under torchrun, else None
    work_dir: Path | None = None  # where per-layer checkpoints go (--checkpoint, --resume, streaming)
    sparsity: float | None = None  # the run's; --remove-params or --target-params chooses it once the model is loaded
    target_params: int | None = None  # --target-params (--remove-params) as a parameter count of the loaded model
    shape: dict | None = None  # several structures: the searched shape, axis -> sparsity (structured/search.py)
    shape_source: str | None = None  # where the shape came from: "search", or the --shape file
    layers_removed: list[int] | None = None  # --shape: the decoder layers the file names, if it names them

    @property
    def writer(self) -> bool:
        return self.parallel is None or self.parallel.rank == 0


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
    if plan.stream:
        from .scale.pipeline import run_streamed

        return run_streamed(config, plan, progress, command)
    with clock("load"):
        model, tokenizer, source = load(config, plan, progress)
    with clock("calibrate"):
        calibration = calibration_data(tokenizer, config, plan, progress)
    with clock("recover") if config.recover else nullcontext():
        recovery_inputs = recovery_data(model, tokenizer, config, plan, progress)  # the teacher sees the dense model
    with clock("evaluate"):
        windows, dense = evaluate_dense(model, tokenizer, config, plan, dense, progress)
    stages = config.schedule_sparsities() if config.schedule else [plan.sparsity]
    recoveries, pruned = [], None
    for stage, sparsity in enumerate(stages):  # one stage unless --schedule
        with clock("prune"):
            pruned = prune_model(model, calibration, config, plan, sparsity, progress, pruned)
        if stage == len(stages) - 1:
            with clock("evaluate"):
                ppl_pruned = measure_perplexity(model, windows, config, plan, progress, "pruned")
        if recovery_inputs is not None:
            with clock("recover"):
                recoveries.append(recover(model, pruned, recovery_inputs, stage, len(stages), progress))
    recovery = _join_stages(recoveries, stages) if recoveries else None
    with clock("evaluate"):
        ppl_recovered = measure_perplexity(model, windows, config, plan, progress, "recovered") if recovery else None
        zero_shot = _zero_shot(model, tokenizer, plan, config, progress, "recovered" if recovery else "pruned")
    clock.seconds["calibrate"] += pruned.seconds.get("capture", 0.0)  # the runner's capture is calibration
    clock.seconds["prune"] -= pruned.seconds.get("capture", 0.0)
    clock.seconds["total"] = time.perf_counter() - clock.started  # saving excluded: the same for every method
    if not plan.writer:
        return None  # a torchrun rank other than 0: rank 0 evaluates and writes
    report = assemble_report(type(model).__name__, source, config, plan, pruned, dense, windows, ppl_pruned,
                             ppl_recovered, zero_shot, recovery, clock.seconds, command)
    if config.output:
        say(progress, f"writing {config.output}")
        save_output(model, tokenizer, config, report, recovery)
    push_output(config, report, progress)
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
    if pc.structure == "none":
        method = get_method(pc.method)
        needs_calibration = method.statistic is not None or pc.allocation != "uniform" or pc.update != "none"
        if pc.allocation.startswith("scan:"):
            from .pruning.scan import ScanTable

            ScanTable.load(pc.allocation.removeprefix("scan:"))  # a broken table fails now
    else:
        needs_calibration = (pc.structure == "experts" or pc.several or pc.shape is not None
                             or pc.structured().needs_calibration)  # experts: routed tokens
    stream, reason = _should_stream(config, source)
    work_dir = None
    if config.resume or config.checkpoint or stream:
        from .scale.checkpoint import check_resumable, default_work_dir

        work_dir = Path(config.work_dir) if config.work_dir else default_work_dir(config.output)
        if config.resume:
            check_resumable(work_dir)
    parallel = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .scale.distributed import DataParallel

        if config.recover or config.tasks:
            raise LLMPruneError("under torchrun the ranks share calibration only: run --recover and --tasks in a "
                                "single process (python -m llmprune ...)")
        device = resolve_device(DataParallel.device(pc.device))  # this rank's: the plan's, the config stays
        parallel = DataParallel.from_environment(device)
    if pc.structure == "experts" and (stream or parallel is not None):
        raise LLMPruneError("--structure experts scores the experts in one process with the model in memory: drop "
                            "--stream and torchrun")
    shaped = pc.several or pc.shape is not None  # pruned axis by axis to a shape (searched or from --shape)
    if shaped and (stream or parallel is not None or config.resume or config.checkpoint or
                   (config.recover and config.recovery.distill_hidden and "layers" in pc.axes)):
        raise LLMPruneError(f"--structure {pc.structure} prunes a {'given' if pc.shape else 'searched'} shape in one "
                            "process, in memory: no --stream, --checkpoint, --resume, torchrun, nor --distill-hidden "
                            "with layers")
    if pc.structure not in ("none", "experts"):
        from .pruning.structured.runner import check_layer_by_layer

        check_layer_by_layer(pc.structured(), stream, parallel is not None, bool(config.resume or config.checkpoint))
    if needs_calibration:
        searching = pc.several and pc.shape is None
        windows = pc.nsamples + (pc.search_windows if searching else 0)
        check_source(config.calib, "calib", windows * pc.seqlen,
                     "--nsamples, --seqlen or --search-windows" if searching else "--nsamples or --seqlen")
    if config.recover:
        check_source(config.recovery.data or config.calib, "calib", config.recovery.text_tokens,
                     "--recover-steps, --recover-batch or --recover-seqlen")
    if config.eval != "none":
        check_source(config.eval, "eval", min_tokens=pc.seqlen)
    return Plan(device, resolve_dtype(config.dtype, device), tasks, needs_calibration, source, stream, reason,
                parallel, work_dir, pc.sparsity)


def _should_stream(config: RunConfig, source) -> tuple[bool, str | None]:
    """--stream, or automatically a local safetensors model whose weights exceed half the available memory."""
    if source.is_hub or source.gguf_file:
        if config.stream:
            raise LLMPruneError("--stream reads a local folder of safetensors files: download the model first "
                                "(hf download ID --local-dir DIR), or convert the GGUF file")
        return False, None
    from .scale.streaming import should_stream

    automatic, reason = should_stream(source.path)
    stream = config.stream or automatic
    if stream:
        reason = "--stream" if config.stream else f"automatic: {reason}"
        if config.recover or config.tasks or config.schedule:
            raise LLMPruneError(f"streaming ({reason}) never holds the whole model, which --recover, --tasks and "
                                "--schedule need: prune first, then recover or evaluate the (smaller) output")
        if not config.output:
            raise LLMPruneError(f"streaming ({reason}) writes the model as it goes: give --output DIR")
        for flag, value in (("--remove-params", config.prune.remove_params),
                            ("--target-params", config.prune.target_params)):
            if value is not None:
                raise LLMPruneError(f"streaming ({reason}) takes the structure's own --sparsity: give it instead "
                                    f"of {flag}")
    return stream, reason


def load(config: RunConfig, plan: Plan, progress: bool):
    """The model on the CPU in eval mode, checked once (finite weights, prunable shapes), and room to save it;
    the sparsity --remove-params or --target-params chooses from the model goes into the plan."""
    from .inputs.models import load_model
    from .output.atomic import check_free_space
    from .pruning.runner import check_model

    if not progress:  # --quiet: transformers' own loading and saving bars too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    say(progress, f"loading {config.model} ({plan.dtype})")
    model, tokenizer, source = load_model(config.model, plan.dtype, config.trust_remote_code)
    pc = config.prune
    if pc.structure == "none":
        check_model(model, pc)
    elif pc.structure == "experts":
        from .pruning.expert_removal import expert_blocks

        expert_blocks(model)  # a model without fused experts fails now, before any work
    else:
        from .pruning.structured.runner import plan_structure, remove_params_target, sparsity_for_target, target_count

        if pc.shape is not None:
            given_shape(model, config, plan, progress)
        elif pc.several:
            search_shape(model, tokenizer, config, plan, progress)
        elif pc.remove_params is not None or pc.target_params is not None:
            asked = (f"--remove-params {pc.remove_params:g}" if pc.remove_params is not None else
                     f"--target-params {pc.target_params}")
            plan.target_params = (remove_params_target(model, pc.remove_params) if pc.remove_params is not None
                                  else target_count(model, pc.target_params))
            plan.sparsity, count = sparsity_for_target(model, pc.structured(), plan.target_params, asked)
            say(progress, f"{asked}: removing {plan.sparsity:.4f} of the {pc.structure}, {count:,} parameters "
                          f"left (target {plan.target_params:,})")
        if plan.shape is None:
            plan_structure(model, pc.structured(plan.sparsity))  # shapes the family cannot express fail now
    if config.save_format == "gguf":  # an architecture or tokenizer the exporter does not know fails now
        from .output.export import check_gguf_export

        backend = getattr(tokenizer, "backend_tokenizer", None)
        check_gguf_export(model.config.to_dict(), json.loads(backend.to_str()) if backend else None,
                          config.gguf_outtype, width_pruned=bool({"heads", "hidden"} & set(pc.axes)))
    if config.output:
        check_free_space(config.output, sum(p.numel() * p.element_size() for p in model.parameters()))
    return model, tokenizer, source


def search_shape(model, tokenizer, config: RunConfig, plan: Plan, progress: bool) -> None:
    """Several structures: the search's best shape for --target-params goes into the plan (structured/search.py;
    with --search-topk, the best after a short distillation: structured/search_distill.py)."""
    from .inputs.data import load_text, tokenize
    from .pruning.structured.runner import target_count
    from .pruning.structured.search import search_shapes, search_windows
    from .runtime import parameter_count

    pc = config.prune
    plan.target_params = target_count(model, pc.target_params)
    tokens = tokenize(tokenizer, load_text(config.calib, "calib"))
    calibration, validation = search_windows(tokens, pc.nsamples, pc.seqlen, pc.seed, pc.search_windows)
    if pc.search_topk:
        from .pruning.structured.search_distill import distill_windows, search_recovery_config

        recovery = search_recovery_config(config.recovery, pc.search_steps, pc.seed)
        train = distill_windows(tokens[: tokens.numel() - pc.search_windows * pc.seqlen], recovery.steps,
                                recovery.batch, recovery.seqlen, pc.seed)
    found = search_shapes(model, calibration, validation, pc.search_base(), pc.axes, plan.target_params,
                          pc.search_limit, progress)
    if pc.search_topk:
        from .pruning.structured.search_distill import distill_candidates

        distill_candidates(model, calibration, validation, train, pc.search_base(), found, pc.search_topk, recovery,
                           progress)
    best = found[0]
    plan.shape, plan.shape_source = best.shape, "search"
    plan.layers_removed = getattr(best, "layers_removed", None)
    plan.sparsity = 1 - best.params / parameter_count(model.parameters())
    score = (f"KL {best.kl_distilled:.4g} after distillation ({best.kl:.4g} one-shot)"
             if best.kl_distilled is not None else f"KL {best.kl:.4g}")
    say(progress, f"--target-params {pc.target_params}: shape " + ", ".join(f"{axis} {value:.3g}" for axis, value
                                                                           in best.shape.items())
        + f", {best.params:,} parameters, {score} to the dense model")


def given_shape(model, config: RunConfig, plan: Plan, progress: bool) -> None:
    """--shape FILE: its shape (a search's best candidate, or one written by hand) goes into the plan, counted
    exactly now (a shape the family cannot express, or layers the model lacks, fail before any work)."""
    from .inputs.models import decoder_layers
    from .pruning.structured.search import ShapeCounter
    from .pruning.structured.shape_file import read_shape_file
    from .runtime import parameter_count

    pc = config.prune
    given = read_shape_file(pc.shape, pc.axes)
    params = ShapeCounter(model, pc.search_base()).params(given.shape)
    if given.layers_removed is not None:
        layers = len(decoder_layers(model)[1])
        count = round(layers * given.shape.get("layers", 0.0))
        if given.layers_removed[-1] >= layers or len(given.layers_removed) != count:
            raise LLMPruneError(f"--shape {pc.shape}: layers_removed {given.layers_removed} must be {count} distinct "
                                f"indices below {layers} (layers {given.shape.get('layers', 0.0):g} of {layers})")
    plan.shape, plan.shape_source, plan.layers_removed = given.shape, str(pc.shape), given.layers_removed
    plan.sparsity = 1 - params / parameter_count(model.parameters())
    say(progress, f"--shape {pc.shape}: " + ", ".join(f"{axis} {value:.3g}" for axis, value in given.shape.items())
        + f", {params:,} parameters")


def calibration_data(tokenizer, config: RunConfig, plan: Plan, progress: bool):
    """The calibration windows (this rank's share under torchrun), or None for a method that needs no data."""
    from .inputs.data import calibration_windows, load_text, tokenize

    if not plan.needs_calibration:
        return None
    say(progress, f"calibration text: {config.calib}")
    pc = config.prune
    windows = calibration_windows(tokenize(tokenizer, load_text(config.calib, "calib")), pc.nsamples, pc.seqlen,
                                  pc.seed)
    return plan.parallel.share(windows) if plan.parallel is not None else windows


@dataclass
class RecoveryInputs:
    """What recovery needs that must exist before pruning: its windows and the dense teacher's targets."""

    train: object
    val: object
    teacher: object
    config: object
    keep_adapter: bool = False


def recovery_data(model, tokenizer, config: RunConfig, plan: Plan, progress: bool) -> RecoveryInputs | None:
    """Recovery's windows from its text's training part (never the held-out part), checked against the budget,
    and for distillation the dense model's top-k targets on them, computed now, while the model is dense."""
    if not config.recover:
        return None
    from .inputs.data import load_text, tokenize
    from .recovery.train import check_recovery, recovery_windows

    rc = config.recovery
    check_recovery(model, rc, structured=config.prune.structure != "none")
    source = rc.data or config.calib
    train, val = recovery_windows(tokenize(tokenizer, load_text(source, "calib")), rc)
    teacher = None
    if rc.loss == "distill":
        from .recovery.distill import teacher_topk

        say(progress, f"distillation targets: the dense model's top {rc.distill_topk} on {len(train)} windows")
        hidden_layers = ()
        if rc.distill_hidden:
            from .inputs.models import decoder_layers
            from .recovery.distill import evenly_spaced_layers

            hidden_layers = evenly_spaced_layers(len(decoder_layers(model)[1]), rc.distill_hidden_layers)
        teacher = teacher_topk(model, train, rc.distill_topk, progress=progress, temperature=rc.distill_temperature,
                               spill_dir=rc.teacher_spill, hidden_layers=hidden_layers, logit_chunk=rc.loss_chunk)
    return RecoveryInputs(train, val, teacher, rc, config.keep_adapter)


def evaluate_dense(model, tokenizer, config: RunConfig, plan: Plan, dense: DenseScores | None, progress: bool):
    """The held-out windows, and the dense model's perplexity and zero-shot scores (unless given)."""
    windows = evaluation_windows(tokenizer, config, plan)
    if not plan.writer:
        return None, DenseScores(None, None)
    if dense is None:
        dense = DenseScores(measure_perplexity(model, windows, config, plan, progress, "dense"),
                            _zero_shot(model, tokenizer, plan, config, progress, "dense"))
    return windows, dense


def evaluation_windows(tokenizer, config: RunConfig, plan: Plan):
    """The held-out windows perplexity is measured on (None with --eval none, and on torchrun ranks but 0)."""
    from .inputs.data import eval_windows, load_text, tokenize

    if config.eval == "none" or not plan.writer:
        return None
    return eval_windows(tokenize(tokenizer, load_text(config.eval, "eval")), config.prune.seqlen, config.eval_windows)


def prune_model(model, calibration, config: RunConfig, plan: Plan, sparsity: float, progress: bool, previous=None):
    """One prune to `sparsity` (a --schedule stage, or the run's own), checkpointed per layer when asked.
    `previous`: the earlier stage's result (a structured schedule counts what is left from it)."""
    from dataclasses import replace

    from .pruning.runner import prune
    from .pruning.structured.runner import chain_records, prune_structured, stage_sparsity

    if config.prune.structure == "experts":  # whole routed experts: pruning/expert_removal.py
        from .pruning.expert_removal import expert_removal_report

        if previous is not None:
            raise LLMPruneError("--schedule with --structure experts: remove the experts in one step")
        return expert_removal_report(model, calibration, replace(config.prune, sparsity=sparsity), progress)
    structured = config.prune.structure != "none"
    if plan.shape is not None:  # pruned axis by axis to the searched shape, or the --shape file's
        from .pruning.structured.search import combined_report, prune_shape

        base = replace(config.prune.search_base(), device=str(plan.device))
        report = combined_report(prune_shape(model, calibration, base, plan.shape, progress,
                                             layers_removed=plan.layers_removed), plan.target_params)
        report.structure.shape, report.structure.shape_source = dict(plan.shape), plan.shape_source
        return report
    if structured:  # a stage removes what brings the structure to `sparsity` of the dense model's count
        stage = sparsity if previous is None else stage_sparsity(previous.structure, sparsity)
        pc = replace(config.prune.structured(stage), target_params=None)  # the plan's sparsity meets it
    else:
        pc = replace(config.prune, sparsity=sparsity)
    pc = replace(pc, device=str(plan.device))  # this rank's device under torchrun; the config stays as given
    before = _zeros(model) if config.schedule and not structured else None
    options = {"parallel": plan.parallel, "offload_activations": config.offload_activations}
    if not structured:
        options["checked"] = True  # load() ran check_model
    if plan.work_dir is not None:
        from .scale.checkpoint import prune_resumable

        pruned = prune_resumable(model, calibration, pc, plan.work_dir, config.model, resume=config.resume,
                                 progress=progress, **options)
    else:
        pruned = (prune_structured if structured else prune)(model, calibration, pc, progress, **options)
    if structured:
        pruned.sparsity = sparsity  # the target of the structure (the stage's own is in its record)
        pruned.structure.target_params = plan.target_params
        if previous is not None:
            pruned.structure = chain_records(previous.structure, pruned.structure, sparsity)
            pruned.seconds = pruned.structure.seconds
    if before is not None:
        revived = [name for name, zeros in before.items() if bool((model.get_submodule(name).weight[zeros] != 0).any())]
        if revived:
            raise LLMPruneError(f"--schedule: {config.prune.method} gave earlier zeros of {revived[0]} values again; "
                                "use a method that keeps them (magnitude, wanda, ria)")
    return pruned


def recover(model, pruned, inputs: RecoveryInputs, stage: int, stages: int, progress: bool) -> dict:
    """Train the pruned model (its zeros kept) on this stage's share of the recovery windows."""
    import tempfile
    from dataclasses import replace

    from .recovery.train import train_recovery

    rc = inputs.config
    steps = rc.steps // stages + (1 if stage < rc.steps % stages else 0)
    first = sum(rc.steps // stages + (1 if s < rc.steps % stages else 0) for s in range(stage)) * rc.batch
    train = inputs.train[first : first + steps * rc.batch]
    teacher = inputs.teacher.subset(first, first + steps * rc.batch) if inputs.teacher is not None else None
    # A structurally smaller model has no mask ({}: every weight trains); a sparse one keeps its zeros.
    masks = {layer["name"]: model.get_submodule(layer["name"]).weight != 0 for layer in pruned.layers}
    keep_adapter = inputs.keep_adapter and stage == stages - 1
    adapter_dir = Path(tempfile.mkdtemp(prefix="llmprune-adapter-")) if keep_adapter else None
    stats = train_recovery(model, train, inputs.val, replace(rc, steps=steps), teacher, masks, progress=progress,
                           adapter_dir=adapter_dir,
                           kept_layers=pruned.structure.kept_layers() if pruned.structure else None)
    from .inputs.models import weight_matrix

    if masks:
        weights = [weight_matrix(model.get_submodule(name)) for name in masks]
        stats["achieved_sparsity"] = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    if adapter_dir is not None:
        stats["adapter"] = "adapter"  # its folder in the output
        stats["_adapter_dir"] = str(adapter_dir)  # where it waits until save_output moves it (not reported)
    return stats


def _join_stages(records: list[dict], stages: list[float]) -> dict:
    """One stage: its record. A schedule: the last stage's record, with every stage's beside it."""
    if len(records) == 1:
        return records[0]
    joined = dict(records[-1])
    joined["schedule"] = [{"sparsity": s, **{k: v for k, v in r.items() if not k.startswith("_")}}
                          for s, r in zip(stages, records)]
    joined["steps"] = sum(r.get("steps", 0) for r in records)
    joined["tokens"] = sum(r.get("tokens", 0) for r in records)
    return joined


def _zeros(model) -> dict:
    from .inputs.models import decoder_layers, linears

    prefix, layers = decoder_layers(model)
    return {f"{prefix}.{i}.{name}": module.weight == 0 for i, layer in enumerate(layers)
            for name, module in linears(layer).items() if bool((module.weight == 0).any())}


def assemble_report(architecture, source, config, plan, pruned, dense, windows, ppl_pruned, ppl_recovered,
                    zero_shot, recovery, seconds, command) -> Report:
    import torch
    import transformers

    from .inputs.data import source_description
    from .runtime import current_rss_bytes, peak_rss_bytes

    pc = config.prune
    summary = pruned.to_dict()
    perplexity = None
    if windows is not None:
        perplexity = Perplexity(config.eval, pc.seqlen, len(windows), dense.perplexity, ppl_pruned, ppl_recovered,
                                source_description(config.eval))
    return Report.from_dict({
        "llmprune_version": __version__,
        "model": config.model,
        "model_name": display_name(source),
        "base_model": source.base_model,
        "license": source.license,
        "architecture": architecture,
        "method": pruned.method,
        "update": pc.update,
        "sparsity": plan.sparsity,
        "pattern": pruned.pattern,
        "allocation": pc.allocation,
        "calibration": Calibration(config.calib, pc.nsamples, pc.seqlen, pc.seed,
                                   source_description(config.calib)).__dict__
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
        "structure": getattr(pruned, "structure", None),
        "moe": summary.get("moe"), "coverage": summary.get("coverage"),
        "scale": {"stream": plan.stream, "reason": plan.stream_reason,
                  "ranks": plan.parallel.world if plan.parallel is not None else 1,
                  "checkpointed": plan.work_dir is not None, "resumed": config.resume},
    })


def save_output(model, tokenizer, config: RunConfig, report: Report, recovery: dict | None = None) -> None:
    """Model (safetensors), tokenizer, config, report and card, all or nothing."""
    import shutil

    from .output.atomic import atomic_directory

    adapter_dir = (recovery or {}).get("_adapter_dir")
    try:
        with atomic_directory(config.output, config.overwrite) as staging:
            if adapter_dir:
                shutil.copytree(adapter_dir, staging / "adapter")  # the unmerged LoRA adapter (peft format)
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            if config.save_format == "gguf":
                from .output.export import export_gguf

                name = f"{Path(config.output).name}-{config.gguf_outtype}.gguf"
                export_gguf(staging, staging / name, config.gguf_outtype)
                report.gguf = {"file": name, "outtype": config.gguf_outtype, "bytes": (staging / name).stat().st_size}
            write_run_files(staging, config, report)
    finally:
        if adapter_dir:
            shutil.rmtree(adapter_dir, ignore_errors=True)
    if config.checkpoint or config.resume:  # the output is complete: its checkpoints are no longer needed
        from .scale.checkpoint import default_work_dir

        shutil.rmtree(config.work_dir or default_work_dir(config.output), ignore_errors=True)


def write_run_files(staging: Path, config: RunConfig, report: Report) -> None:
    """Beside the model in the folder being written: the run's config (to rerun it), its report and model card."""
    from .output.publish import write_model_card

    config.save(staging / "llmprune_config.json")
    report.save(staging / "report.json")
    write_model_card(staging, report)


def push_output(config: RunConfig, report: Report, progress: bool) -> None:
    if config.push_to_hub:
        from .output.publish import push

        say(progress, f"pushing {config.output} to {config.push_to_hub}")
        report.pushed_to = push(config.output, config.push_to_hub, private=config.private)


# ------------------------------------------------------------------ helpers


def measure_perplexity(model, windows, config: RunConfig, plan: Plan, progress: bool, which: str) -> float | None:
    """Perplexity on the held-out windows of `model`: in memory, or a folder of safetensors read layer by layer
    (a streamed run's model, which is never whole in memory). None without windows."""
    import math

    if windows is None:
        return None
    if isinstance(model, (str, Path)):
        from .scale.streaming import streamed_perplexity

        value = streamed_perplexity(model, windows, plan.device, plan.dtype, config.prune.batch_size,
                                    config.offload_activations, progress, config.trust_remote_code)
    else:
        from .evaluation.perplexity import perplexity

        value = perplexity(model, windows, plan.device, progress, desc=f"perplexity ({which})")
    if not math.isfinite(value):
        raise LLMPruneError(f"the {which} model's perplexity is {value}: its outputs overflow or are NaN "
                            f"(try --dtype float32, or a lower --sparsity)")
    return value


def _zero_shot(model, tokenizer, plan: Plan, config: RunConfig, progress: bool, which: str) -> dict | None:
    if not plan.tasks:
        return None
    from .evaluation.zeroshot import evaluate_zero_shot

    say(progress, f"zero-shot ({which}): {', '.join(plan.tasks)}")
    return evaluate_zero_shot(model, tokenizer, plan.tasks, limit=config.limit, num_fewshot=config.num_fewshot,
                              batch_size=config.eval_batch_size, seed=config.prune.seed)


def say(progress: bool, message: str) -> None:
    """One line of what the run is doing, on stderr (nothing with --quiet)."""
    if progress:
        print(f"llmprune: {message}", file=sys.stderr, flush=True)

