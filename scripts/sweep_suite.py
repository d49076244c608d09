"""Sweep: each method at 50% unstructured and 2:4 on one model, scored on the offline zero-shot suite.

    python scripts/sweep_suite.py [--model llama] [--tasks all-offline] [--limit 100] [--out results/suite]

Every run goes through `llmprune.pipeline.run`, as `python -m llmprune` would do it; the dense model's
perplexity and zero-shot scores are computed by the first run and passed to the others (the runs share
the model and every evaluation setting, so the dense scores cannot differ). Each run's report.json goes to
<out>/<method>-<pattern>/ (no weights), and `python -m llmprune report` over them writes <out>/report.md
(the tables) and its plots.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llmprune.config import PruneConfig, RunConfig
from llmprune.pipeline import DenseScores, run
from llmprune.output.plots import write_report

RUNS = [(method, pattern) for method in ("magnitude", "wanda", "sparsegpt") for pattern in ("50%", "2:4")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama")
    parser.add_argument("--tasks", default="all-offline", help="tasks or suites, as --tasks of the prune command; none: perplexity only")
    parser.add_argument("--limit", type=int, default=100, help="documents per task (0: all)")
    parser.add_argument("--runs", default=",".join(f"{m}:{p}" for m, p in RUNS),
                        help="comma list of METHOD:PATTERN, PATTERN a percentage or N:M")
    parser.add_argument("--out", default="results/suite")
    args = parser.parse_args()

    out = Path(args.out)
    dense = None
    run_dirs = []
    for spec in args.runs.split(","):
        method, pattern = spec.split(":", 1)
        shape = {"sparsity": float(pattern[:-1]) / 100} if pattern.endswith("%") else {"pattern": pattern}
        config = RunConfig(model=args.model, prune=PruneConfig(method=method, **shape), tasks=None if args.tasks == "none" else args.tasks,
                           limit=args.limit or None)
        print(f"== {method} {pattern}", flush=True)
        report = run(config, command=f"scripts/sweep_suite.py ({method} {pattern})", dense=dense)
        dense = DenseScores(report.perplexity and report.perplexity.dense, report.zero_shot_dense)
        run_dir = out / f"{method}-{pattern.replace('%', 'pct').replace(':', 'of')}"
        run_dir.mkdir(parents=True, exist_ok=True)
        report.save(run_dir / "report.json")
        run_dirs.append(run_dir)
    print(f"wrote {write_report(run_dirs, out)}")


if __name__ == "__main__":
    main()
