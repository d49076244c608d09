"""Text for calibration and perplexity: named sources defined in llmprune/calib/*.yaml, or a user's file:PATH.

Every source has two parts that never overlap: `calib` (calibration, and LoRA recovery's training text)
and `eval` (held-out perplexity). A user's file is used whole for whichever part it is given to.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import io
import json
import platform
import re
import sysconfig
from functools import lru_cache
from pathlib import Path

import torch
import yaml

from ..errors import LLMPruneError
from .models import hub_reachable
from ..resources import bundled_dir, source_names

PARTS = ("calib", "eval")


def source_definition(name: str) -> dict:
    definition = bundled_dir("llmprune.calib") / f"{name}.yaml"
    if not definition.is_file():
        raise LLMPruneError(
            f"unknown text source '{name}': choose one of {', '.join(source_names())}, or file:PATH (.txt or .jsonl)"
        )
    return yaml.safe_load(definition.read_text())


def source_description(source: str) -> str:
    """What a source is, for reports: the YAML's description with the running Python's version and standard
    library folder filled in (the `code` source depends on them), or the user's file path."""
    if source.startswith("file:"):
        return str(Path(source.removeprefix("file:")).expanduser())
    return source_definition(source)["description"].format(python_version=platform.python_version(),
                                                           stdlib=sysconfig.get_paths()["stdlib"])


def check_source(source: str, part: str = "calib", min_tokens: int = 1, flags: str = "--seqlen") -> None:
    """Fail before the model loads on a source that cannot serve: a missing, unreadable, non-UTF-8, empty or
    too short file, a .jsonl with a bad line, an unknown name, a Hub dataset while the Hub is out of reach.
    `min_tokens` is checked against the file's bytes: no tokenizer makes more tokens than bytes."""
    if source.startswith("file:"):
        path = Path(source.removeprefix("file:")).expanduser()
        text = _read_user_file(path)
        size = len(text.encode("utf-8"))
        if size < min_tokens:
            raise LLMPruneError(f"{path} holds {size} bytes, fewer than the {min_tokens} tokens asked of it: "
                                f"use a longer text, or lower {flags}")
    elif source_definition(source)["kind"] == "hub_dataset" and not hub_reachable():
        raise LLMPruneError(_offline_message(source_definition(source)))
    elif source_definition(source)["kind"] == "python_stdlib":
        python_stdlib_files(source)


def _offline_message(definition: dict) -> str:
    offline = ", ".join(s for s in source_names() if source_definition(s)["kind"] != "hub_dataset")
    return (f"cannot reach the Hugging Face Hub to download '{definition['name']}' ({definition['path']}). "
            f"Offline, use {offline} or file:PATH")


def load_text(source: str, part: str) -> str:
    """The text of one part of a source, as one string."""
    assert part in PARTS
    if source.startswith("file:"):
        return _read_user_file(Path(source.removeprefix("file:")).expanduser())
    definition = source_definition(source)
    if definition["kind"] == "wikipedia_dump":
        calib, held_out = _wikipedia_parts(source)
        return calib if part == "calib" else held_out
    if definition["kind"] == "python_stdlib":
        files = python_stdlib_files(source)[part]
        return definition["join"].join(_python_source(path) for path in files)
    return _hub_dataset_text(definition, part)


def _read_user_file(path: Path) -> str:
    """A user's .txt (UTF-8), or .jsonl with one {"text": ...} object per line; every failure names the fix.
    Read once per version of the file (preflight checks it, then the phases use it)."""
    if not path.is_file():
        raise LLMPruneError(f"no such text file: {path}")
    stat = path.stat()
    return _read_checked(path.resolve(), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4)
def _read_checked(path: Path, mtime_ns: int, size: int) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise LLMPruneError(f"cannot read {path}: {err.strerror}; check its permissions") from None
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LLMPruneError(f"{path} is not UTF-8 text (byte {err.start} is invalid): convert it, e.g. with "
                            f"iconv -t utf-8") from None
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise LLMPruneError(f"{path}:{number}: not a JSON object ({err.msg}); each .jsonl line must be "
                                    '{"text": "..."}') from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise LLMPruneError(f'{path}:{number}: a .jsonl line needs a "text" field holding a string')
            texts.append(record["text"])
        content = "\n\n".join(texts)
    if not content.strip():
        raise LLMPruneError(f"{path} holds no text: give a file with prose in it")
    return content


