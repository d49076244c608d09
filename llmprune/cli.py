"""Command line: a thin layer generated from the config dataclasses, which then calls the Python API.

    python -m llmprune [prune options]          prune (the default command)
    python -m llmprune eval|report|push|export|scan   see `python -m llmprune COMMAND --help`

Each option is a field of config.py (its flag, help, group and choices live there); `--config FILE` fills
the same fields from YAML or JSON, and flags given beside it override the file.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import traceback
from dataclasses import MISSING, fields

from .errors import LLMPruneError

EPILOG = """\
methods:
{methods}

patterns:
  unstructured  each method compares weights within a group and prunes the lowest-scoring fraction:
                magnitude, wanda and ria compare within each output row (every row loses the same number),
                sparsegpt within each block of --blocksize input columns of a whole matrix (the paper's
                adaptive mask selection); counts are rounded to nearest.
  N:M           NVIDIA's convention: N weights are KEPT out of every M consecutive input weights of a
                row (2:4 keeps 2 of 4, sparsity 0.5). --pattern 2:4 alone implies --sparsity 0.5.

defaults: 32 x 512 calibration tokens and 40 evaluation windows suit a CPU and the embedded model;
the papers use --nsamples 128 --seqlen 2048 --eval-windows 0 (all windows) on a GPU.
text sources: {sources}, or file:PATH (.txt, or .jsonl with a "text" field). `wiki` is offline
(Wikipedia shipped in the gensim wheel, split by article into calibration and held-out parts), and so is
`code` (the running Python's standard library, split by file).

examples:
  python -m llmprune --model llama --method wanda --sparsity 0.5 --output out/llama-wanda50
  python -m llmprune --model llama --method sparsegpt --pattern 2:4 --output out/llama-sgpt24
  python -m llmprune --config out/llama-wanda50/llmprune_config.json --sparsity 0.6 --output out/w60
  python -m llmprune --model llama --structure channels --method flap --sparsity 0.2 --output out/ch20
  python -m llmprune --model llama --structure layers --sparsity 0.1 --recover distill --output out/l10
  python -m llmprune --model meta-llama/Llama-2-7b-hf --method wanda --nsamples 128 --seqlen 2048 --device cuda
"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, unless it is empty (None/False) or the help already states it."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=32, width=100)

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line naming the fix, not a 20-line usage dump."""

    def error(self, message):
        raise LLMPruneError(f"{message} (see {self.prog} --help)")


# ------------------------------------------------------------------ options generated from the dataclasses


def _field_type(annotation: str):
    """The scalar type of a field annotation written as a string ('float | None' -> float)."""
    names = {part.strip() for part in annotation.split("|")} - {"None"}
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("str", str), ("list[str]", list)):
        if name in names:
            return kind
    return str


def _dest(f) -> str:
    """The namespace key of a field's flag: unique across the configs of one command (RecoverConfig's seqlen
    is --recover-seqlen, never --seqlen)."""
    return (f.metadata.get("flag") or "--" + f.name.replace("_", "-")).lstrip("-").replace("-", "_")


def add_fields(parser: argparse.ArgumentParser, config_cls, groups: dict[str, argparse._ArgumentGroup],
               only: set[str] | None = None, skip: set[str] = frozenset()) -> None:
    """One flag per field with CLI metadata (a flag another config already added is that same setting).
    Defaults are SUPPRESSed: the namespace then holds only the flags the user gave, so a --config file's values
    survive unless a flag overrides them."""
    taken = {action.dest for action in parser._actions}
    for f in fields(config_cls):
        meta = f.metadata
        if not meta.get("cli", True) or "help" not in meta or f.name in skip or (only and f.name not in only) \
                or _dest(f) in taken:
            continue
        group = groups.get(meta.get("group")) or parser
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        kind = _field_type(f.type)
        shown = f.default if f.default is not MISSING else None
        kwargs = {"dest": _dest(f), "default": argparse.SUPPRESS, "help": meta["help"]}
        if f.default is MISSING and f.default_factory is MISSING:
            kwargs["required"] = True
        if kind is bool:
            group.add_argument(flag, action="store_true", **kwargs)
            continue
        if shown not in (None, False):
            kwargs["help"] = f"{meta['help']} (default: {shown})"
        if meta.get("choices"):
            kwargs["choices"] = list(meta["choices"])
        kwargs["metavar"] = meta.get("metavar") or {int: "N", float: "X", list: "A,B"}.get(kind)
        if kwargs["metavar"] is None or meta.get("choices"):
            kwargs.pop("metavar")
        kwargs["type"] = (lambda text: [t for t in text.split(",") if t]) if kind is list else kind
        group.add_argument(flag, **kwargs)


def given_fields(config_cls, args: dict) -> dict:
    """The flags given for `config_cls`'s fields, by field name."""
    return {f.name: args[_dest(f)] for f in fields(config_cls) if f.metadata.get("cli", True) and _dest(f) in args}


