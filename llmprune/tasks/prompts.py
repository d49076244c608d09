"""The Python parts of lm-eval's prompts for hellaswag and winogrande, so the offline tasks render the same text.

They reproduce lm_eval/tasks/hellaswag/utils.py and lm_eval/tasks/winogrande/preprocess_winogrande.py
(tests/test_zeroshot.py checks the rendered documents against lm-eval's own functions).
"""

from __future__ import annotations

import re

import datasets


def _clean_hellaswag(text: str) -> str:
    # WikiHow contexts carry markup: "[title]" ends a heading, other bracketed tags are dropped.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """Adds `query` (activity label and context), the cleaned `choices` and the integer `gold`."""

    def render(doc: dict) -> dict:
        context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _clean_hellaswag(doc["activity_label"] + ": " + context),
            "choices": [_clean_hellaswag(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(render)


# Winogrande is scored with partial evaluation: each option fills the blank to make one context, and
# the shared continuation after the blank is scored under each. lm-eval takes an integer doc_to_text
# as the index of the gold context.
def winogrande_gold(doc: dict) -> int:
    return int(doc["answer"]) - 1  # answer is "1" or "2"


def winogrande_continuation(doc: dict) -> str:
    sentence = doc["sentence"]
    return sentence[sentence.index("_") + 1 :].strip()


def winogrande_contexts(doc: dict) -> list[str]:
    sentence = doc["sentence"]
    before_blank = sentence[: sentence.index("_")]
    return [before_blank + doc["option1"], before_blank + doc["option2"]]
