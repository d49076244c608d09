"""Command line: a thin layer that fills the config dataclasses and calls the Python API.

    python -m llmprune [prune options]          prune (the default command)
    python -m llmprune eval|report|push ...     see `python -m llmprune COMMAND --help`
"""

from __future__ import annotations

import argparse
import shlex
import sys
import traceback

from .config import PruneConfig, RunConfig
from .data import source_names
from .errors import LLMPruneError
from .methods import METHODS
from .models import ALIASES

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


def prune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llmprune",
        description="Prune a Hugging Face causal decoder layer by layer, evaluate it, and save it.",
        epilog=EPILOG.format(sources=", ".join(source_names())),
        formatter_class=lambda prog: argparse.ArgumentDefaultsHelpFormatter(prog, max_help_position=32, width=100),
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
    g = p.add_argument_group("output")
    g.add_argument("--output", default=None, metavar="DIR", help="write the pruned model (safetensors), "
                   "tokenizer, llmprune_config.json and report.json here (default: report only)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return p


def prune_command(argv: list[str]) -> int:
    from .pipeline import run
    from .summary import format_summary

    args = prune_parser().parse_args(argv)
    prune_config = PruneConfig(
        method=args.method, sparsity=args.sparsity, pattern=args.pattern, nsamples=args.nsamples,
        seqlen=args.seqlen, seed=args.seed, batch_size=args.batch_size, skip=args.skip,
        blocksize=args.blocksize, percdamp=args.percdamp, allocation=args.allocation,
        owl_m=args.owl_m, owl_lambda=args.owl_lambda, device=args.device,
    )
    if args.eval_windows < 0:
        raise LLMPruneError("--eval-windows must be 0 (all) or more")
    config = RunConfig(model=args.model, prune=prune_config, calib=args.calib, eval=args.eval,
                       eval_windows=args.eval_windows, dtype=args.dtype, output=args.output,
                       overwrite=args.overwrite, trust_remote_code=args.trust_remote_code)
    command = "python -m llmprune " + shlex.join(argv)
    report = run(config, progress=not args.quiet, command=command)
    print(format_summary(report))
    return 0


COMMANDS = {"prune": prune_command}


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
