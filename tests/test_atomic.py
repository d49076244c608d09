"""The one atomic file writer and the one parameter counter every module uses."""

import json
import os

import pytest
import torch

from llmprune.output.atomic import write_atomically, write_json_atomically, write_text_atomically
from llmprune.runtime import parameter_count


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old\n")

    def half_then_fail(partial):
        partial.write_text("half of a new fi")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, half_then_fail)
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_complete_write_replaces_with_ordinary_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        written = write_json_atomically(tmp_path / "new" / "eval.json", {"ppl": 12.5})
    finally:
        os.umask(previous)
    assert written == tmp_path / "new" / "eval.json"
    assert written.read_text() == '{\n  "ppl": 12.5\n}\n' and json.loads(written.read_text()) == {"ppl": 12.5}
    assert written.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    write_text_atomically(written, "replaced")
    assert written.read_text() == "replaced" and [p.name for p in written.parent.iterdir()] == ["eval.json"]


def test_parameter_count_counts_a_tied_tensor_once():
    embedding = torch.nn.Parameter(torch.zeros(10, 4))
    other = torch.nn.Parameter(torch.zeros(3))
    assert parameter_count([embedding, other, embedding]) == 43
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied: one 10 x 4 tensor
    assert parameter_count(model.parameters()) == 40
    assert parameter_count(iter([model[0].weight, model[1].weight])) == 40
