"""Benchmark llmprune on one model: held-out perplexity, achieved sparsity, wall time per phase and memory
for every method x pattern x allocation, with each prune's time as a multiple of a bare-forward floor.

    python scripts/bench_prune.py [--model llama] [--text wiki] [--quick] [--out results] [--rows FILTER]

Writes <out>/bench.json (everything), <out>/bench.md (a table) and <out>/bench.png (ppl against sparsity);
<out> is results/ for the embedded model on wiki text, results/MODEL/[TEXT/] for another (benchlib.results_folder()).
The model is loaded once; its dense weights are restored before every row.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm.auto import tqdm

import benchlib
from benchlib import SEED
from llmprune import LLMPruneError, PruneConfig, prune
from llmprune.inputs.data import check_source, source_description
from llmprune.inputs.models import decoder_layers, load_model
from llmprune.evaluation.perplexity import perplexity
from llmprune.output.atomic import write_atomically, write_json_atomically, write_text_atomically
from llmprune.runtime import current_rss_bytes, elapsed, peak_rss_bytes, resolve_device, resolve_dtype
from llmprune.pruning.runner import capture_layer_calls, propagate

BATCH_SIZE = PruneConfig().batch_size
METHODS = ("magnitude", "wanda", "sparsegpt")
# Issue 13's methods, (method, update), every shape of the mode: RIA, DSnoT on Wanda, gradual ADMM, ADMM re-fits.
NEW_METHODS = (("ria", "none"), ("dsnot", "none"), ("admm", "none"), ("wanda", "admm"), ("ria", "admm"))
# (sparsity, pattern) per mode; N:M patterns imply their sparsity. OWL rows: {method: sparsities}.
FULL = {"shapes": [(0.5, "unstructured"), (0.6, "unstructured"), (0.7, "unstructured"), (None, "2:4"), (None, "4:8")],
        "owl": {m: (0.6, 0.7) for m in METHODS}, "new": NEW_METHODS, "nsamples": 32, "seqlen": 512, "eval_windows": 40}
QUICK = {"shapes": [(0.5, "unstructured"), (None, "2:4")],
         "owl": {"wanda": (0.7,)}, "nsamples": 4, "seqlen": 128, "eval_windows": 4}
NM_MARKERS = {"2:4": "^", "4:8": "s"}
PHASES = ("capture", "statistics", "solve", "propagate", "allocation")  # PruneReport.seconds keys

FIELDS = {  # written into bench.json, so that every number says what it is
    "ppl": "perplexity on the held-out part of the text, non-overlapping windows of seqlen tokens",
    "achieved_sparsity": "fraction of zeros over all pruned linears, counted after the prune",
    "seconds": "wall seconds: capture/statistics/solve/propagate/allocation are the library's own phases; "
               "prune is the whole prune() call; evaluate is the perplexity pass",
    "x_floor": "seconds.prune / floor.two_pass_s; with --repeats N, the median of N such ratios "
               "(x_floor_repeats), each prune against a floor timed just before it",
    "run_floor": "with --keep-rows, on a row measured by an earlier run: the floor that run timed (its x_floor is "
                 "against that floor, not this file's)",
    "floor": "a bare dense forward of the calibration batches through the decoder layers (capture layer-0 "
             "inputs, then every layer over every batch; inference_mode, no hooks), timed once after a warm-up",
    "peak_rss_bytes": "the process's RSS high-water mark (VmHWM) after the row: it never decreases, so it "
                      "includes the loaded model, the dense copy and every earlier row",
    "peak_rss_increase_bytes": "how much this row raised the high-water mark; 0 means it stayed under an "
                               "earlier peak, not that it allocated nothing",
    "rss_after_bytes": "the current RSS (/proc/self/statm) after the row",
    "ppl_on": "with --also-eval: perplexity on the held-out part of each other text, windows as for ppl (a model "
              "calibrated on one text, measured on another)",
    "zero_shot_mean": "with --tasks: mean accuracy over the tasks (lm-eval, 0-shot, the first --limit documents of "
                      "each); zero_shot holds each task's",
    "memory": "rss_after_load: current RSS once the model is loaded; peak_rss_after_load: the high-water mark "
              "then (loading may peak above what it keeps); peak_rss_before_rows: after reading the text, "
              "copying the dense weights, timing the floor and evaluating the dense model",
}


def method_label(method: str, update: str) -> str:
    return method if update == "none" else f"{method}+{update}"


def row_name(config: PruneConfig) -> str:
    shape = config.pattern if config.nm else f"{config.sparsity:.0%}"
    return f"{method_label(config.method, config.update)}-{shape}-{config.allocation}"


def matrix(mode: dict, **common) -> list[PruneConfig]:
    """Every row of a mode, grouped by method; PruneConfig validates each before the model loads."""
    rows = []
    for method in METHODS:
        rows += [PruneConfig(method=method, sparsity=s, pattern=p, **common) for s, p in mode["shapes"]]
        rows += [PruneConfig(method=method, sparsity=s, allocation="owl", **common) for s in mode["owl"].get(method, ())]
    for method, update in mode.get("new", ()):
        rows += [PruneConfig(method=method, update=update, sparsity=s, pattern=p, **common) for s, p in mode["shapes"]]
    return rows


def select_rows(rows: list[PruneConfig], pattern: str | None) -> list[PruneConfig]:
    return benchlib.select_rows(rows, pattern, row_name)


@torch.inference_mode()
def bare_forward(model, calibration: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """(capture s, layers s) of one dense pass, each layer moved to the device as prune() does.
    The phases are read with the runner's own clock, so ratios compare like with like."""
    _, layers = decoder_layers(model)
    start = time.perf_counter()
    calls = capture_layer_calls(model, layers, calibration, BATCH_SIZE, device, progress=False)
    captured = elapsed(start, device)
    start = time.perf_counter()
    for i, layer in enumerate(layers):
        home = next(layer.parameters()).device
        layer.to(device)
        propagate(layer, i, calls)
        layer.to(home)
    return captured, elapsed(start, device)