def build_config(config_cls, args: dict, base: dict | None = None, **values):
    """Defaults, overridden by a config file's values (`base`), overridden by the flags given (`args`, keyed by
    their flags), then by `values` (fields set by the command)."""
    from .config import _checked_keys

    merged = {**(base or {}), **given_fields(config_cls, args), **values}
    return config_cls(**_checked_keys(config_cls, merged))


def knob_flags(args: dict) -> dict:
    """The flags given for the registered methods', updates' and allocations' knobs, by field name."""
    from .pruning.registry import knob_configs

    return {name: value for config in knob_configs() for name, value in given_fields(config, args).items()}


def method_listing() -> str:
    """--help's list of methods, updates and structured importances, from the torch-free registry."""
    from .pruning.registry import IMPORTANCES, METHODS, UPDATES

    methods = "\n".join(f"  {name:<12}{entry.summary}" for name, entry in METHODS.items())
    methods += "".join(f"\n  --update {name:<5}{entry.summary}" for name, entry in UPDATES.items())
    methods += "\n  with --structure channels or heads, --method scores whole channels or heads:\n"
    return methods + "\n".join(f"  {name:<12}{entry.summary}" for name, entry in IMPORTANCES.items())


def prune_parser() -> argparse.ArgumentParser:
    from .config import PruneConfig, RecoverConfig, RunConfig
    from .pruning.registry import knob_configs
    from .resources import source_names

    p = Parser(prog="python -m llmprune",
               description="Prune a Hugging Face causal decoder layer by layer, evaluate it, and save it.\n"
                           "Other commands: eval, report, push, export, scan (python -m llmprune COMMAND --help).",
               epilog=EPILOG.format(methods=method_listing(), sources=", ".join(source_names())),
               formatter_class=HelpFormatter)
    p.add_argument("--config", metavar="FILE", help="settings from a YAML or JSON file, such as an output's "
                   "llmprune_config.json (reruns that run exactly); flags given beside it override it")
    titles = {"model": "model", "pruning": "pruning", "calibration": "calibration", "evaluation": "evaluation",
              "structured": "structured pruning (a smaller ordinary model; --sparsity is the structure's fraction)",
              "recovery": "recovery (fine-tuning that keeps the sparsity pattern)",
              "scale": "scale (models larger than memory, crashes, several processes: torchrun -m llmprune ...)",
              "output": "output"}
    groups = {key: p.add_argument_group(title) for key, title in titles.items()}
    for config_cls in (RunConfig, PruneConfig, *knob_configs(), RecoverConfig):
        add_fields(p, config_cls, groups)
    groups["output"].add_argument("--quiet", action="store_true", help="no progress bars")
    groups["output"].add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def prune_command(argv: list[str]) -> int:
    from .config import PruneConfig, RecoverConfig, RunConfig, load_config_file, prune_config_from

    args = vars(prune_parser().parse_args(argv))
    base = load_config_file(args["config"]) if args.get("config") else {}
    go_offline(args.get("offline") or base.get("offline"))
    given = {**given_fields(PruneConfig, args), **knob_flags(args)}
    schedule = args.get("schedule") or base.get("schedule")
    if schedule and "sparsity" not in given and "sparsity" not in (base.get("prune") or {}):
        given["sparsity"] = float(str(schedule).split(",")[-1])  # a schedule ends at the run's sparsity
    prune = prune_config_from(given, base.get("prune"))
    recovery = build_config(RecoverConfig, args, base.get("recovery"), seed=prune.seed)
    run_base = {k: v for k, v in base.items() if k not in ("prune", "recovery")}
    config = build_config(RunConfig, args, run_base, prune=prune, recovery=recovery)

    from .output.summary import format_summary
    from .pipeline import run

    report = run(config, progress=not args.get("quiet"), command="python -m llmprune " + shlex.join(argv))
    if report is not None:  # under torchrun only rank 0 reports
        print(format_summary(report))
    return 0


def go_offline(offline: bool) -> None:
    """--offline: set before any Hub client is imported (they read these at import time)."""
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"


# ------------------------------------------------------------------ other commands


