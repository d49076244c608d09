"""Sweep SparseGPT's damping (--percdamp), calibration size (--nsamples) and comparison group (--sparsegpt-compare).

    python scripts/sweep_sparsegpt.py --model qwen-coder-0.5b --text code --also-eval wiki \
        --settings 0.01@16,0.1@16,0.3@16,1@16,0.01@64,0.1@64 [--sparsity 0.5,0.7] [--compare matrix,row]

On Qwen2.5-Coder-0.5B the reference SparseGPT scores worse than Wanda at 50% (../shared/BASELINES.md), the reverse
of SmolLM2, and asks whether the damping or the calibration size explains it. Each sparsity, setting `DAMP@N` and
comparison group prunes the dense model with SparseGPT at percdamp DAMP on N calibration windows, then measures
perplexity on three splits:
validation windows cut from the end of the calibration part (none overlapping any setting's calibration window:
the split to choose a setting on), the held-out windows results are reported on, and each --also-eval text's
held-out windows (how much the fit to the calibration text costs elsewhere). Writes <out>/sparsegpt_sweep.json
(--keep-rows: adds to the rows already there).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import benchlib
from llmprune import PruneConfig, prune
from llmprune.evaluation.perplexity import perplexity
from llmprune.inputs.data import calibration_starts
from llmprune.inputs.models import load_model
from llmprune.output.atomic import write_json_atomically
from llmprune.pruning.registry import SparseGPTConfig


def parse_settings(text: str) -> list[tuple[float, int]]:
    """"0.01@16,0.1@64" -> [(0.01, 16), (0.1, 64)]; a malformed item exits with one line naming the form."""
    settings = []
    for item in filter(None, text.split(",")):
        try:
            damp, nsamples = item.split("@")
            settings.append((float(damp), int(nsamples)))
        except ValueError:
            raise SystemExit(f"--settings: {item!r} is not DAMP@NSAMPLES (e.g. 0.01@16)") from None
    if not settings:
        raise SystemExit("--settings: give at least one DAMP@NSAMPLES")
    return settings


def key(row: dict) -> tuple:
    return row["sparsity"], row["percdamp"], row["nsamples"], row["compare"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama")
    parser.add_argument("--text", default=benchlib.TEXT, help="calibration and held-out text (wiki, code, ...)")
    parser.add_argument("--settings", default="0.01@16,0.1@16,0.3@16,1@16,0.01@64,0.1@64",
                        help="comma list of DAMP@NSAMPLES (percdamp, calibration windows)")
    parser.add_argument("--sparsity", default="0.5", help="comma list")
    parser.add_argument("--compare", default="matrix", help="comma list of comparison groups: matrix (the paper's), "
                        "row")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16, help="held-out windows of each text")
    parser.add_argument("--validation-windows", type=int, default=8)
    parser.add_argument("--also-eval", default="", metavar="TEXTS", help="comma list of other texts to measure on")
    parser.add_argument("--out", default=None, help="folder for sparsegpt_sweep.json (default: the model's results)")
    parser.add_argument("--keep-rows", action="store_true",
                        help="keep the rows already in sparsegpt_sweep.json that this run does not redo (same settings)")
    args = parser.parse_args()
    settings = parse_settings(args.settings)
    runs = [(float(sparsity), damp, nsamples, compare) for sparsity in args.sparsity.split(",")
            for damp, nsamples in settings for compare in args.compare.split(",")]
    out = benchlib.results_folder(args.model, args.text) if args.out is None else Path(args.out)

    path = out / "sparsegpt_sweep.json"
    same = {"model": benchlib.model_name(args.model), "text": args.text, "method": "sparsegpt",
            "seqlen": args.seqlen, "seed": benchlib.SEED, "eval_windows": args.eval_windows,
            "validation_windows": args.validation_windows}
    kept = []
    if args.keep_rows and path.exists():
        earlier = json.loads(path.read_text())
        benchlib.refuse_other_settings("sweep_sparsegpt.py", path, {k: earlier.get(k) for k in same}, same)
        kept = [row for row in earlier["rows"] if key(row) not in runs]
    # calibration_starts draws a prefix of the same sequence for fewer windows: clear of the largest calibration,
    # the validation windows are clear of every row's, and the same for every row
    largest = max([n for _, _, n, _ in runs] + [row["nsamples"] for row in kept])
    if kept and earlier["validation_clear_of"] != largest:
        raise SystemExit(f"sweep_sparsegpt.py: error: --keep-rows: {path} chose its validation windows clear of "
                         f"{earlier['validation_clear_of']} calibration windows, this run would need {largest}; "
                         "rerun every row, or give --out another folder")

    model, tokenizer, _ = load_model(args.model, "float32")
    calib_tokens = benchlib.text_tokens(tokenizer, "calib", args.text)
    used = calibration_starts(calib_tokens.numel(), largest, args.seqlen, benchlib.SEED)
    splits = {"validation": benchlib.validation_windows(calib_tokens, used, args.validation_windows, args.seqlen),
              args.text: benchlib.held_out(tokenizer, args.seqlen, args.eval_windows, args.text)}
    for other in filter(None, args.also_eval.split(",")):
        splits[other] = benchlib.held_out(tokenizer, args.seqlen, args.eval_windows, other)

    def measure() -> dict[str, float]:
        return {split: perplexity(model, windows, "cpu", progress=False) for split, windows in splits.items()}

    dense_state = {name: p.detach().clone() for name, p in model.state_dict().items()}
    dense = measure()
    print(f"dense: {dense}", flush=True)
    rows = list(kept)
    for sparsity, damp, nsamples, compare in runs:
        model.load_state_dict(dense_state)
        config = PruneConfig(method="sparsegpt", sparsity=sparsity, nsamples=nsamples, seqlen=args.seqlen,
                             method_config=SparseGPTConfig(percdamp=damp, sparsegpt_compare=compare))
        calibration = benchlib.calibration(tokenizer, nsamples, args.seqlen, args.text)
        started = time.perf_counter()
        prune(model, calibration, config, progress=False)
        row = {"sparsity": sparsity, "percdamp": damp, "nsamples": nsamples, "compare": compare,
               "prune_s": round(time.perf_counter() - started, 1), "ppl": measure()}
        rows.append(row)
        print(f"{sparsity:.0%}, percdamp {damp:g} on {nsamples} x {args.seqlen}, compared by {compare}: "
              f"{row['ppl']} ({row['prune_s']} s)", flush=True)
        write_json_atomically(path, {  # after every row: a stopped sweep keeps its rows
            **same, "validation_clear_of": largest, "machine": benchlib.machine_info("cpu"),
            "splits": {"validation": f"{args.validation_windows} windows from the end of the calibration part, "
                                     "none overlapping a calibration window of any setting",
                       **{text: f"{args.eval_windows} held-out windows" for text in splits if text != "validation"}},
            "dense_ppl": dense, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
