"""The run of pipeline.py for a model streamed from disk: the same phases, none holding the whole model.

preflight -> tokenizer -> calibration -> dense perplexity (layer by layer) -> streamed prune, whose output is
evaluated (layer by layer) and completed with its report and card in the staging folder -> push.
"""

from __future__ import annotations

import time
from dataclasses import replace

from ..config import RunConfig


def run_streamed(config: RunConfig, plan, progress: bool, command: str | None):
    from transformers import AutoConfig, AutoTokenizer

    from ..pipeline import DenseScores, Stopwatch, _say, assemble_report, push_output
    from .streaming import prune_streamed, streamed_perplexity

    clock = Stopwatch()
    source, pc = plan.source, config.prune
    _say(progress, f"streaming {config.model} layer by layer ({plan.stream_reason})")
    with clock("load"):
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=config.trust_remote_code)
        architecture = (AutoConfig.from_pretrained(source.path).architectures or ["?"])[0]
    from ..pipeline import calibration_data

    with clock("calibrate"):
        calibration = calibration_data(tokenizer, config, plan, progress)
    windows = None
    with clock("evaluate"):
        if config.eval != "none" and plan.writer:
            from ..inputs.data import eval_windows, load_text, tokenize

            windows = eval_windows(tokenize(tokenizer, load_text(config.eval, "eval")), pc.seqlen,
                                   config.eval_windows)
        dense = DenseScores(_streamed_ppl(source.path, windows, plan, config, progress, "dense"), None)
    result = {}

    def finish(staging, pruned):
        """In the staging folder, before it becomes the output: evaluate, then write report, config and card."""
        from ..output.publish import write_model_card

        with clock("evaluate"):
            ppl_pruned = _streamed_ppl(staging, windows, plan, config, progress, "pruned")
        clock.seconds["total"] = time.perf_counter() - clock.started
        report = assemble_report(architecture, source, config, plan, pruned, dense, windows, ppl_pruned, None, None,
                                 None, clock.seconds, command)
        config.save(staging / "llmprune_config.json")
        report.save(staging / "report.json")
        write_model_card(staging, report)
        result["report"] = report

    with clock("prune"):
        on_device = replace(pc, device=str(plan.device))  # this rank's device under torchrun (the plan's)
        prune_streamed(source.path, config.output, calibration, on_device, dtype=plan.dtype, work_dir=plan.work_dir,
                       resume=config.resume, offload_activations=config.offload_activations,
                       overwrite=config.overwrite, parallel=plan.parallel, progress=progress,
                       trust_remote_code=config.trust_remote_code, finish=finish)
    report = result.get("report")
    if report is not None:
        push_output(config, report, progress)
    return report


def _streamed_ppl(model_dir, windows, plan, config: RunConfig, progress: bool, which: str):
    import math

    from ..errors import LLMPruneError
    from .streaming import streamed_perplexity

    if windows is None:
        return None
    value = streamed_perplexity(model_dir, windows, plan.device, plan.dtype, config.prune.batch_size,
                                config.offload_activations, progress)
    if not math.isfinite(value):
        raise LLMPruneError(f"the {which} model's perplexity is {value}: its outputs overflow or are NaN")
    return value
