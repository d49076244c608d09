"""`llmprune eval`: perplexity and zero-shot accuracy of any model, beside a baseline, in one table."""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass
from pathlib import Path

from ..inputs.data import check_source, eval_windows, load_text, tokenize
from ..config import PruneConfig, RunConfig
from ..errors import LLMPruneError
from ..options import option, same_as, settle
from ..inputs.models import load_model, resolve_model
from .perplexity import perplexity
from ..output.atomic import write_json_atomically
from ..runtime import resolve_device, resolve_dtype
from .zeroshot import evaluate_zero_shot, resolve_tasks


@dataclass(frozen=True)
class EvalConfig:
    """The `eval` command's settings; those a prune run also takes are RunConfig's and PruneConfig's fields."""

    model: str = option(MISSING, "the model to evaluate (an llmprune output, an alias, a Hub id, a .gguf)")
    baseline: str | None = option(None, "a model to compare with, e.g. the dense one (llama)")
    ppl: tuple[str, ...] | str = option(("wiki",), "comma list of perplexity sources (wiki, code, wikitext2, "
                                        "c4, file:PATH), or none", metavar="SOURCES")
    tasks: str | None = same_as(RunConfig, "tasks")
    limit: int | None = same_as(RunConfig, "limit")
    num_fewshot: int = same_as(RunConfig, "num_fewshot")
    eval_batch_size: int = same_as(RunConfig, "eval_batch_size")
    seed: int = same_as(PruneConfig, "seed", group="evaluation")
    seqlen: int = same_as(PruneConfig, "seqlen", group="evaluation")
    eval_windows: int = same_as(RunConfig, "eval_windows")
    device: str | None = same_as(PruneConfig, "device", help="where the models run: cpu, cuda, cuda:1 (default: "
                                 "cuda if available, else cpu)")
    dtype: str = same_as(RunConfig, "dtype")
    results: str | None = option(None, "where to write the results (default: MODEL/eval.json for a directory, "
                                 "else ./eval.json)")
    offline: bool = same_as(RunConfig, "offline")

    def __post_init__(self):
        ppl = self.ppl.split(",") if isinstance(self.ppl, str) else self.ppl
        settle(self, "ppl", tuple(s for s in ppl if s and s != "none"))
        if self.limit is not None and self.limit < 1:
            raise LLMPruneError(f"--limit must be at least 1 document per task (got {self.limit})")
        if self.seqlen < 1 or self.eval_windows < 0:
            raise LLMPruneError("--seqlen must be at least 1 and --eval-windows 0 (all) or more")
        if not self.ppl and not self.tasks:
            raise LLMPruneError("nothing to evaluate: give --ppl SOURCES and/or --tasks TASKS")


def results_path(config: EvalConfig) -> Path:
    """eval.json in the model's directory, or --results; a Hub id or alias needs --results."""
    if config.results:
        return Path(config.results)
    if Path(config.model).is_dir():
        return Path(config.model) / "eval.json"
    return Path("eval.json")


def evaluate(config: EvalConfig, progress: bool = True) -> dict:
    for spec in filter(None, (config.model, config.baseline)):
        source = resolve_model(spec)
        if not source.is_hub and not source.gguf_file and not any(Path(source.path).glob("*.safetensors")) \
                and not any(Path(source.path).glob("*.bin")):
            raise LLMPruneError(f"{spec} has no weights (*.safetensors or *.bin): not a saved model directory")
    for text in config.ppl:
        check_source(text)
    tasks = resolve_tasks(config.tasks) if config.tasks else []
    device = resolve_device(config.device)
    result = {"model": config.model, "baseline": config.baseline, "perplexity": {}, "zero_shot": {}}
    for role, spec in (("model", config.model), ("baseline", config.baseline)):
        if spec is None:
            continue
        model, tokenizer, _ = load_model(spec, resolve_dtype(config.dtype, device))
        for text in config.ppl:
            windows = eval_windows(tokenize(tokenizer, load_text(text, "eval")), config.seqlen, config.eval_windows)
            entry = result["perplexity"].setdefault(text, {"seqlen": config.seqlen, "windows": len(windows)})
            entry[role] = perplexity(model.to(device), windows, device, progress, desc=f"perplexity {text} ({role})")
        if tasks:
            result["zero_shot"][role] = evaluate_zero_shot(model.to(device), tokenizer, tasks, limit=config.limit,
                                                           num_fewshot=config.num_fewshot,
                                                           batch_size=config.eval_batch_size, seed=config.seed)
        del model
    write_json_atomically(results_path(config), result)
    return result


def comparison_table(result: dict) -> str:
    """metric | baseline | model | delta, with lm-eval's standard errors where it gives them."""
    rows = [("metric", "baseline", "model", "delta")]
    for text, entry in result["perplexity"].items():
        rows.append((f"ppl {text} ({entry['windows']} x {entry['seqlen']})", _fmt(entry.get("baseline")),
                     _fmt(entry.get("model")), _delta(entry.get("model"), entry.get("baseline"))))
    model_scores = result["zero_shot"].get("model") or {"tasks": {}}
    base_scores = result["zero_shot"].get("baseline") or {"tasks": {}}
    for task, metrics in model_scores["tasks"].items():
        for metric in ("acc", "acc_norm"):
            if metrics.get(metric) is None:
                continue
            base = base_scores["tasks"].get(task, {})
            rows.append((f"{task} {metric}", _fmt(base.get(metric), base.get(f"{metric}_stderr")),
                         _fmt(metrics[metric], metrics.get(f"{metric}_stderr")),
                         _delta(metrics[metric], base.get(metric))))
    if model_scores.get("mean_acc") is not None:
        rows.append(("mean acc", _fmt(base_scores.get("mean_acc")), _fmt(model_scores["mean_acc"]),
                     _delta(model_scores["mean_acc"], base_scores.get("mean_acc"))))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in rows)


def _fmt(value, stderr=None) -> str:
    if value is None:
        return "-"
    text = f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return f"{text} ± {stderr:.4f}" if stderr is not None and math.isfinite(stderr) else text


def _delta(value, base) -> str:
    return "-" if value is None or base is None else f"{value - base:+.4f}"