@lru_cache(maxsize=2)
def _wikipedia_parts(source: str) -> tuple[str, str]:
    definition = source_definition(source)
    found = importlib.util.find_spec(definition["package"])
    if found is None or found.origin is None:
        raise LLMPruneError(f"the '{source}' text ships inside {definition['package']}: {definition['install']}")
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    dump = Path(found.origin).parent / definition["file"]
    clean, split = definition["clean"], definition["split"]
    parts: dict[bool, list[str]] = {False: [], True: []}
    with bz2.open(dump) as stream:
        for title, markup, _ in extract_pages(stream):
            article = _article_prose(filter_wiki(markup), clean["min_line_words"])
            if len(article) >= clean["min_article_chars"]:
                held_out = int(hashlib.sha256(title.encode()).hexdigest(), 16) % 100 < split["eval_percent"]
                parts[held_out].append(article)
    return definition["join"].join(parts[False]), definition["join"].join(parts[True])


def python_stdlib_files(source: str) -> dict[str, list[Path]]:
    """The running interpreter's standard library files of a `python_stdlib` source, sorted by path and split by
    file: {"calib": [...], "eval": [...]}. File i (in sorted order) is held out when the running count of
    held-out files, i * eval_percent / 100 rounded down, steps up at it: an even spread, exact to one file."""
    definition = source_definition(source)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob(definition["glob"]))
    if not files:
        raise LLMPruneError(f"the '{source}' text is this Python's standard library, but {stdlib} holds no "
                            f"{definition['glob']} files: run llmprune with a full Python installation")
    percent = definition["split"]["eval_percent"]
    parts: dict[str, list[Path]] = {"calib": [], "eval": []}
    for index, path in enumerate(files):
        held_out = (index + 1) * percent // 100 > index * percent // 100
        parts["eval" if held_out else "calib"].append(path)
    return parts


def _python_source(path: Path) -> str:
    """A Python file's text in the encoding it declares (PEP 263; UTF-8 by default)."""
    import tokenize as python_tokenize

    raw = path.read_bytes()
    encoding, _ = python_tokenize.detect_encoding(io.BytesIO(raw).readline)
    return raw.decode(encoding)


_HEADING = re.compile(r"^=+\s*(.*?)\s*=+$")


def _article_prose(text: str, min_line_words: int) -> str:
    """Keep headings and lines of prose; drop what filter_wiki leaves of tables, lists and infoboxes."""
    kept = []
    for line in text.replace("'''", "").replace("''", "").splitlines():
        line = line.strip()
        heading = _HEADING.match(line)
        if heading:
            kept.append(heading.group(1))
        elif len(line.split()) >= min_line_words and not line.startswith(("|", "!", "{", "}", "*", "#", ":", ";")):
            kept.append(line)
    return "\n".join(kept)


def _hub_dataset_text(definition: dict, part: str) -> str:
    import datasets

    split = definition[f"{part}_split"]
    if not hub_reachable():
        raise LLMPruneError(_offline_message(definition))
    kwargs = {"split": split}
    if "data_files" in definition:
        kwargs["data_files"] = {split: definition["data_files"][split]}
    dataset = datasets.load_dataset(definition["path"], definition.get("config"), **kwargs)
    limit = definition.get(f"{part}_max_docs")
    if limit:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return definition["join"].join(dataset[definition["field"]])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All tokens of a text as one 1-D tensor (no special tokens: windows are cut from the middle anyway)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens, drawn with a local generator (no global seeding)."""
    if nsamples < 1 or seqlen < 1:
        raise LLMPruneError("--nsamples and --seqlen must be at least 1")
    if nsamples * seqlen > tokens.numel():
        raise LLMPruneError(
            f"{nsamples} x {seqlen} calibration tokens asked, but the calibration text holds {tokens.numel()}: "
            f"lower --nsamples or --seqlen, or use a larger --calib source"
        )
    return torch.stack([tokens[s : s + seqlen] for s in calibration_starts(tokens.numel(), nsamples, seqlen, seed)])


def calibration_starts(ntokens: int, nsamples: int, seqlen: int, seed: int) -> list[int]:
    """Where calibration_windows cuts its windows, for callers that must keep clear of them."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, ntokens - seqlen + 1, (nsamples,), generator=generator).tolist()


def eval_windows(tokens: torch.Tensor, seqlen: int, max_windows: int = 0) -> torch.Tensor:
    """Non-overlapping windows over the joined text (the papers' protocol); 0 means all of them."""
    count = tokens.numel() // seqlen
    if count == 0:
        raise LLMPruneError(f"the evaluation text holds {tokens.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows:
        count = min(count, max_windows)
    return tokens[: count * seqlen].view(count, seqlen)
