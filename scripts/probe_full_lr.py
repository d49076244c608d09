"""Probe: the first steps of full + distill recovery of a structurally pruned model, at several learning rates.

    python scripts/probe_full_lr.py --model qwen-coder-0.5b --pruned DIR --text code --steps 10 \\
        --variants all:1e-4,decoder:1e-4,all:3e-5,all:1e-5 --out results/qwen-coder-0.5b/code/full_lr_probe.json

DIR is a saved structured prune of --model (e.g. bench_structured's --save-dir). The dense model's top-k targets are
computed once on the steps x 2 training windows; each variant then trains a fresh copy of the pruned model with
--recover-params full and the distillation loss, scoring validation perplexity every 5 steps. A variant is
SCOPE:LR: `all` trains every weight (what full does to a model without masks), `decoder` only the decoder layers'
(embeddings, final norm and head frozen). Quality only: timings taken beside other jobs mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

import benchlib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen-coder-0.5b")
    parser.add_argument("--pruned", required=True, help="a saved structured prune of --model")
    parser.add_argument("--text", default="code")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", default="all:1e-4,all:1e-5", help="comma list of SCOPE:LR, SCOPE all or decoder")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import llmprune.recovery.params as params
    from llmprune.config import RecoverConfig
    from llmprune.inputs.models import decoder_layers, load_model
    from llmprune.recovery.distill import teacher_topk
    from llmprune.recovery.train import recovery_windows, train_recovery

    config = RecoverConfig(loss="distill", params="full", steps=args.steps, batch=2, seqlen=256, val_windows=8,
                           eval_every=5, seed=0)
    dense, tokenizer, _ = load_model(args.model, torch.float32)
    train, val = recovery_windows(benchlib.text_tokens(tokenizer, "calib", args.text), config)
    teacher = teacher_topk(dense, train, config.distill_topk, batch_size=4, progress=False)
    del dense
    pruned, _, _ = load_model(args.pruned, torch.float32)
    every_weight = params.full_parameters

    def decoder_only(model, modules):
        return every_weight(model, modules) if modules else list(dict.fromkeys(decoder_layers(model)[1].parameters()))

    rows = []
    for variant in args.variants.split(","):
        scope, lr = variant.split(":")
        params.full_parameters = decoder_only if scope == "decoder" else every_weight
        start = time.perf_counter()
        stats = train_recovery(copy.deepcopy(pruned), train, val, replace(config, lr=float(lr)), teacher=teacher,
                               masks={}, progress=False)
        rows.append({"variant": variant, "scope": scope, "lr": float(lr), "trained_parameters": stats["trained_parameters"],
                     "curve": stats["curve"], "seconds": round(time.perf_counter() - start, 1)})
        print(variant, [round(point["val_ppl"], 2) for point in stats["curve"]], flush=True)
    params.full_parameters = every_weight
    out = {"what": "first steps of full + distill recovery, validation perplexity every 5 steps", "model": args.model,
           "pruned": args.pruned, "text": args.text, "steps": args.steps, "batch": 2, "seqlen": 256,
           "val_windows": 8, "distill_topk": config.distill_topk, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
