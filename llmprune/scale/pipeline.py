"""The run of pipeline.py for a model streamed from disk: the same phases, none holding the whole model.

    preflight -> load (tokenizer, architecture) -> calibration -> dense perplexity (layer by layer) -> streamed
    prune into the staging folder -> its perplexity (layer by layer) -> report, config and card -> push

The phases are pipeline.py's wherever they need no whole model: calibration_data, evaluation_windows,
measure_perplexity (which reads a folder layer by layer), assemble_report, write_run_files, push_output.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import replace

from ..config import RunConfig
from ..pipeline import (DenseScores, Plan, Stopwatch, assemble_report, calibration_data, evaluation_windows,
                        measure_perplexity, push_output, say, write_run_files)


def run_streamed(config: RunConfig, plan: Plan, progress: bool, command: str | None):
    """The whole run of a streamed model; returns the report (None on torchrun ranks other than 0)."""
    from .streaming import streamed_prune

    clock = Stopwatch()
    say(progress, f"streaming {config.model} layer by layer ({plan.stream_reason})")
    with clock("load"):
        tokenizer, architecture = load_streamed(config, plan)
    with clock("calibrate"):
        calibration = calibration_data(tokenizer, config, plan, progress)
    with clock("evaluate"):
        windows = evaluation_windows(tokenizer, config, plan)
        dense = DenseScores(measure_perplexity(plan.source.path, windows, config, plan, progress, "dense"), None)
    prune_config = config.prune.structured(plan.sparsity) if config.prune.structure != "none" else config.prune
    prune_config = replace(prune_config, device=str(plan.device))  # this rank's device under torchrun
    with ExitStack() as output:
        with clock("prune"):
            pruned, staging = output.enter_context(streamed_prune(
                plan.source.path, config.output, calibration, prune_config, dtype=plan.dtype, work_dir=plan.work_dir,
                resume=config.resume, offload_activations=config.offload_activations, overwrite=config.overwrite,
                parallel=plan.parallel, progress=progress, trust_remote_code=config.trust_remote_code))
        if staging is None:
            return None  # a torchrun rank other than 0: rank 0 evaluates and writes
        with clock("evaluate"):
            ppl_pruned = measure_perplexity(staging, windows, config, plan, progress, "pruned")
        clock.seconds["total"] = time.perf_counter() - clock.started
        report = assemble_report(architecture, plan.source, config, plan, pruned, dense, windows, ppl_pruned, None,
                                 None, None, clock.seconds, command)
        write_run_files(staging, config, report)
    push_output(config, report, progress)
    return report


def load_streamed(config: RunConfig, plan: Plan):
    """What a streamed run loads whole: the tokenizer, and the architecture's name (the weights come layer by
    layer, in the prune)."""
    from transformers import AutoConfig, AutoTokenizer

    path = plan.source.path
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    architecture = (AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code).architectures
                    or ["?"])[0]
    return tokenizer, architecture
