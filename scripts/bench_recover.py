"""Benchmark recovery recipes after pruning: held-out perplexity (the training text, and an unrelated one), zero-shot,
minutes and peak memory, for LoRA + LM loss (today's), LoRA + distillation and full + distillation, at the default
token budget and four times it.

    python scripts/bench_recover.py [--model llama] [--text wiki] [--quick] [--out results] [--rows REGEX]
                                    [--tasks wanda-suite]

Writes <out>/recover.json (everything, rewritten after every row) and <out>/recover.png (validation perplexity
against training tokens, a panel per prune). Each prune runs once, in its own process, and is saved to a temporary
folder; each row (prune x recipe x budget) then runs in a fresh process, so its peak RSS is its own: the dense
model's teacher pass (distillation), then the pruned model's training and evaluation. --quick builds a tiny random
Llama and runs everything in this process in seconds (a smoke test; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

import torch

import benchlib
from benchlib import SEED, TEXT
# What each prune row does. A sparse prune is a PruneConfig; a structured one shrinks the model in place
# (channels: FLAP, the structured benchmark's best at 20%; layers: by influence) and keeps no mask.
PRUNES = {"wanda-50%": {"method": "wanda", "sparsity": 0.5},
          "sparsegpt-50%": {"method": "sparsegpt", "sparsity": 0.5},
          "sparsegpt-2:4": {"method": "sparsegpt", "pattern": "2:4"}}


def shrink(structure: str, sparsity: float, model, calibration):
    from llmprune.pruning.structured.config import StructuredConfig
    from llmprune.pruning.structured.runner import prune_structured

    return prune_structured(model, calibration, StructuredConfig(structure=structure, sparsity=sparsity),
                            progress=False).structure


def shrink_decoder(structure: str, fraction: float, model, calibration):
    """The structure pruned until `fraction` of the decoder layers' parameters is gone (embeddings kept)."""
    from llmprune.pruning.structured.config import StructuredConfig
    from llmprune.pruning.structured.runner import prune_structured

    config = StructuredConfig(structure=structure, target_params=benchlib.decoder_fraction_target(model, fraction))
    return prune_structured(model, calibration, config, progress=False).structure


STRUCTURED = {"channels-20%": functools.partial(shrink, "channels", 0.2),
              "layers-20%": functools.partial(shrink, "layers", 0.2),
              # 20% of the decoder's parameters: issue 22's size, where embeddings are a large share of the model
              "channels-20%decoder": functools.partial(shrink_decoder, "channels", 0.2),
              "layers-20%decoder": functools.partial(shrink_decoder, "layers", 0.2)}
DEFAULT_PRUNES = ("wanda-50%", "sparsegpt-2:4")
RECIPES = {"lora-lm": {"loss": "lm", "params": "lora"},
           "lora-distill": {"loss": "distill", "params": "lora"},
           "full-distill": {"loss": "distill", "params": "full"},
           # the same, plus the hidden-state term on 4 evenly spaced dense layers' outputs (those that survive)
           "full-distill-hidden": {"loss": "distill", "params": "full", "distill_hidden": 1.0}}
# Goals as a multiple of the dense held-out perplexity on the training text, and minutes (keys are prune-name
# prefixes, the first match counts): issue 22's for 20% of the decoder's parameters, issue 12's for the rest.
GOALS = {"x_dense": {"channels-20%decoder": 1.25, "layers-20%decoder": 1.25, "sparsegpt-50%": 1.2, "wanda-50%": 1.2,
                     "sparsegpt-2:4": 1.5, "channels": 1.3, "layers": 1.3},
         "minutes": {"channels-20%decoder": 30, "layers-20%decoder": 30, "": 15}, "peak_rss_x_prune": 2.0}
FULL = {"budgets": {"1x": 100, "4x": 400}, "batch": 2, "seqlen": 256, "val_windows": 8, "eval_every": 25,
        "nsamples": 32, "calib_seqlen": 512, "eval_seqlen": 512, "eval_windows": 40}
QUICK = {"budgets": {"1x": 4, "4x": 16}, "batch": 2, "seqlen": 32, "val_windows": 2, "eval_every": 4,
         "nsamples": 4, "calib_seqlen": 64, "eval_seqlen": 64, "eval_windows": 4}
