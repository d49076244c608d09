"""The `code` text source: the running interpreter's standard library, split by file into calibration and
held-out parts."""

import ast
import platform
import sysconfig
from pathlib import Path

import pytest

from llmprune.errors import LLMPruneError
from llmprune.inputs import data
from llmprune.inputs.data import check_source, load_text, python_stdlib_files, source_description
from llmprune.resources import source_names

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def test_listed_among_sources():
    assert "code" in source_names()


def test_split_by_file_covers_the_stdlib_top_level():
    parts = python_stdlib_files("code")
    calib, held_out = parts["calib"], parts["eval"]
    assert not set(calib) & set(held_out)  # no file in both parts
    everything = sorted(STDLIB.glob("*.py"))
    assert sorted(calib + held_out) == everything
    assert calib == sorted(calib) and held_out == sorted(held_out)
    assert len(held_out) == len(everything) // 4  # 25%, to the file
    assert all(path.parent == STDLIB for path in everything)  # top level only: no test suites, no site-packages
    # Spread through the alphabet, not one end of it: both parts hold early and late files.
    middle = everything[len(everything) // 2]
    assert min(held_out) < middle < max(held_out) and min(calib) < middle < max(calib)
    assert python_stdlib_files("code") == parts  # deterministic


def test_texts_are_the_real_files():
    calib, held_out = load_text("code", "calib"), load_text("code", "eval")
    parts = python_stdlib_files("code")
    for part, text in (("calib", calib), ("eval", held_out)):
        for path in parts[part]:
            source = path.read_text(encoding="utf-8")
            assert source in text, path
        assert len(text) == sum(len(p.read_text(encoding="utf-8")) for p in parts[part]) + 2 * (len(parts[part]) - 1)
    # A held-out file is nowhere in the calibration text, and the text is Python that parses.
    assert (STDLIB / "os.py").read_text(encoding="utf-8") in calib + held_out
    assert all(p.read_text(encoding="utf-8") not in calib for p in parts["eval"][:5])
    ast.parse(held_out)


def test_description_names_the_running_python():
    description = source_description("code")
    assert f"Python {platform.python_version()} standard library" in description
    assert str(STDLIB) in description
    assert source_description("wiki").startswith("English Wikipedia")
    assert source_description("file:/tmp/x.txt") == "/tmp/x.txt"


def test_missing_stdlib_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setattr(data.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    with pytest.raises(LLMPruneError, match="holds no \\*.py files"):
        check_source("code")


def test_run_calibrates_evaluates_and_recovers_on_code(tiny_dir):
    """--calib code, --eval code and --recover-data code through a whole (tiny) run; the report says which
    Python's library the figures were measured on."""
    from llmprune import pipeline
    from llmprune.config import PruneConfig, RecoverConfig, RunConfig

    report = pipeline.run(RunConfig(model=str(tiny_dir), prune=PruneConfig(method="wanda", nsamples=2, seqlen=16),
                                    calib="code", eval="code", eval_windows=2, recover="lora",
                                    recovery=RecoverConfig(data="code", steps=2, batch=1, seqlen=16)), progress=False)
    assert report.calibration.source == report.perplexity.dataset == "code"
    assert report.calibration.description == report.perplexity.description == source_description("code")
    assert None not in (report.perplexity.dense, report.perplexity.pruned, report.perplexity.recovered)
