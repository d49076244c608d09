"""Benchmark structured pruning: what removing MLP channels, attention heads or whole layers buys in size and
speed, and costs in perplexity, against the dense model measured in the same run.

    python scripts/bench_structured.py [--model llama] [--text wiki] [--quick] [--out results] [--rows REGEX]
                                       [--tasks SUITE]
    python scripts/bench_structured.py --gpu-7b [--out results]      # on a CUDA machine only

Rows: every structure x importance at 10/20/30% of the structure (channels and heads: magnitude, wanda, flap,
taylor; layers: block influence and skip loss), plus 50% unstructured Wanda and SparseGPT (same shapes, so the
same size and speed as dense). Each row: held-out perplexity, parameters (all, and of the decoder layers),
safetensors size, prune time, and speed against dense: prefill latency of 1 x 512 tokens and greedy decode
tokens/s (128 new tokens, KV cache, batch 1). Dense and pruned are timed alternately, `--repeats` pairs, and
the speedup is the median of the per-pair ratios, so the machine's drift does not decide it.

`--quick` runs on a tiny random Llama with random tokens in seconds (a smoke test of the script, not a
measurement; with another --model, on that model and --text). <out> is results/ for the embedded model on wiki
text, results/MODEL/[TEXT/] for another (benchlib.results_folder).
`--gpu-7b` times a random-weight LLaMA-7B-shaped model, dense and with 20% of its MLP
channels removed, in bfloat16 on the GPU. Writes <out>/structured.json (or structured_gpu.json) and a PNG.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import benchlib
from benchlib import SEED
from llmprune import LLMPruneError, PruneConfig, prune
from llmprune.evaluation.perplexity import perplexity
from llmprune.inputs.data import source_description
from llmprune.inputs.models import load_model
from llmprune.output.atomic import write_atomically, write_json_atomically
from llmprune.pruning.structured import StructuredConfig, prune_structured
SPARSITIES = (0.1, 0.2, 0.3)
STRUCTURES = {"channels": ("magnitude", "wanda", "flap", "taylor"), "heads": ("magnitude", "wanda", "flap", "taylor"),
              "layers": ("influence", "skip_loss")}
UNSTRUCTURED = ("wanda", "sparsegpt")
FULL = {"nsamples": 32, "seqlen": 512, "eval_windows": 40, "prefill": 512, "decode": 128, "repeats": 5, "round_to": 64}
QUICK = {"nsamples": 4, "seqlen": 64, "eval_windows": 4, "prefill": 64, "decode": 8, "repeats": 2, "round_to": 16}

FIELDS = {
    "ppl": "perplexity on held-out windows of seqlen tokens (the papers' protocol)",
    "params": "all parameters (a tied embedding once); decoder_params: those of the decoder layers",
    "params_removed_fraction": "1 - params / dense params; decoder_params_removed_fraction likewise",
    "safetensors_bytes": "total size of the *.safetensors files save_pretrained writes",
    "prune_s": "wall seconds of the prune call",
    "prefill": "seconds of one forward of 1 x prefill tokens (no cache); median over repeats, dense and pruned "
               "timed alternately; speedup = median over pairs of dense_s / pruned_s",
    "decode": "tokens/s of greedy generate of `decode` new tokens after an 8-token prompt, KV cache, batch 1; "
              "speedup = median over pairs of pruned tok/s / dense tok/s",
    "zero_shot_mean": "mean accuracy of the --tasks suite (lm-eval, --limit documents per task), if asked",
}


def row_configs(mode_rows: str | None, round_to: int, decoder_fraction: float | None = None,
                target_params: str | None = None):
    """Every structure x importance x sparsity of the structure; with `decoder_fraction`, one row per structure x
    importance instead, pruned to `target_params` (that fraction of the decoder's parameters removed)."""
    rows = []
    sizes = [(f"{decoder_fraction:.0%}decoder", {"target_params": target_params})] if decoder_fraction else \
        [(f"{sparsity:.0%}", {"sparsity": sparsity}) for sparsity in SPARSITIES]
    for structure, methods in STRUCTURES.items():
        for method in methods:
            for size, sizing in sizes:
                options = {"layer_importance": method} if structure == "layers" else {"method": method}
                rows.append((f"{structure}-{method}-{size}", "structured",
                             StructuredConfig(structure, round_to=round_to, **sizing, **options)))
    for method in UNSTRUCTURED:
        rows.append((f"unstructured-{method}-50%", "unstructured", PruneConfig(method=method, sparsity=0.5)))
    return benchlib.select_rows(rows, mode_rows, lambda row: row[0])


@torch.inference_mode()
def prefill_seconds(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    _sync(ids.device)
    return time.perf_counter() - start


@torch.inference_mode()
def decode_tokens_per_second(model, prompt: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                   pad_token_id=0)
    _sync(prompt.device)
    return new_tokens / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(measure, dense, pruned, repeats: int, higher_is_faster: bool) -> dict:
    """Alternate dense and pruned `repeats` times after one warm-up each; ratios pair neighbours in time."""
    measure(dense), measure(pruned)
    pairs = [(measure(dense), measure(pruned)) for _ in range(repeats)]
    ratios = [p / d if higher_is_faster else d / p for d, p in pairs]
    return {"dense": statistics.median(d for d, _ in pairs), "pruned": statistics.median(p for _, p in pairs),
            "speedup": statistics.median(ratios), "pairs": pairs}


def safetensors_bytes(model, tokenizer=None, keep: Path | None = None) -> int:
    """The size of the model's safetensors files; with `keep`, saved there (with the tokenizer) to be used later."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = keep or Path(scratch)
        model.save_pretrained(folder)
        if keep is not None and tokenizer is not None:
            tokenizer.save_pretrained(folder)
        return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def speed(dense, model, mode, device, vocab) -> dict:
    g = torch.Generator().manual_seed(SEED)
    prefill_ids = torch.randint(0, vocab, (1, mode["prefill"]), generator=g).to(device)
    prompt = torch.randint(0, vocab, (1, 8), generator=g).to(device)
    return {"prefill_s": interleaved(lambda m: prefill_seconds(m, prefill_ids), dense, model, mode["repeats"], False),
            "decode_tok_s": interleaved(lambda m: decode_tokens_per_second(m, prompt, mode["decode"]), dense, model,
                                        mode["repeats"], True)}


def parameters(model) -> tuple[int, int]:
    from llmprune.inputs.models import decoder_layers
    from llmprune.runtime import parameter_count

    return parameter_count(model.parameters()), parameter_count(decoder_layers(model)[1].parameters())


def zero_shot(model, tokenizer, tasks, limit):
    return None if tokenizer is None else benchlib.zero_shot_mean(model, tokenizer, tasks, limit)


def bench_row(name, kind, config, dense, calibration, windows, mode, device, vocab, tokenizer, args) -> dict:
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    try:
        if kind == "structured":
            config = dataclasses.replace(config, device=args.device)
            record = prune_structured(model, calibration, config, progress=False).structure.to_dict()
        else:
            config = dataclasses.replace(config, seqlen=calibration.shape[1])
            record = prune(model, calibration, config, progress=False).to_dict()
    except LLMPruneError as err:  # e.g. 10% of 3 KV groups removes none: recorded, not fatal
        return {"name": name, "error": str(err)}
    prune_s = time.perf_counter() - start
    params, decoder = parameters(model)
    dense_params, dense_decoder = parameters(dense)
    sparsity = record["sparsity"] if kind == "structured" else config.sparsity  # a --target-params prune's own
    row = {"name": name, "kind": kind, "sparsity": sparsity, "prune_s": prune_s,
           "ppl": perplexity(model, windows, device, progress=False), "params": params, "decoder_params": decoder,
           "params_removed_fraction": 1 - params / dense_params,
           "decoder_params_removed_fraction": 1 - decoder / dense_decoder,
           "safetensors_bytes": safetensors_bytes(model, tokenizer, args.save_dir and Path(args.save_dir) / name),
           "zero_shot_mean": zero_shot(model, tokenizer, args.tasks, args.limit)}
    model.to(device)
    row |= speed(dense, model, mode, device, vocab)
    row["structure"] = {k: v for k, v in record.items() if k not in ("layers",)} if kind == "structured" else None
    if kind == "structured" and record["layers"]:
        row["structure"]["kept_per_layer"] = [entry["kept"] for entry in record["layers"]]
    return row


def tiny_random_llama():
    """--quick: a tiny random Llama (no download), random token windows instead of text. Six heads in two KV
    groups of three: a 10% head prune removes no head there, which the row records instead of failing."""
    from llmprune.testing import tiny_model

    return tiny_model("llama", layers=6, hidden=96, intermediate=256, heads=6, vocab=256, seed=SEED)


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(figure)
    ppl_axes, prefill_axes, decode_axes = figure.subplots(1, 3)
    rows = [r for r in results["rows"] if "error" not in r and r["kind"] == "structured"]
    series = sorted({r["name"].rsplit("-", 1)[0] for r in rows})
    for i, label in enumerate(series):
        points = sorted(((r["decoder_params_removed_fraction"], r) for r in rows if r["name"].rsplit("-", 1)[0] == label),
                        key=lambda point: point[0])
        x = [p for p, _ in points]
        style = {"color": f"C{i % 10}", "marker": "o", "label": label}
        ppl_axes.plot(x, [r["ppl"] for _, r in points], **style)
        prefill_axes.plot(x, [r["prefill_s"]["speedup"] for _, r in points], **style)
        decode_axes.plot(x, [r["decode_tok_s"]["speedup"] for _, r in points], **style)
    ppl_axes.axhline(results["dense"]["ppl"], color="black", linestyle=":", label="dense")
    ppl_axes.set(yscale="log", xlabel="decoder parameters removed", ylabel="held-out perplexity (log)")
    for axes, what in ((prefill_axes, f"prefill 1x{results['mode']['prefill']}"),
                       (decode_axes, f"decode {results['mode']['decode']} tokens")):
        axes.axhline(1.0, color="black", linestyle=":")
        axes.set(xlabel="decoder parameters removed", ylabel=f"{what}: speedup over dense")
    ppl_axes.legend(fontsize="x-small", ncol=2)
    figure.suptitle(f"structured pruning: {results['model']} ({results['machine']['device']})")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=110)


def gpu_7b(args) -> dict:
    """Random-weight LLaMA-7B shape (4096 / 11008 / 32 heads / 32 layers), bf16 on the GPU: dense against
    20% of the MLP channels removed (magnitude, widths rounded to 64), prefill 1 x 512 and decode 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device or "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        raise SystemExit("--gpu-7b needs a CUDA GPU")
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                         num_hidden_layers=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(SEED)
    with device:
        dense = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    record = prune_structured(model, None, StructuredConfig("channels", method="magnitude", sparsity=0.2,
                                                            device=str(device)), progress=False).structure
    results = {"model": "random llama-7b shape, bfloat16", "machine": benchlib.machine_info(device) | {
        "gpu": torch.cuda.get_device_name(device)}, "prune_s": time.perf_counter() - start,
        "intermediate_size": model.config.intermediate_size,
        "decoder_params_removed_fraction": record.decoder_params_removed_fraction,
        "params_removed_fraction": record.params_removed_fraction,
        "speed": speed(dense, model, FULL | {"repeats": args.repeats or 10}, device, 32000)}
    return results


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama", help="anything load_model accepts (default: the embedded SmolLM2-135M; "
                   "qwen-coder-0.5b: Qwen2.5-Coder-0.5B-Instruct)")
    p.add_argument("--text", default="wiki", help="text source of the calibration and held-out perplexity windows "
                   "(wiki, code: the running Python's standard library, file:PATH...)")
    p.add_argument("--quick", action="store_true", help="tiny random Llama and random tokens: a smoke run in seconds")
    p.add_argument("--out", help="folder for structured.json and structured.png (default: results, or "
                   "results/MODEL[/TEXT] for another model or text)")
    p.add_argument("--rows", metavar="REGEX", help="only rows whose name matches, e.g. 'channels-flap', 'layers'")
    p.add_argument("--repeats", type=int, help="dense/pruned timing pairs per row (default 5; --quick 2)")
    p.add_argument("--tasks", help="zero-shot suite per row, e.g. the offline suite name (slow; default none)")
    p.add_argument("--limit", type=int, default=100, help="documents per zero-shot task (default 100)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cpu for this CPU benchmark)")
    p.add_argument("--decoder-fraction", type=float, metavar="F", help="one row per structure x importance, each "
                   "pruned to remove this fraction of the decoder layers' parameters (e.g. 0.2; embeddings kept) "
                   "instead of 10/20/30%% of the structure; a structure that cannot remove that much records why")
    p.add_argument("--save-dir", metavar="DIR", help="also save every pruned model (and tokenizer) as DIR/ROW, an "
                   "ordinary HF folder for bench_deploy, recovery or zero-shot (default: not kept)")
    p.add_argument("--gpu-7b", action="store_true", help="only the random 7B-shaped bf16 timing on a CUDA GPU")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # save_pretrained's shard bar, once per row
    if args.out is None:
        args.out = benchlib.results_folder(args.model, args.text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.gpu_7b:
        results = gpu_7b(args)
        write_json_atomically(out / "structured_gpu.json", results)
        print(json.dumps({k: v for k, v in results.items() if k != "speed"} | {
            "prefill_speedup": results["speed"]["prefill_s"]["speedup"],
            "decode_speedup": results["speed"]["decode_tok_s"]["speedup"]}, indent=2))
        return results
    if args.decoder_fraction is not None and not 0 < args.decoder_fraction < 1:
        raise SystemExit(f"bench_structured: error: --decoder-fraction must be in (0, 1) (got {args.decoder_fraction})")
    mode = dict(QUICK if args.quick else FULL)
    row_configs(args.rows, mode["round_to"], args.decoder_fraction)  # a matchless --rows fails now, not after loading
    if args.repeats:
        mode["repeats"] = args.repeats
    device = torch.device(args.device or "cpu")
    tokenizer = None
    if args.quick and args.model == "llama":
        dense = tiny_random_llama()
        g = torch.Generator().manual_seed(SEED)
        calibration = torch.randint(0, 256, (mode["nsamples"], mode["seqlen"]), generator=g)
        windows = torch.randint(0, 256, (mode["eval_windows"], mode["seqlen"]), generator=g)
        name = "tiny random llama (--quick)"
    else:
        dense, tokenizer, _ = load_model(args.model, "float32")
        calibration = benchlib.calibration(tokenizer, mode["nsamples"], mode["seqlen"], source=args.text)
        windows = benchlib.held_out(tokenizer, mode["seqlen"], mode["eval_windows"], source=args.text)
        name = benchlib.model_name(args.model)  # the real model (SmolLM2-135M-Instruct), not the alias
    dense.to(device)
    vocab = dense.config.vocab_size
    params, decoder = parameters(dense)
    results = {"complete": False, "model": name, "architecture": type(dense).__name__, "mode": mode,
               "text": None if tokenizer is None else {"source": args.text,
                                                       "description": source_description(args.text)},
               "machine": benchlib.machine_info(device), "fields": FIELDS,
               "dense": {"ppl": perplexity(dense, windows, device, progress=False), "params": params,
                         "decoder_params": decoder, "safetensors_bytes": safetensors_bytes(dense),
                         "zero_shot_mean": zero_shot(dense, tokenizer, args.tasks, args.limit)},
               "rows": []}
    print(f"dense: ppl {results['dense']['ppl']:.2f}, {params / 1e6:.1f} M parameters", flush=True)
    target = benchlib.decoder_fraction_target(dense, args.decoder_fraction) if args.decoder_fraction else None
    results["decoder_fraction"], results["target_params"] = args.decoder_fraction, target
    for row_name, kind, config in row_configs(args.rows, mode["round_to"], args.decoder_fraction, target):
        row = bench_row(row_name, kind, config, dense, calibration, windows, mode, device, vocab, tokenizer, args)
        results["rows"].append(row)
        if "error" in row:
            print(f"{row_name}: skipped: {row['error']}", flush=True)
        else:
            print(f"{row_name}: ppl {row['ppl']:.2f}, decoder params -{row['decoder_params_removed_fraction']:.1%}, "
                  f"prefill x{row['prefill_s']['speedup']:.2f}, decode x{row['decode_tok_s']['speedup']:.2f}, "
                  f"prune {row['prune_s']:.1f} s", flush=True)
        write_json_atomically(out / "structured.json", results)  # after every row: an interrupted run keeps what it measured
    results["complete"] = True
    results["machine"]["load_average_at_end"] = benchlib.load_average()
    write_json_atomically(out / "structured.json", results)
    write_atomically(out / "structured.png", lambda partial: plot(results, partial))
    return results


if __name__ == "__main__":
    try:
        main()
    except LLMPruneError as err:
        raise SystemExit(f"bench_structured: error: {err}") from None