FIELDS = {
    "ppl": "held-out perplexity, non-overlapping windows of eval_seqlen: the training text's (--text) eval part, "
           "and an unrelated text never trained on: the news text (gensim's lee_background.cor) for wiki, wiki for "
           "another text",
    "x_dense": "ppl / the dense model's ppl on the same text",
    "minutes": "teacher: the dense top-k pass (distillation only); recover: train_recovery, validation included; "
               "total: both (the prune itself is in prunes[...].minutes and runs once per prune)",
    "peak_rss_bytes": "the row process's RSS high-water mark: teacher pass, training, perplexity (not the prune; "
                      "taken before zero-shot, whose lm-eval datasets would dominate it)",
    "prune_peak_rss_bytes": "the prune process's high-water mark: load, calibrate, prune, perplexity (before "
                            "zero-shot)",
    "curve": "train_recovery's validation curve: step, tokens, mean train loss since the last point, val_ppl on "
             "the last val_windows windows of the training text",
}


def news_path() -> Path:
    import gensim

    return Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor"


def eval_texts(text: str) -> dict[str, str]:
    """name -> source of the held-out texts: the training text's own eval part, then one never trained on."""
    return {text: text, "news": f"file:{news_path()}"} if text == TEXT else {text: text, TEXT: TEXT}


def held_out(tokenizer, mode: dict, text: str) -> dict[str, torch.Tensor]:
    return {name: benchlib.held_out(tokenizer, mode["eval_seqlen"], mode["eval_windows"], source)
            for name, source in eval_texts(text).items()}


def recovery_config(recipe: str, steps: int, mode: dict):
    from llmprune.config import RecoverConfig

    return RecoverConfig(**RECIPES[recipe], steps=steps, batch=mode["batch"], seqlen=mode["seqlen"],
                         val_windows=mode["val_windows"], eval_every=mode["eval_every"], seed=SEED)


def perplexities(model, windows: dict[str, torch.Tensor], device) -> dict[str, float]:
    from llmprune.evaluation.perplexity import perplexity

    return {name: perplexity(model, w, device, progress=False) for name, w in windows.items()}


def load(model_spec: str, device):
    from llmprune.inputs.models import load_model
    from llmprune.runtime import resolve_dtype

    model, tokenizer, _ = load_model(model_spec, resolve_dtype("auto", device))
    return model.to(device), tokenizer


def dense_job(args, mode: dict) -> dict:
    """The dense model's held-out perplexities, its validation perplexity (the curves' floor) and zero-shot mean."""
    from llmprune.evaluation.perplexity import perplexity
    from llmprune.recovery.train import recovery_windows
    from llmprune.runtime import peak_rss_bytes, resolve_device

    device = resolve_device(args.device)
    model, tokenizer = load(args.model, device)
    _, val = recovery_windows(benchlib.text_tokens(tokenizer, "calib", args.text), recovery_config("lora-lm", 1, mode))
    return {"ppl": perplexities(model, held_out(tokenizer, mode, args.text), device),
            "val_ppl": perplexity(model, val, device, progress=False),
            "peak_rss_bytes": peak_rss_bytes(), "zero_shot_mean": benchlib.zero_shot_mean(model, tokenizer, args.tasks, args.limit)}


def prune_job(args, mode: dict, name: str, folder: str) -> dict:
    """Prune once, evaluate, and save the pruned model (a plain HF folder) for the rows to start from."""
    from llmprune import PruneConfig, prune
    from llmprune.runtime import peak_rss_bytes, resolve_device

    device = resolve_device(args.device)
    start = time.perf_counter()
    model, tokenizer = load(args.model, device)
    calibration = benchlib.calibration(tokenizer, mode["nsamples"], mode["calib_seqlen"], args.text)
    kept_layers = None
    if name in STRUCTURED:
        kept_layers = STRUCTURED[name](model, calibration).kept_layers()
        masks = None
    else:
        report = prune(model, calibration, PruneConfig(**PRUNES[name], nsamples=mode["nsamples"],
                                                       seqlen=mode["calib_seqlen"], seed=SEED, device=args.device),
                       progress=False)
        masks = [layer["name"] for layer in report.layers]
    minutes = (time.perf_counter() - start) / 60
    result = {"minutes": minutes, "ppl": perplexities(model, held_out(tokenizer, mode, args.text), device),
              "peak_rss_bytes": peak_rss_bytes(), "zero_shot_mean": benchlib.zero_shot_mean(model, tokenizer, args.tasks, args.limit),
              "masked_linears": masks, "kept_layers": kept_layers}
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (Path(folder) / "bench_prune.json").write_text(json.dumps(result))
    return result


