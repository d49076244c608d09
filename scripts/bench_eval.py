"""Benchmark evaluation throughput: is the time spent in the model, or around it?

    python scripts/bench_eval.py [--model llama] [--limit N] [--out results]

Two evaluations of one model, each timed against a bare `model(input_ids)` loop over the very same tokens:

- perplexity: `llmprune.evaluation.perplexity.perplexity` on the held-out `wiki` windows (40 x 512 by default),
  against the bare loop one window at a time and batched (does batching pay on this machine?);
- zero-shot: `llmprune.evaluation.zeroshot.evaluate_zero_shot` (lm-eval's `simple_evaluate` on the in-memory
  model) on arc_easy and piqa, against a bare loop over the requests lm-eval scored: each request's
  context + continuation minus its last token, as lm-eval feeds them, sorted by length and batched
  as lm-eval batches them (right-padded, `--eval-batch-size`).

Writes <out>/bench_eval.json and prints a table: wall seconds, tokens/s, and the harness-to-bare ratio.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import benchlib
from llmprune.inputs.models import load_model
from llmprune.evaluation.perplexity import perplexity
from llmprune.evaluation.zeroshot import evaluate_zero_shot
from llmprune.output.atomic import write_json_atomically


@torch.inference_mode()
def bare_loop(model, batches: list[torch.Tensor]) -> float:
    """Seconds for model(input_ids) over each batch: the floor any evaluation loop is measured against."""
    start = time.perf_counter()
    for ids in batches:
        model(input_ids=ids, use_cache=False)
    return time.perf_counter() - start


def padded_batches(sequences: list[list[int]], batch_size: int) -> list[torch.Tensor]:
    """Longest first, right-padded with token 0 (padding is wasted work lm-eval does too)."""
    ordered = sorted(sequences, key=len, reverse=True)
    batches = []
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        width = len(chunk[0])
        batches.append(torch.tensor([seq + [0] * (width - len(seq)) for seq in chunk]))
    return batches


def scored_sequences(lm_class) -> tuple[list[list[int]], object]:
    """Record the model inputs of every loglikelihood request lm-eval scores, by wrapping HFLM's own method."""
    recorded: list[list[int]] = []
    original = lm_class._loglikelihood_tokens

    def recording(self, requests, *args, **kwargs):
        for _, context, continuation in requests:
            recorded.append((context + continuation)[-(self.max_length + 1) :][:-1])
        return original(self, requests, *args, **kwargs)

    lm_class._loglikelihood_tokens = recording
    return recorded, original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama", help="anything load_model accepts (default: the embedded model)")
    parser.add_argument("--tasks", default="arc_easy,piqa")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--out", default="results", help="folder for bench_eval.json")
    args = parser.parse_args()

    model, tokenizer, _ = load_model(args.model, "float32")
    windows = benchlib.held_out(tokenizer, args.seqlen, args.eval_windows)
    rows = []

    def add(name, seconds, tokens, bare_seconds, note=""):
        rows.append({"evaluation": name, "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                     "bare_seconds": bare_seconds, "x_bare": seconds / bare_seconds, "note": note})

    # Perplexity. A warm-up window first: the first forward pays for allocation and thread start-up.
    bare_loop(model, [windows[:1]])
    start = time.perf_counter()
    ppl = perplexity(model, windows, progress=False)
    ppl_seconds = time.perf_counter() - start
    one = bare_loop(model, [w.unsqueeze(0) for w in windows])
    batched = bare_loop(model, list(windows.split(8)))
    tokens = windows.numel()
    add("perplexity (wiki)", ppl_seconds, tokens, one, f"ppl {ppl:.2f}; bare loop batched x8: {batched:.1f} s")

    # Zero-shot through lm-eval, then the bare loop over the requests it scored.
    from lm_eval.models.huggingface import HFLM

    recorded, original = scored_sequences(HFLM)
    try:
        start = time.perf_counter()
        result = evaluate_zero_shot(model, tokenizer, args.tasks.split(","), limit=args.limit,
                                    batch_size=args.eval_batch_size)
        zs_seconds = time.perf_counter() - start
    finally:
        HFLM._loglikelihood_tokens = original
    batches = padded_batches(recorded, args.eval_batch_size)
    zs_bare = bare_loop(model, batches)
    accs = ", ".join(f"{name} {task['acc']:.3f} (n={task.get('samples')})" for name, task in result["tasks"].items())
    add(f"zero-shot ({args.tasks})", zs_seconds, sum(map(len, recorded)), zs_bare,
        f"{len(recorded)} requests; {accs}")

    print(f"\n{'evaluation':28} {'seconds':>8} {'tokens':>8} {'tokens/s':>9} {'bare s':>8} {'x bare':>7}  note")
    for r in rows:
        print(f"{r['evaluation']:28} {r['seconds']:8.1f} {r['tokens']:8d} {r['tokens_per_s']:9.0f} "
              f"{r['bare_seconds']:8.1f} {r['x_bare']:7.2f}  {r['note']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomically(out / "bench_eval.json", {
        "model": args.model, "limit": args.limit, "eval_batch_size": args.eval_batch_size,
        "machine": benchlib.machine_info(), "rows": rows,
        "fields": {"seconds": "wall seconds of the library call", "bare_seconds": "model(input_ids) over the same "
                   "tokens (perplexity: one window at a time; zero-shot: lm-eval's requests, longest first, padded)",
                   "x_bare": "seconds / bare_seconds", "tokens": "tokens fed to the model, padding excluded"},
    })
    print(f"wrote {out / 'bench_eval.json'}")


if __name__ == "__main__":
    main()
