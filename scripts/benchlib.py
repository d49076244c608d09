"""What every benchmark in scripts/ does the same way: pick rows with --rows, describe the machine, cut the
calibration and held-out windows, score the zero-shot suite, and name the model.

Scripts run as ``python scripts/bench_x.py`` from the repository root with llmprune installed (``pip install -e
.``); this module sits beside them, so Python finds it as it finds the script. It imports only the standard
library at load time: bench_deploy.py's worker runs in a venv that has neither torch nor llmprune. Files are
written with llmprune's own atomic writers (llmprune.output.atomic); tiny models come from llmprune.testing.
"""

from __future__ import annotations

import os
from pathlib import Path
import platform
import re
from typing import Callable, TypeVar

Row = TypeVar("Row")

TEXT, SEED = "wiki", 0  # the benchmarks' text (calibration and held-out parts) and seed


def select_rows(rows: list[Row], pattern: str | None, name: Callable[[Row], str] = str) -> list[Row]:
    """The rows whose ``name`` matches the --rows regular expression ``pattern`` (all when None); a bad or
    matchless pattern exits with one line naming the fix."""
    if pattern is None:
        return rows
    try:
        selected = [row for row in rows if re.search(pattern, name(row))]
    except re.error as err:
        raise SystemExit(f"--rows {pattern!r} is not a regular expression: {err}") from None
    if not selected:
        raise SystemExit(f"--rows {pattern!r} matches none of: {', '.join(map(name, rows))}")
    return selected


def refuse_other_settings(script: str, path: Path, then: dict, now: dict) -> None:
    """--keep-rows: stop, naming what differs, when the results already in `path` were measured with other settings
    (their figures would not compare with this run's)."""
    if then != now:
        changed = ", ".join(f"{key}: {then.get(key)} then, {now.get(key)} now"
                            for key in sorted(then.keys() | now.keys()) if then.get(key) != now.get(key))
        raise SystemExit(f"{script}: error: --keep-rows: {path} was measured with other settings ({changed}); rerun "
                         "with the same settings, or give --out another folder")


def machine_info(device=None) -> dict:
    """Versions, CPUs and threads, and how busy the machine was (other processes distort timings)."""
    import torch
    import transformers

    import llmprune

    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "llmprune": llmprune.__version__,
            "load_average_at_start": load_average()}


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:  # not available here
        return None


def model_name(spec: str) -> str:
    """The name people know the model by (SmolLM2-135M-Instruct for the alias llama, a folder's name)."""
    from llmprune.inputs.models import resolve_model
    from llmprune.report import display_name

    return display_name(resolve_model(spec))


_TOKENS: dict = {}


def text_tokens(tokenizer, part: str, source: str = TEXT):
    """The tokens of a text's part, kept for the process per tokenizer."""
    from llmprune.inputs.data import load_text, tokenize

    key = (id(tokenizer), source, part)
    if key not in _TOKENS:  # the tokenizer is kept with its tokens, so its id cannot pass to another one
        _TOKENS[key] = tokenizer, tokenize(tokenizer, load_text(source, part))
    return _TOKENS[key][1]


def calibration(tokenizer, nsamples: int, seqlen: int, source: str = TEXT, seed: int = SEED):
    """``nsamples`` random windows of ``seqlen`` from the text's calibration part."""
    from llmprune.inputs.data import calibration_windows

    return calibration_windows(text_tokens(tokenizer, "calib", source), nsamples, seqlen, seed)


def held_out(tokenizer, seqlen: int, count: int, source: str = TEXT):
    """``count`` non-overlapping windows of ``seqlen`` from the text's held-out part (0: all of them)."""
    from llmprune.inputs.data import eval_windows

    return eval_windows(text_tokens(tokenizer, "eval", source), seqlen, count)


def validation_windows(tokens, calibration_starts: list[int], count: int, seqlen: int):
    """`count` windows from the end of a calibration part's `tokens`, skipping any that overlaps a calibration window
    (one starting at each of `calibration_starts`): a split to choose settings on that is neither calibration nor
    the held-out part results are reported on."""
    import torch

    windows, end = [], tokens.numel()
    while len(windows) < count and end >= seqlen:
        start = end - seqlen
        if all(start + seqlen <= s or s + seqlen <= start for s in calibration_starts):
            windows.append(tokens[start:end])
        end = start
    return torch.stack(windows)


def zero_shot(model, tokenizer, tasks: str | None, limit: int, seed: int = SEED) -> dict | None:
    """llmprune's zero-shot evaluation (0-shot, the first ``limit`` documents of each task) of a comma list of
    tasks or suites; its ``mean_acc`` is the mean accuracy over the tasks. None without tasks."""
    if not tasks:
        return None
    from llmprune.evaluation.zeroshot import evaluate_zero_shot, resolve_tasks

    return evaluate_zero_shot(model, tokenizer, resolve_tasks(tasks), limit=limit, num_fewshot=0, batch_size=16,
                              seed=seed)


def zero_shot_mean(model, tokenizer, tasks: str | None, limit: int) -> float | None:
    result = zero_shot(model, tokenizer, tasks, limit)
    return None if result is None else result["mean_acc"]


def decoder_fraction_target(model, fraction: float) -> str:
    """--target-params (a count of the whole model) that removes ``fraction`` of the decoder layers' parameters
    and none of the embeddings: how the issues size a structured prune of a model whose embeddings are a large
    share of it (Qwen2.5-Coder-0.5B's untied 151,936-word embedding and head are 43% of it)."""
    from llmprune.inputs.models import decoder_layers
    from llmprune.runtime import parameter_count

    decoder = parameter_count(decoder_layers(model)[1].parameters())
    return str(round(parameter_count(model.parameters()) - fraction * decoder))


RESULTS = Path(__file__).resolve().parent.parent / "results"  # the checkout's, wherever a script is run from


def results_folder(model: str, text: str = "wiki", name: str = "") -> Path:
    """Where a benchmark writes by default: results/NAME for the embedded model (`llama`) on `wiki` text; another
    model's figures under results/MODEL/ (an alias, or a path's last part), another text's in a folder below."""
    parts = [] if model == "llama" else [Path(model.rstrip("/")).name.removesuffix(".gguf")]
    return RESULTS.joinpath(*parts, *([] if text == "wiki" else [text]), name)