def row_job(args, mode: dict, prune_name: str, folder: str, recipe: str, budget: str) -> dict:
    """Teacher pass on the dense model (distillation), then the pruned model's recovery and evaluation. Only
    distillation loads the dense model (its memory is given back before the pruned one loads): a row on the LM
    loss takes its tokens from the tokenizer saved beside the prune, so its peak RSS is the recovery's own."""
    import gc

    from llmprune.inputs.models import decoder_layers
    from llmprune.recovery.distill import evenly_spaced_layers, teacher_topk
    from llmprune.recovery.train import recovery_windows, train_recovery
    from llmprune.runtime import peak_rss_bytes, release_free_memory, resolve_device

    device = resolve_device(args.device)
    config = recovery_config(recipe, mode["budgets"][budget], mode)
    teacher, teacher_minutes = None, 0.0
    if config.loss == "distill":
        model, tokenizer = load(args.model, device)
        train, val = recovery_windows(benchlib.text_tokens(tokenizer, "calib", args.text), config)
        start = time.perf_counter()
        hidden_layers = evenly_spaced_layers(len(decoder_layers(model)[1]), config.distill_hidden_layers) \
            if config.distill_hidden else ()
        teacher = teacher_topk(model, train, config.distill_topk, batch_size=4, progress=not args.quick,
                               temperature=config.distill_temperature, hidden_layers=hidden_layers)
        teacher_minutes = (time.perf_counter() - start) / 60
        del model
        gc.collect()
        release_free_memory()

    model, tokenizer = load(folder, device)
    if teacher is None:
        train, val = recovery_windows(benchlib.text_tokens(tokenizer, "calib", args.text), config)
    pruned = json.loads((Path(folder) / "bench_prune.json").read_text())
    masked = pruned["masked_linears"]
    masks = {} if masked is None else {name: model.get_submodule(name).weight != 0 for name in masked}
    stats = train_recovery(model, train, val, config, teacher=teacher, masks=masks, progress=not args.quick,
                           kept_layers=pruned.get("kept_layers"))
    return {"teacher_minutes": teacher_minutes, "recovery": stats,
            "ppl": perplexities(model, held_out(tokenizer, mode, args.text), device),
            "peak_rss_bytes": peak_rss_bytes(), "zero_shot_mean": benchlib.zero_shot_mean(model, tokenizer, args.tasks, args.limit)}


def tiny_model_dir(path: Path) -> str:
    """A 2-layer random Llama with a byte-level BPE tokenizer trained on a slice of the wiki text (for --quick)."""
    from llmprune.inputs.data import load_text
    from llmprune.testing import save_tiny_model_dir

    return str(save_tiny_model_dir(path, text=load_text(TEXT, "calib")[:20_000], vocab_size=400, layers=2))


def rows_of(prunes: list[str], mode: dict, pattern: str | None) -> list[tuple[str, str, str]]:
    rows = [(prune, recipe, budget) for prune in prunes for recipe in RECIPES for budget in mode["budgets"]]
    return benchlib.select_rows(rows, pattern, "/".join)


