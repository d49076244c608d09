"""The documentation stays true to the code: the options reference is the generated one, the README keeps the
Quickstart CI runs, and every file a page points to exists."""

import re
from pathlib import Path

import pytest

from llmprune import cli

ROOT = Path(__file__).resolve().parent.parent
REGENERATE = "python -m llmprune.cli --write-options-doc docs/options.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_options_doc_is_the_generated_one():
    written = (ROOT / "docs" / "options.md").read_text(encoding="utf-8")
    assert written == cli.options_markdown(), f"docs/options.md is stale: regenerate it with `{REGENERATE}`"


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_options_doc_lists_every_flag_of_help(command, capsys):
    """Independent of the generator's walk: every flag the command's own --help prints is in the reference."""
    argv = ["--help"] if command == "prune" else [command, "--help"]
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 0
    usage = capsys.readouterr().out.split("\n\n")[0]  # the usage paragraph names every option once
    flags = set(re.findall(r"\[?(--[a-z][a-z0-9-]*)", usage)) - {"--help"}
    assert flags
    section = cli.options_markdown().split(f"## `{cli.command_parsers()[command].prog}`")[1].split("\n## ")[0]
    assert sorted(flag for flag in flags if f"`{flag}" not in section) == []


def test_command_parsers_leave_parsing_working():
    parse = cli.Parser.parse_args
    assert set(cli.command_parsers()) == set(cli.COMMANDS)
    assert cli.Parser.parse_args is parse
    assert cli.prune_parser().parse_args(["--sparsity", "0.6"]).sparsity == 0.6


def test_write_options_doc_writes_the_markdown(tmp_path):
    cli.write_options_doc(str(tmp_path / "options.md"))
    assert (tmp_path / "options.md").read_text(encoding="utf-8") == cli.options_markdown()
    assert [p.name for p in tmp_path.iterdir()] == ["options.md"]  # no partial file left beside it


def quickstart_blocks(readme: str) -> list[list[str]]:
    section = readme.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [[line for line in block.splitlines() if line.strip()] for block in blocks]


def test_readme_is_short_and_keeps_the_quickstart_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    blocks = quickstart_blocks(readme)
    assert len(blocks) == 1 and len(blocks[0]) == 2, "the Quickstart is one bash block of two lines"
    setup, tests = blocks[0]
    assert "pip install" in setup and "python -m llmprune --model llama" in setup
    assert tests == "python -m pytest -q"


def linked_paths(page: Path) -> list[str]:
    """Relative link targets, and repository paths written in backquotes (globs and placeholders excluded)."""
    text = page.read_text(encoding="utf-8")
    links = [target.split("#")[0] for target in re.findall(r"\]\(([^)\s]+)\)", text)
             if not re.match(r"[a-z]+:", target) and not target.startswith("#")]
    quoted = [path for path in re.findall(r"`((?:llmprune|scripts|results|tests|docs|\.ci)/[^`\s]*)`", text)
              if not re.search(r"[*<>{}]|\.\.\.", path)]
    return [str((page.parent / link).resolve().relative_to(ROOT)) for link in links] + quoted


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_path_a_page_names_exists(page):
    paths = linked_paths(page)
    assert paths, f"{page.name} names no file at all"
    assert sorted({path for path in paths if not (ROOT / path).exists()}) == []


def anchors(page: Path) -> set[str]:
    """The ids GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_section_a_page_links_to_exists(page):
    links = re.findall(r"\]\(([^)\s:]*)#([^)\s]+)\)", page.read_text(encoding="utf-8"))
    missing = [f"{target}#{anchor}" for target, anchor in links
               if anchor not in anchors((page.parent / target) if target else page)]
    assert missing == []


def test_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme.split("\n## How the code is laid out\n", 1)[1].split("\n## ", 1)[0]
    modules = sorted(p.relative_to(ROOT / "llmprune") for p in (ROOT / "llmprune").rglob("*.py"))
    missing = [str(m) for m in modules if m.name != "__init__.py" and m.stem not in layout]
    assert missing == []