def eval_command(argv: list[str]) -> int:
    from .evaluation.evaluate import EvalConfig

    p = Parser(prog="python -m llmprune eval", description="Evaluate a model (an llmprune output, an alias, a "
               "Hub id, a .gguf) and optionally a baseline beside it.", formatter_class=HelpFormatter)
    groups = {key: p.add_argument_group(key) for key in ("model", "evaluation")}
    add_fields(p, EvalConfig, groups)
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = vars(p.parse_args(argv))
    go_offline(args.get("offline"))
    config = build_config(EvalConfig, args)

    from .evaluation.evaluate import comparison_table, evaluate, results_path

    result = evaluate(config)
    print(comparison_table(result))
    print(f"results: {results_path(config)}")
    return 0


def report_command(argv: list[str]) -> int:
    p = Parser(prog="python -m llmprune report", description="Compare llmprune runs: a markdown report with "
               "plots (per-layer sparsity, perplexity and zero-shot accuracy against sparsity).",
               formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", metavar="DIR", help="llmprune output directories")
    p.add_argument("--out", default="llmprune-report", help="folder for report.md and the PNGs")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = p.parse_args(argv)
    from .output.plots import write_report

    print(f"wrote {write_report(args.runs, args.out)}")
    return 0


def push_command(argv: list[str]) -> int:
    p = Parser(prog="python -m llmprune push", description="Upload an llmprune output directory to a Hugging "
               "Face Hub model repo (created if needed). The token comes from HF_TOKEN or `hf auth login` "
               "and is never printed.", formatter_class=HelpFormatter)
    p.add_argument("output", metavar="DIR", help="an llmprune output directory")
    p.add_argument("--repo-id", required=True, metavar="OWNER/NAME", help="the Hub model repo")
    p.add_argument("--private", action="store_true", help="make the repo private (a new one, or an existing one)")
    p.add_argument("--revision", default=None, help="branch to upload to (created if needed)")
    p.add_argument("--commit-message", default=None, help="commit message")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = p.parse_args(argv)
    from .output.publish import push

    url = push(args.output, args.repo_id, private=args.private, revision=args.revision,
               commit_message=args.commit_message)
    print(f"pushed to {url}")
    return 0


def scan_command(argv: list[str]) -> int:
    from .config import PruneConfig, RunConfig, prune_config_from
    from .pruning.registry import ALLOCATIONS, knob_configs

    p = Parser(prog="python -m llmprune scan", description="Per-layer sensitivity: the loss on validation "
               "windows (cut from the calibration text, never its held-out part) when only one layer, or one kind "
               "of linear across all layers, is pruned. Writes scan.json, scan.md and a heat-map scan.png; "
               "`--allocation scan:DIR/scan.json` then prunes the least sensitive layers most.",
               formatter_class=HelpFormatter)
    p.add_argument("--sparsities", default="0.5,0.7,0.8", metavar="S1,S2,..", help="sparsities to scan; for a "
                   "target T with --scan-max-shift D, include one at or above T + D (default: 0.5,0.7,0.8)")
    p.add_argument("--by", default="layer", choices=["layer", "linear"], help="one decoder layer, or one kind of "
                   "linear (q_proj, down_proj...) across all layers (default: layer)")
    p.add_argument("--val-windows", type=int, default=8, metavar="N", help="validation windows of --seqlen "
                   "(default: 8)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for scan.json, scan.md, scan.png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    groups = {key: p.add_argument_group(key) for key in ("model", "pruning", "calibration")}
    add_fields(p, RunConfig, groups, only={"model", "dtype", "trust_remote_code", "offline", "calib"})
    from .pruning.structured.config import StructuredConfig

    # every cell is one layer pruned unstructured: no structure setting applies (batch size and device do)
    structure_only = {f.name for f in fields(StructuredConfig)} - {"method", "batch_size", "device"}
    add_fields(p, PruneConfig, groups, skip={"sparsity", "allocation", "remove_params", "expert_importance", "shape",
                                             *structure_only})
    for config_cls in knob_configs():  # every cell is pruned uniformly: no allocation's knobs
        if config_cls not in {entry.config for entry in ALLOCATIONS.values()}:
            add_fields(p, config_cls, groups)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = vars(p.parse_args(argv))
    go_offline(args.get("offline"))
    try:
        sparsities = [float(s) for s in args["sparsities"].split(",") if s.strip()]
    except ValueError:
        raise LLMPruneError(f"--sparsities must be a comma list such as 0.5,0.7 (got '{args['sparsities']}')") from None
    prune = prune_config_from({**given_fields(PruneConfig, args), **knob_flags(args),
                               "sparsity": sparsities[0] if sparsities else None})
    run = build_config(RunConfig, {k: v for k, v in args.items() if k in ("model", "dtype", "trust_remote_code",
                                                                             "offline", "calib")})
    from .pruning.scan import run_scan

    table_path = run_scan(run, prune, sparsities, args["by"], args["val_windows"], args["output"],
                          args.get("overwrite", False), progress=not args.get("quiet"))
    print(f"wrote {table_path} (allocate with --allocation scan:{table_path})")
    return 0


def search_command(argv: list[str]) -> int:
    from .config import PruneConfig, RecoverConfig, RunConfig
    from .pruning.structured.config import StructuredConfig
    from .pruning.structured.config import parse_structures

    p = Parser(prog="python -m llmprune search", description="Several structures at once to a parameter budget: "
               "every shape over the listed structures within 2% of --target-params (counted exactly), the "
               "best ones pruned one-shot on a copy and scored by KL to the dense model on validation windows "
               "cut from the end of the calibration text; with --search-topk the best are distilled briefly and "
               "scored again. Writes candidates.json, candidates.md (best first) and candidates.png "
               "(docs/structured.md).", formatter_class=HelpFormatter)
    p.add_argument("--structure", required=True, metavar="A,B,..", help="comma list of channels, heads, layers, "
                   "hidden (any subset; each also left whole in some candidates)")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for candidates.json, candidates.md")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    groups = {key: p.add_argument_group(key) for key in ("model", "pruning", "structured", "calibration",
                                                         "recovery")}
    add_fields(p, RunConfig, groups, only={"model", "dtype", "trust_remote_code", "offline", "calib"})
    add_fields(p, PruneConfig, groups, only={"method", "nsamples", "seqlen", "seed", "device"})
    add_fields(p, StructuredConfig, groups)
    recovery_flags = {"params", "lr", "batch", "seqlen", "precision", "loss_chunk", "distill_topk",
                      "distill_temperature", "r", "alpha"}  # --search-topk's distillation (search_distill.py)
    add_fields(p, RecoverConfig, groups, only=recovery_flags)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = vars(p.parse_args(argv))
    go_offline(args.get("offline"))
    axes = parse_structures(args["structure"])
    if args.get("target_params") is None:
        raise LLMPruneError("llmprune search needs --target-params (a count such as 90M, or a fraction such as 0.67)")
    given = {k: v for k, v in given_fields(StructuredConfig, args).items()
             if k not in ("structure", "sparsity", "target_params")}
    base = StructuredConfig(structure="channels", sparsity=0.5, **given)  # each axis's own: search.axis_config
    prune = build_config(PruneConfig, {k: v for k, v in args.items() if k in ("nsamples", "seqlen", "seed")})
    run = build_config(RunConfig, {k: v for k, v in args.items() if k in ("model", "dtype", "trust_remote_code",
                                                                             "offline", "calib")})
    from .pruning.structured.search import run_search

    recovery = build_config(RecoverConfig, args, loss="distill", seed=prune.seed)
    path = run_search(run, base, axes, args["target_params"], prune.nsamples, prune.seqlen, prune.seed,
                      args["output"], args.get("overwrite", False), progress=not args.get("quiet"),
                      recovery=recovery)
    print(f"wrote {path}")
    return 0