def summarise(prune_name: str, recipe: str, budget: str, row: dict, prune: dict, dense: dict) -> dict:
    stats = row["recovery"]
    minutes = {"teacher": row["teacher_minutes"], "recover": stats["seconds"] / 60}
    minutes["total"] = minutes["teacher"] + minutes["recover"]
    x_dense = {text: row["ppl"][text] / dense["ppl"][text] for text in row["ppl"]}
    goal, minutes_goal = (next((value for prefix, value in GOALS[key].items() if prune_name.startswith(prefix)), None)
                          for key in ("x_dense", "minutes"))
    text = next(iter(row["ppl"]))  # the training text comes first (eval_texts)
    peak_x = row["peak_rss_bytes"] / prune["peak_rss_bytes"]
    return {"name": f"{prune_name}/{recipe}/{budget}", "prune": prune_name, "recipe": recipe, "budget": budget,
            "loss": stats["loss"], "params": stats["params"], "tokens": stats["tokens"], "steps": stats["steps"],
            "ppl": row["ppl"], "pruned_ppl": prune["ppl"], "x_dense": x_dense,
            "zero_shot_mean": row["zero_shot_mean"], "minutes": minutes, "peak_rss_bytes": row["peak_rss_bytes"],
            "prune_peak_rss_bytes": prune["peak_rss_bytes"], "peak_rss_x_prune": peak_x,
            "meets": {"x_dense_text": None if goal is None else x_dense[text] <= goal,
                      "minutes": minutes["total"] <= minutes_goal,
                      "peak_rss": peak_x <= GOALS["peak_rss_x_prune"]},
            "curve": stats["curve"], "recovery": {k: v for k, v in stats.items() if k != "curve"}}


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    prunes = list(dict.fromkeys(row["prune"] for row in results["rows"]))
    columns = min(3, max(1, len(prunes)))  # a grid, three panels to a row
    grid_rows = -(-max(1, len(prunes)) // columns)
    figure = Figure(figsize=(6 * columns, 4.5 * grid_rows))
    FigureCanvasAgg(figure)  # a private Agg canvas: no pyplot, no global backend state
    axes_list = figure.subplots(grid_rows, columns, squeeze=False).flatten()
    for unused in axes_list[len(prunes):]:
        unused.set_visible(False)
    colours = {recipe: f"C{i}" for i, recipe in enumerate(RECIPES)}
    for axes, prune in zip(axes_list, prunes):
        for row in (r for r in results["rows"] if r["prune"] == prune):
            points = [(p["tokens"], p["val_ppl"]) for p in row["curve"]]  # from 0: the pruned model
            if points:
                tokens, ppl = zip(*points)
                axes.plot(tokens, ppl, "-" if row["budget"] == "4x" else "--", marker="o", markersize=3,
                          color=colours[row["recipe"]], label=f"{row['recipe']} ({row['budget']})")
        axes.axhline(results["dense"]["val_ppl"], color="black", linestyle=":",
                     label=f"dense ({results['dense']['val_ppl']:.2f})")
        axes.set(yscale="log", xlabel="training tokens", ylabel="validation perplexity (log scale)",
                 title=f"{results['model']}: {prune}")
        axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, format="png", dpi=120)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="anything load_model accepts (default: llama; --quick: a tiny random Llama)")
    p.add_argument("--text", default=TEXT, help="calibration, training and first held-out text: wiki (default; then "
                   "also scored on news), code (the running Python's standard library; then also on wiki), file:PATH")
    p.add_argument("--steps", type=int, help="recovery steps of the 1x budget; 4x is four times it (default 100)")
    p.add_argument("--nsamples", type=int, help="calibration windows of the prune (default 32)")
    p.add_argument("--eval-windows", type=int, help="held-out windows per text (default 40; fewer for a large "
                   "model: every row scores both texts)")
    p.add_argument("--quick", action="store_true", help="smoke run on a tiny random model, in this process")
    p.add_argument("--out", default="results", help="folder for recover.json and recover.png")
    p.add_argument("--prunes", default=",".join(DEFAULT_PRUNES),
                   help=f"comma-separated, of: {', '.join([*PRUNES, *STRUCTURED])}".replace("%", "%%"))
    p.add_argument("--rows", metavar="REGEX", help="only prune/recipe/budget rows matching, e.g. 'full', '2:4/.*/1x'")
    p.add_argument("--tasks", help="zero-shot tasks or suite (e.g. wanda-suite); default: none")
    p.add_argument("--limit", type=int, default=100, help="documents per zero-shot task (default 100)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--in-process", action="store_true", help="no child processes (peak RSS is then cumulative)")
    p.add_argument("--keep-rows", action="store_true", help="keep the rows of the recover.json already in --out "
                   "that this run does not redo, instead of replacing the file: a large model's rows measured in "
                   "several runs")
    return p.parse_args(argv)