def time_floor(model, calibration: torch.Tensor, device: torch.device) -> dict:
    bare_forward(model, calibration[:BATCH_SIZE], device)  # warm-up: thread pool, allocator, lazy inits
    capture_s, layers_s = bare_forward(model, calibration, device)
    one_pass = capture_s + layers_s
    return {"capture_s": capture_s, "layers_s": layers_s, "one_pass_s": one_pass, "two_pass_s": 2 * one_pass}


def zero_shot_scores(model, tokenizer, tasks: str | None, limit: int) -> dict:
    """The mean zero-shot accuracy over `tasks` (lm-eval, offline sets), and each task's; nothing without tasks."""
    result = benchlib.zero_shot(model, tokenizer, tasks, limit)
    return {} if result is None else {"zero_shot_mean": result["mean_acc"], "zero_shot": result}


def other_perplexities(model, windows: dict[str, torch.Tensor], device) -> dict:
    """{"ppl_on": {text: perplexity}} over each --also-eval text's held-out windows; nothing without them."""
    if not windows:
        return {}
    return {"ppl_on": {text: perplexity(model, w, device, progress=False) for text, w in windows.items()}}


def bench_row(model, config: PruneConfig, calibration, windows, device, floor: dict, zero_shot=dict,
              also=dict) -> dict:
    peak_before = peak_rss_bytes()
    start = time.perf_counter()
    report = prune(model, calibration, config, progress=False)
    prune_s = elapsed(start, device)
    start = time.perf_counter()
    ppl = perplexity(model, windows, device, progress=False)
    evaluate_s = time.perf_counter() - start
    scores = zero_shot(model) | also(model)
    seconds = {phase: report.seconds.get(phase, 0.0) for phase in PHASES} | {"prune": prune_s, "evaluate": evaluate_s}
    peak_after = peak_rss_bytes()
    return {"name": row_name(config), "method": method_label(config.method, config.update), "pattern": config.pattern, "sparsity": config.sparsity,
            "allocation": config.allocation, "ppl": ppl, "achieved_sparsity": report.achieved_sparsity,
            "layer_sparsity": report.layer_sparsity, "seconds": seconds, "x_floor": prune_s / floor["two_pass_s"],
            "peak_rss_bytes": peak_after, "peak_rss_increase_bytes": peak_after - peak_before,
            "rss_after_bytes": current_rss_bytes()} | scores