def export_command(argv: list[str]) -> int:
    from .output.export import ExportConfig

    p = Parser(prog="python -m llmprune export", description="Write a saved model (an llmprune output) as one "
               "GGUF file for llama.cpp and the tools built on it (Llama family, structured shapes included).",
               formatter_class=HelpFormatter)
    p.add_argument("model", metavar="DIR", help="an llmprune output directory (a saved Hugging Face model)")
    add_fields(p, ExportConfig, {})
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = vars(p.parse_args(argv))
    config = build_config(ExportConfig, args, model=args["model"])

    from .output.export import run_export

    path = run_export(config)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


COMMANDS = {"prune": prune_command, "eval": eval_command, "report": report_command, "push": push_command,
            "export": export_command, "scan": scan_command, "search": search_command}


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that every `finally` and cleanup runs as for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = COMMANDS.get(argv[0]) if argv else None
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return command(argv[1:]) if command else prune_command(argv)
    except LLMPruneError as err:
        return _fail(str(err), argv)
    except (KeyboardInterrupt, Terminated) as err:
        what = "interrupted" if isinstance(err, KeyboardInterrupt) else "terminated"
        from .output.atomic import WRITTEN

        done = f"; finished output kept: {', '.join(WRITTEN)}" if WRITTEN else "; no output was written"
        print(f"llmprune: {what}{done}", file=sys.stderr)
        return 130 if isinstance(err, KeyboardInterrupt) else 143
    except MemoryError:
        return _fail("out of memory: lower --batch-size or --nsamples, or use another --device", argv)
    except RuntimeError as err:  # torch raises OutOfMemoryError (a RuntimeError) and CPU allocation failures
        if "out of memory" in str(err).lower() or type(err).__name__ == "OutOfMemoryError":
            return _fail("out of memory: lower --batch-size or --nsamples, or use another --device "
                         f"({str(err).splitlines()[0][:120]})", argv)
        return _unexpected(err, argv)
    except OSError as err:
        if err.errno == 28:  # ENOSPC
            return _fail(f"no space left on device{f' writing {err.filename}' if err.filename else ''}: free some "
                         "space or choose another --output; nothing partial was kept", argv)
        return _fail(f"{err.strerror or err}{f': {err.filename}' if err.filename else ''}", argv)
    except Exception as err:  # noqa: BLE001 (the last line of defence: one line, the traceback with --debug)
        return _unexpected(err, argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(message: str, argv: list[str]) -> int:
    if "--debug" in argv:
        traceback.print_exc()
    print(f"llmprune: error: {message}", file=sys.stderr)
    return 2


def _unexpected(err: BaseException, argv: list[str]) -> int:
    return _fail(f"unexpected {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} (rerun with "
                 "--debug for the traceback, and please report it)", argv)


# ------------------------------------------------------------------ the options reference (docs/options.md)


class _ParserBuilt(Exception):
    """Carries a command's parser out of its command function at parse time, before the command does anything."""

    def __init__(self, parser: argparse.ArgumentParser):
        super().__init__(parser.prog)
        self.parser = parser


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser exactly as the command builds it: each command function runs up to its parse."""

    def stop(parser, *args, **kwargs):
        raise _ParserBuilt(parser)

    parsers, parse = {}, Parser.parse_args
    Parser.parse_args = stop
    try:
        for name, command in COMMANDS.items():
            try:
                command([])
            except _ParserBuilt as built:
                parsers[name] = built.parser
    finally:
        Parser.parse_args = parse
    return parsers


def options_markdown() -> str:
    """docs/options.md: every option of every command, one table per option group, generated from the parsers
    (and so from config.py's fields). tests/test_docs.py fails when the file differs from this."""

    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")

    lines = ["<!-- Generated from the config fields by `python -m llmprune.cli --write-options-doc docs/options.md`;",
             "     do not edit by hand (tests/test_docs.py fails when this file is stale). -->", "",
             "# Options reference", "",
             "Every option of every command, with its default. Each one is a field of `llmprune/config.py` (or of the",
             "eval and export configs), written once; the command line, `--help` and this page are generated from them.",
             "A `--config FILE` (YAML or JSON, such as an output's `llmprune_config.json`) sets the same fields."]
    for name, parser in command_parsers().items():
        formatter = parser._get_formatter()
        lines += ["", f"## `{parser.prog}`" + (" (the default command)" if name == "prune" else ""), "",
                  cell(parser.description or "")]
        for group in parser._action_groups:
            actions = [a for a in group._group_actions if not isinstance(a, argparse._HelpAction)]
            if not actions:
                continue
            lines += ["", f"### {group.title}", "", "| option | meaning |", "|---|---|"]
            for action in actions:
                usage = formatter._format_action_invocation(action)
                meaning = formatter._expand_help(action) + (" (required)" if action.required and
                                                            action.option_strings else "")
                lines.append(f"| `{cell(usage)}` | {cell(meaning)} |")
        if parser.epilog:
            lines += ["", "### More", "", "```", parser.epilog.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write_options_doc(path: str) -> None:
    """Write options_markdown() to `path`, atomically (a reader never sees half a file)."""
    import tempfile

    target = os.path.abspath(path)
    handle, partial = tempfile.mkstemp(prefix=".options.", suffix=".partial", dir=os.path.dirname(target))
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(options_markdown())
        os.chmod(partial, 0o644)
        os.replace(partial, target)
    except BaseException:
        os.unlink(partial)
        raise


if __name__ == "__main__":  # python -m llmprune.cli --write-options-doc docs/options.md
    if sys.argv[1:2] != ["--write-options-doc"] or len(sys.argv) != 3:
        sys.exit("usage: python -m llmprune.cli --write-options-doc docs/options.md")
    write_options_doc(sys.argv[2])
    print(f"wrote {sys.argv[2]}")
