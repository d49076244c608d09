"""Sweep OWL's two knobs (M, lambda) for a method and sparsity, choosing on a validation split.

    python scripts/sweep_owl.py [--model llama] [--methods wanda,sparsegpt] [--sparsity 0.7] [--out results]

OWL's defaults (M=5, lambda=0.08) were tuned on LLaMA-7B; the paper tunes both per model. Choosing them
on the held-out split that results are reported on would flatter OWL, so the choice is made on
validation windows cut from the *calibration* part of `wiki` (its end, none overlapping a calibration
window); the held-out perplexity of every setting is written too, for uniform and the choice to be read.

The windows can be saved (`--save-windows F`) and the sweep run elsewhere from them (`--windows F`), e.g.
on a GPU machine without the corpus (`--device cuda`). Writes <out>/owl_sweep.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import benchlib
from llmprune import PruneConfig, prune
from llmprune.inputs.data import calibration_starts
from llmprune.inputs.models import load_model
from llmprune.evaluation.perplexity import perplexity
from llmprune.pruning.registry import OwlConfig
from llmprune.output.atomic import write_json_atomically

GRID = [(5.0, 0.08), (5.0, 0.04), (5.0, 0.15), (5.0, 0.2), (3.0, 0.08), (7.0, 0.08), (10.0, 0.08), (10.0, 0.15)]


def make_windows(tokenizer, base: PruneConfig, validation_count: int) -> dict[str, torch.Tensor]:
    calib_tokens = benchlib.text_tokens(tokenizer, "calib")
    starts = calibration_starts(calib_tokens.numel(), base.nsamples, base.seqlen, base.seed)
    return {"calibration": benchlib.calibration(tokenizer, base.nsamples, base.seqlen, seed=base.seed),
            "validation": benchlib.validation_windows(calib_tokens, starts, validation_count, base.seqlen),
            "held_out": benchlib.held_out(tokenizer, base.seqlen, 40)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama")
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--sparsity", default="0.7", help="comma list")
    parser.add_argument("--validation-windows", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--windows", default=None, help="read the windows from this file instead of the corpus")
    parser.add_argument("--save-windows", default=None, help="write the windows to this file and stop")
    parser.add_argument("--out", default="results")
    args = parser.parse_args()

    model, tokenizer, _ = load_model(args.model, "float32")
    base = PruneConfig()
    windows = torch.load(args.windows) if args.windows else make_windows(tokenizer, base, args.validation_windows)
    if args.save_windows:
        torch.save(windows, args.save_windows)
        print(f"wrote {args.save_windows}")
        return
    dense = {name: p.detach().clone() for name, p in model.state_dict().items()}

    rows = []
    for method in args.methods.split(","):
        for sparsity in map(float, args.sparsity.split(",")):
            for allocation, m, lam in [("uniform", None, None)] + [("owl", m, lam) for m, lam in GRID]:
                model.load_state_dict(dense)
                owl = OwlConfig(owl_m=m, owl_lambda=lam) if allocation == "owl" else None
                config = PruneConfig(method=method, sparsity=sparsity, allocation=allocation, device=args.device,
                                     allocation_config=owl)
                report = prune(model, windows["calibration"], config, progress=False)
                row = {"method": method, "sparsity": sparsity, "allocation": allocation, "owl_m": m,
                       "owl_lambda": lam, "layer_sparsity": report.layer_sparsity}
                for split in ("validation", "held_out"):
                    row[f"{split}_ppl"] = perplexity(model, windows[split], args.device, progress=False)
                rows.append(row)
                print(f"{method:10} {sparsity:.0%} {allocation:8} M={m} lambda={lam}: validation ppl "
                      f"{row['validation_ppl']:.2f}, held-out {row['held_out_ppl']:.2f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "owl_sweep.json"
    write_json_atomically(path, {
        "model": args.model, "device": args.device, "machine": benchlib.machine_info(args.device),
        "validation": f"{len(windows['validation'])} windows from the end of the calibration part, no overlap "
                      "with calibration windows",
        "held_out": f"{len(windows['held_out'])} windows (the benchmark's)", "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