def dense_row(model, windows, device, zero_shot=dict, also=dict) -> dict:
    start = time.perf_counter()
    ppl = perplexity(model, windows, device, progress=False)
    scores = zero_shot(model) | also(model)
    return {"name": "dense", "method": "dense", "pattern": "-", "sparsity": 0.0, "allocation": "-", "ppl": ppl,
            "achieved_sparsity": None, "layer_sparsity": None, "seconds": {"evaluate": time.perf_counter() - start},
            "x_floor": None, "peak_rss_bytes": peak_rss_bytes(), "peak_rss_increase_bytes": None,
            "rss_after_bytes": current_rss_bytes()} | scores


def table_order(row: dict) -> tuple:
    """A row's place in the table: methods in the matrix's order, then unstructured by sparsity, then N:M, each
    allocation together (rows added by --keep-rows runs land in place, not at the end)."""
    labels = ["dense", *METHODS, *(m if update == "none" else f"{m}+{update}" for m, update in NEW_METHODS)]
    method = labels.index(row["method"]) if row["method"] in labels else len(labels)
    return method, row.get("allocation") != "uniform", row.get("pattern", "") != "unstructured", row.get("sparsity") or 0


def markdown(results: dict) -> str:
    floor, calib = results["floor"], results["calibration"]
    zero_shot = any("zero_shot_mean" in row for row in results["rows"])
    others = list(results["evaluation"].get("also", {}))
    earlier = sorted({row["run_floor"]["two_pass_s"] for row in results["rows"] if "run_floor" in row})
    lines = [f"# llmprune benchmark: {results['model']}", "",
             f"Calibration {calib['nsamples']} x {calib['seqlen']} tokens of `{calib['source']}`; perplexity on "
             f"{results['evaluation']['windows']} held-out windows of it. Floor (two bare passes): "
             f"{floor['two_pass_s']:.2f} s. Peak RSS is the process high-water mark after the row."
             + ("" if not earlier else " Rows marked * were measured by an earlier run (--keep-rows) and timed "
                f"against its floor ({', '.join(f'{seconds:.2f} s' for seconds in earlier)})."),
             "",
             "| method | pattern | allocation | ppl | " + "".join(f"ppl on {text} | " for text in others)
             + "achieved | prune s | x floor | peak RSS MiB |" + (" zero-shot mean |" if zero_shot else ""),
             "|---|---|---|---:|" + "---:|" * len(others) + "---:|---:|---:|---:|" + ("---:|" if zero_shot else "")]
    for row in sorted(results["rows"], key=table_order):
        pattern = f"{row['sparsity']:.0%} unstructured" if row["pattern"] == "unstructured" else row["pattern"]
        pruned = row["method"] != "dense"
        cells = [row["method"], pattern, row["allocation"], f"{row['ppl']:.2f}",
                 *(f"{row['ppl_on'][text]:.2f}" for text in others),
                 f"{row['achieved_sparsity']:.3f}" if pruned else "-",
                 f"{row['seconds']['prune']:.1f}" if pruned else "-",
                 (f"{row['x_floor']:.2f}" + ("*" if "run_floor" in row else "")) if pruned else "-",
                 f"{row['peak_rss_bytes'] / 2**20:.0f}"]
        if zero_shot:
            cells.append(f"{row['zero_shot_mean']:.4f}" if "zero_shot_mean" in row else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """ppl against sparsity: a line per method+allocation (unstructured), a marker per N:M row, dense as a reference."""
    figure = Figure(figsize=(10, 5))
    FigureCanvasAgg(figure)  # a private Agg canvas: no pyplot, no global backend state
    axes = figure.subplots()
    pruned = [row for row in results["rows"] if row["method"] != "dense" and math.isfinite(row["ppl"])]
    methods = list(dict.fromkeys(row["method"] for row in pruned))  # method+update labels, in row order
    colours = {method: f"C{i % 10}" for i, method in enumerate(methods)}
    for method in methods:
        for allocation, style in (("uniform", "-"), ("owl", "--")):
            points = sorted((r["sparsity"], r["ppl"]) for r in pruned if r["method"] == method
                            and r["allocation"] == allocation and r["pattern"] == "unstructured")
            if points:
                sparsities, ppls = zip(*points, strict=True)
                axes.plot(sparsities, ppls, style, marker="o", color=colours[method], label=f"{method} ({allocation})")
        for row in (r for r in pruned if r["method"] == method and r["pattern"] != "unstructured"):
            axes.scatter(row["sparsity"], row["ppl"], marker=NM_MARKERS.get(row["pattern"], "D"), s=60,
                         color=colours[method], zorder=3, label=f"{method} {row['pattern']}")
    axes.axhline(results["dense_ppl"], color="black", linestyle=":", label=f"dense ({results['dense_ppl']:.2f})")
    axes.set(yscale="log", xlabel="sparsity", ylabel="held-out perplexity (log scale)", title=results["model"])
    axes.legend(fontsize="small", ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: no point hidden
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=120)


def write_json(out: Path, results: dict) -> None:
    write_json_atomically(out / "bench.json", results)


def kept_rows(path: Path, redone: set[str], settings: dict) -> list[dict]:
    """--keep-rows: the rows of an earlier bench.json that this run does not redo, each carrying the floor it was
    timed against (`run_floor`), so that a 0.5B model's matrix can be measured in several runs into one file. The
    earlier run must have cut the same calibration and held-out windows, or its perplexities would not compare."""
    if not path.exists():
        return []
    previous = json.loads(path.read_text())
    calib, evaluation = previous.get("calibration", {}), previous.get("evaluation", {})
    then = {"text": calib.get("source"), "nsamples": calib.get("nsamples"), "seqlen": calib.get("seqlen"),
            "seed": calib.get("seed"), "eval_windows": evaluation.get("windows"),
            "also_eval": sorted(evaluation.get("also", {}))}
    if settings["eval_windows"] == 0:  # all windows: whatever count the text gave then
        then["eval_windows"] = 0
    benchlib.refuse_other_settings("bench_prune", path, then, settings)
    return [{"run_floor": previous["floor"]} | row for row in previous["rows"]
            if row["method"] != "dense" and row["name"] not in redone]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama", help="anything load_model accepts: an alias (llama, "
                   "qwen-coder-0.5b), a local HF dir, a .gguf")
    p.add_argument("--text", default="wiki", help="text source of the calibration and held-out perplexity windows "
                   "(wiki, code: the running Python's standard library, file:PATH...)")
    p.add_argument("--quick", action="store_true", help="smoke run: 4 x 128 calibration, 4 eval windows, 7 rows")
    p.add_argument("--out", help="folder for bench.json, bench.md, bench.png (default: results, or "
                   "results/MODEL[/TEXT] for another model or text)")
    p.add_argument("--rows", metavar="REGEX", help="only rows whose method-pattern-allocation name matches, "
                   "e.g. wanda, 2:4, owl, sparsegpt-60%%")
    p.add_argument("--also-eval", metavar="TEXTS", default="", help="comma list of other texts to measure every "
                   "row's held-out perplexity on too, e.g. wiki for a code-calibrated run (default: none)")
    p.add_argument("--nsamples", type=int, help="calibration windows (default 32; --quick 4)")
    p.add_argument("--seqlen", type=int, help="tokens per calibration and eval window (default 512; --quick 128)")
    p.add_argument("--eval-windows", type=int, help="held-out perplexity windows, 0 = all (default 40; --quick 4)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--tasks", help="zero-shot tasks or suite for every row too, e.g. wanda-suite (default: none; "
                   "minutes per row: select the rows that matter with --rows)")
    p.add_argument("--limit", type=int, default=100, help="documents per zero-shot task (default 100)")
    p.add_argument("--repeats", type=int, default=1, help="time each row's prune N times, each against a floor "
                   "timed just before it, and report the median ratio (a shared or virtual CPU's speed drifts "
                   "by tens of percent over minutes; default 1: one floor for the whole run)")
    p.add_argument("--keep-rows", action="store_true", help="keep the rows of the bench.json already in --out that "
                   "this run does not redo (each with the floor it was timed against), instead of replacing the "
                   "file: a large model's matrix measured in several runs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    mode = QUICK if args.quick else FULL
    if args.repeats < 1:
        raise SystemExit(f"bench_prune: error: --repeats must be at least 1 (got {args.repeats})")
    nsamples, seqlen, eval_count = (mode[key] if getattr(args, key) is None else getattr(args, key)
                                    for key in ("nsamples", "seqlen", "eval_windows"))
    device = resolve_device(args.device)
    rows = select_rows(matrix(mode, nsamples=nsamples, seqlen=seqlen, seed=SEED, device=args.device), args.rows)
    out = Path(args.out) if args.out else benchlib.results_folder(args.model, args.text)
    out.mkdir(parents=True, exist_ok=True)
    check_source(args.text, "calib", nsamples * seqlen, "--nsamples or --seqlen")
    other_texts = [text for text in args.also_eval.split(",") if text]
    for text in other_texts:  # a bad source fails now, not after the model is loaded
        check_source(text, "eval", seqlen, "--seqlen")
    settings = {"text": args.text, "nsamples": nsamples, "seqlen": seqlen, "seed": SEED, "eval_windows": eval_count,
                "also_eval": sorted(other_texts)}
    earlier = kept_rows(out / "bench.json", {row_name(c) for c in rows}, settings) if args.keep_rows else []

    if args.tasks:  # an unknown task fails now, not after the floor and the dense evaluation
        from llmprune.evaluation.zeroshot import resolve_tasks

        resolve_tasks(args.tasks)
    model, tokenizer, _ = load_model(args.model, resolve_dtype("auto", device))
    memory = {"rss_after_load_bytes": current_rss_bytes(), "peak_rss_after_load_bytes": peak_rss_bytes()}
    calibration = benchlib.calibration(tokenizer, nsamples, seqlen, source=args.text)
    windows = benchlib.held_out(tokenizer, seqlen, eval_count, source=args.text)
    other_windows = {text: benchlib.held_out(tokenizer, seqlen, eval_count, source=text) for text in other_texts}
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    floor = time_floor(model, calibration, device)
    print(f"floor: one bare pass {floor['one_pass_s']:.2f} s (capture {floor['capture_s']:.2f} s + layers "
          f"{floor['layers_s']:.2f} s); two passes {floor['two_pass_s']:.2f} s", flush=True)

    zero_shot = functools.partial(zero_shot_scores, tokenizer=tokenizer, tasks=args.tasks, limit=args.limit)
    also = functools.partial(other_perplexities, windows=other_windows, device=device)
    dense = dense_row(model, windows, device, zero_shot, also)
    memory["peak_rss_before_rows_bytes"] = peak_rss_bytes()
    results = {"complete": False, "model": benchlib.model_name(args.model), "architecture": type(model).__name__,
               "dtype": str(next(model.parameters()).dtype), "machine": benchlib.machine_info(device),
               "calibration": {"source": args.text, "description": source_description(args.text), "part": "calib", "nsamples": nsamples, "seqlen": seqlen,
                               "seed": SEED, "batch_size": BATCH_SIZE},
               "evaluation": {"source": args.text, "part": "eval", "windows": len(windows), "seqlen": seqlen,
                              "also": {text: len(w) for text, w in other_windows.items()}},
               "floor": floor, "dense_ppl": dense["ppl"], "memory": memory, "fields": FIELDS, "rows": [dense]}
    results["rows"] += earlier
    write_json(out, results)  # and after every row: an interrupted run keeps what it measured
    bar = tqdm(rows, desc="bench", unit="row")
    for config in bar:
        bar.set_postfix_str(row_name(config))
        ratios = []
        for _ in range(args.repeats - 1):  # timing only, each prune against a floor timed just before it
            model.load_state_dict(dense_state)
            row_floor = time_floor(model, calibration, device)
            start = time.perf_counter()
            prune(model, calibration, config, progress=False)
            ratios.append(elapsed(start, device) / row_floor["two_pass_s"])
        model.load_state_dict(dense_state)
        row_floor = time_floor(model, calibration, device) if args.repeats > 1 else floor
        row = bench_row(model, config, calibration, windows, device, row_floor, zero_shot, also)
        if args.repeats > 1:
            row["x_floor_repeats"] = [*ratios, row["x_floor"]]
            row["x_floor"] = statistics.median(row["x_floor_repeats"])
        results["rows"].append(row)
        tqdm.write(f"{row['name']}: ppl {row['ppl']:.2f}, achieved {row['achieved_sparsity']:.3f}, "
                   f"prune {row['seconds']['prune']:.1f} s = {row['x_floor']:.2f} x floor")
        write_json(out, results)

    results["complete"] = True
    results["machine"]["load_average_at_end"] = benchlib.load_average()
    write_json(out, results)
    table = markdown(results)
    write_text_atomically(out / "bench.md", table)
    write_atomically(out / "bench.png", lambda p: plot(results, p))
    print(table)
    return results


if __name__ == "__main__":
    try:
        main()
    except LLMPruneError as err:  # a user's mistake (bad --model, too little text): the message, no traceback
        raise SystemExit(f"bench_prune: error: {err}") from None