def kept_rows(path: Path, redone: set[str], model: str, settings: dict) -> tuple[list[dict], dict]:
    """--keep-rows: the rows (and their prunes) of an earlier recover.json that this run does not redo. The earlier
    run must have used the same model, text, windows and budgets, or its perplexities would not compare."""
    if not path.exists():
        return [], {}
    previous = json.loads(path.read_text())
    benchlib.refuse_other_settings("bench_recover", path, {"model": previous.get("model"), **previous["settings"]},
                                   {"model": model, **settings})
    rows = [row for row in previous["rows"] if row["name"] not in redone]
    prunes = {name: previous["prunes"][name] for name in dict.fromkeys(row["prune"] for row in rows)}
    return rows, prunes


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    mode = dict(QUICK if args.quick else FULL)
    if args.steps:
        mode["budgets"] = {"1x": args.steps, "4x": 4 * args.steps}
    mode.update({key: getattr(args, key) for key in ("nsamples", "eval_windows") if getattr(args, key)})
    mode["text"] = args.text
    prunes = [name.strip() for name in args.prunes.split(",") if name.strip()]
    unknown = [name for name in prunes if name not in PRUNES and name not in STRUCTURED]
    if unknown:
        raise SystemExit(f"--prunes: unknown {', '.join(unknown)}; known: {', '.join([*PRUNES, *STRUCTURED])}")
    rows = rows_of(prunes, mode, args.rows)
    from llmprune.output.atomic import write_atomically, write_json_atomically

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-recover-"))
    in_process = args.in_process or args.quick
    try:
        model_given = args.model is not None
        if not model_given:
            args.model = tiny_model_dir(scratch / "tiny") if args.quick else "llama"

        def call(job, *job_args):
            if in_process:
                return job(args, mode, *job_args)
            # A fresh process per job: the peak RSS is a process high-water mark, so each row gets its own.
            with ProcessPoolExecutor(1, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
                return pool.submit(job, args, mode, *job_args).result()

        results = {"complete": False, "model": "tiny random Llama" if args.quick and not model_given else args.model, "mode": "quick" if args.quick else "full",
                   "settings": mode, "recipes": RECIPES, "goals": GOALS, "fields": FIELDS,
                   "recovery_defaults": asdict(recovery_config("lora-lm", 1, mode)),
                   "machine": benchlib.machine_info(args.device or "auto"),
                   "dense": None, "prunes": {}, "rows": []}
        if args.keep_rows:
            results["rows"], results["prunes"] = kept_rows(out / "recover.json", {"/".join(row) for row in rows},
                                                           results["model"], mode)
        save = lambda: write_json_atomically(out / "recover.json", results)  # noqa: E731
        results["dense"] = call(dense_job)
        print(f"dense: ppl {results['dense']['ppl']}", flush=True)
        save()
        for prune_name in dict.fromkeys(row[0] for row in rows):
            folder = str(scratch / prune_name.replace(":", "-").replace("%", "pct"))
            results["prunes"][prune_name] = call(prune_job, prune_name, folder)
            print(f"{prune_name}: ppl {results['prunes'][prune_name]['ppl']}, "
                  f"{results['prunes'][prune_name]['minutes']:.1f} min", flush=True)
            save()
            for _, recipe, budget in (row for row in rows if row[0] == prune_name):
                row = call(row_job, prune_name, folder, recipe, budget)
                summary = summarise(prune_name, recipe, budget, row, results["prunes"][prune_name], results["dense"])
                results["rows"].append(summary)  # kept rows never share a name with a row this run does
                (text, ppl), (other, other_ppl) = summary["ppl"].items()
                print(f"{summary['name']}: {text} {ppl:.2f} ({summary['x_dense'][text]:.2f}x dense), {other} "
                      f"{other_ppl:.2f}, {summary['minutes']['total']:.1f} min, peak "
                      f"{summary['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
                save()
        results["complete"] = True
        results["machine"]["load_average_at_end"] = benchlib.load_average()
        save()
        write_atomically(out / "recover.png", lambda p: plot(results, p))
        return results
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    from llmprune.errors import LLMPruneError

    try:
        main()
    except LLMPruneError as err:
        raise SystemExit(f"bench_recover: error: {err}") from None
