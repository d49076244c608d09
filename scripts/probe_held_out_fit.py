"""Probe: how much of a method's fit to the calibration tokens carries to held-out tokens, layer by layer.

    python scripts/probe_held_out_fit.py --model qwen-coder-0.5b --text code --layers 3,12,20 --pattern 2:4

SparseGPT and ADMM choose and re-fit each linear's weights on X^T X of the calibration tokens. A perplexity tells how
the whole model fared; this probe tells where the loss comes from. For a few layers of the *dense* model (their
inputs come from dense layers before them), it sums X^T X over the calibration windows and over as many held-out
windows, prunes each group of linears that reads one input (the runner's groups: q/k/v, gate/up) with each
variant, and records the error the pruning leaves, ||(W - W') X^T||^2 / ||W X^T||^2, on both sets of tokens.

Variants: `sparsegpt` and `admm` as the runner runs them (default knobs); `admm-damp=X` with another ridge;
`admm-obs`, gradual ADMM choosing its masks on the OBS saliency |w| / sqrt([(H + damp I)^-1]_jj) in place of the
Wanda score |w| (in ADMM's unit-diagonal scaling): an input the others predict well is cheaper to prune.

With `--block-epochs N`, each layer is also pruned whole by `admm` and then its kept weights are fine-tuned by Adam
to the dense layer's outputs on the calibration inputs (the layer's own output, not one linear's: what the linears
cannot fix alone, through attention and the MLP's gate), the mask held; the error of the layer's update,
||f'(x) - f(x)||^2 / ||f(x) - x||^2, on both sets after each epoch. Adds a run to <out>/held_out_fit.json
(one with the same settings is replaced).

With `--whole-model V,...` it prunes the whole model instead, by the runner, once per variant (`sparsegpt`, or an
ADMM variant: the runner's gradual-ADMM kernel is swapped for it while it runs), and adds each perplexity on the
held-out windows to the file's `whole_model` list.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
import math
import time
from pathlib import Path

import torch

import benchlib
from llmprune import PruneConfig
from llmprune.inputs.models import load_model, set_weight_matrix, weight_matrix
from llmprune.output.atomic import write_json_atomically
from llmprune.pruning.masks import nm_mask
from llmprune.pruning.methods import LayerTarget, get_method
from llmprune.pruning.methods.admm import ScaledProblem, gradual_mask
from llmprune.pruning.runner import (capture_layer_calls, check_model, collect_statistics, propagate, run_layer,
                                     share_groups)


def admm_obs(weight, hessian, target, iterations=20, steps=15, rho=1.0, damp=0.1):
    """Gradual ADMM (the runner's schedule) with masks chosen on the OBS saliency instead of |w|."""
    problem = ScaledProblem(weight, hessian, rho, damp)
    unit = hessian / problem.scale[:, None] / problem.scale[None, :]
    unit.diagonal().add_(damp)
    saliency_weight = torch.cholesky_inverse(torch.linalg.cholesky(unit)).diagonal().rsqrt()
    z, u = problem.dense.clone(), torch.zeros_like(problem.dense)
    keep = torch.ones_like(z, dtype=torch.bool)
    for t in range(iterations):
        w = problem.least_squares_step(z, u)
        if t < steps:
            final = t + 1 == steps
            sparsity = target.sparsity * (1 - (1 - (t + 1) / steps) ** 3)
            scores = (w + u).abs() * saliency_weight
            keep = (nm_mask(scores, *target.nm) if final and target.nm
                    else gradual_mask(scores, target.sparsity if final else sparsity, target))
        z = (w + u) * keep
        u += w - z
    return problem.unscale(z), keep


def prune_variant(variant: str, weight, hessian, target):
    """(pruned weight, keep mask) of a variant: a method's name, `admm-obs`, either with `-damp=X`."""
    name, _, damp = variant.partition("-damp=")
    if name == "admm-obs":
        return admm_obs(weight, hessian, target, damp=float(damp or 0.1))
    method = get_method(name)
    knobs = method.config().knobs() | ({"admm_damp": float(damp)} if damp else {})
    return method.fn(weight.clone(), hessian.clone(), target, **knobs)


def whole_model_perplexity(model, calibration, windows, config, variant) -> tuple[float, float]:
    """The runner prunes the whole model by gradual ADMM with its kernel swapped for the variant's (the knobs
    the runner passes are the variant's own): perplexity on the held-out windows, and the prune's seconds."""
    from llmprune import prune
    from llmprune.evaluation.perplexity import perplexity
    from llmprune.pruning.registry import HANDLERS, AdmmConfig

    runners = HANDLERS[AdmmConfig]
    name, _, damp = variant.partition("-damp=")
    if variant == "sparsegpt":  # the runner's SparseGPT as it is, for the ratio in the same run
        return whole_model_perplexity(model, calibration, windows, replace(config, method="sparsegpt"), "admm")
    if name not in ("admm", "admm-obs"):
        raise SystemExit(f"--whole-model takes sparsegpt or ADMM variants (admm, admm-obs, either with -damp=X), "
                         f"not {variant}")

    def kernel(weight, hessian, target, admm_iterations, admm_rho, admm_damp, admm_gradual_steps):
        admm_damp = float(damp) if damp else admm_damp
        if name == "admm":
            return runners(weight, hessian, target, admm_iterations, admm_rho, admm_damp, admm_gradual_steps)
        return admm_obs(weight, hessian, target, admm_iterations, admm_gradual_steps, admm_rho, admm_damp)

    HANDLERS[AdmmConfig] = kernel
    try:
        started = time.perf_counter()
        prune(model, calibration, config, progress=False)
        seconds = time.perf_counter() - started
    finally:
        HANDLERS[AdmmConfig] = runners
    return perplexity(model, windows, "cpu", progress=False), seconds


def relative_error(weight, pruned, hessian) -> float:
    change, w, h = (weight - pruned).double(), weight.double(), hessian.double()
    return float(((change @ h) * change).sum() / ((w @ h) * w).sum())


def stacked(targets, group):
    rows = tuple(weight_matrix(targets[name]).shape[0] for name in group)
    return torch.cat([weight_matrix(targets[name]).float() for name in group]), rows


def block_error(layer, index, calls, outputs) -> float:
    with torch.no_grad():
        change = sum(float((run_layer(layer, index, calls, b) - y).pow(2).sum()) for b, y in enumerate(outputs))
        update = sum(float((y - calls.hidden[rows]).pow(2).sum()) for rows, y in zip(calls.batches, outputs))
    return change / update


def fine_tune_block(layer, index, calibration, held_out, targets, config, epochs, lr) -> list[dict]:
    """Prune the layer by gradual ADMM, then fit its kept weights to the dense layer's outputs by Adam."""
    with torch.no_grad():
        dense_cal = [run_layer(layer, index, calibration, b) for b in range(len(calibration.batches))]
        dense_held = [run_layer(layer, index, held_out, b) for b in range(len(held_out.batches))]
        statistics = collect_statistics(layer, index, calibration, targets, ("hessian",))
    masks = {}
    for group in share_groups(targets, statistics):
        weight, rows = stacked(targets, group)
        target = LayerTarget(config.sparsity, config.nm, rows)
        pruned, _ = prune_variant("admm", weight, statistics[group[0]]["hessian"], target)
        for name, part in zip(group, pruned.split(rows)):
            with torch.no_grad():
                set_weight_matrix(targets[name], part)
            masks[targets[name]] = targets[name].weight != 0
    curve = [{"epoch": 0, "calibration": block_error(layer, index, calibration, dense_cal),
              "held_out": block_error(layer, index, held_out, dense_held), "seconds": 0.0}]
    for p in layer.parameters():
        p.requires_grad_(False)
    weights = [module.weight.requires_grad_(True) for module in masks]
    optimizer = torch.optim.Adam(weights, lr=lr)
    started = time.perf_counter()
    for epoch in range(epochs):
        for b, target in enumerate(dense_cal):
            loss = (run_layer(layer, index, calibration, b) - target).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for module, keep in masks.items():
                    module.weight.mul_(keep)
        curve.append({"epoch": epoch + 1, "calibration": block_error(layer, index, calibration, dense_cal),
                      "held_out": block_error(layer, index, held_out, dense_held),
                      "seconds": round(time.perf_counter() - started, 1)})
        print(f"  layer {index}, epoch {epoch + 1}: block error calibration {curve[-1]['calibration']:.4f}, "
              f"held-out {curve[-1]['held_out']:.4f}", flush=True)
    return curve


def plain(value):
    """A copy made outside inference mode (the captured calls are inference tensors: autograd refuses them)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama")
    parser.add_argument("--text", default=benchlib.TEXT)
    parser.add_argument("--layers", default="3,12,20")
    parser.add_argument("--pattern", default="2:4", help="N:M, or a sparsity such as 0.7")
    parser.add_argument("--variants", default="sparsegpt,admm,admm-obs,admm-damp=0.3")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--held-out-windows", type=int, default=16)
    parser.add_argument("--block-epochs", type=int, default=0)
    parser.add_argument("--block-lr", type=float, default=1e-4)
    parser.add_argument("--whole-model", default="", help="comma list of sparsegpt and ADMM variants (admm, "
                        "admm-obs, ...-damp=X): instead of the layers, prune the whole model with each and measure perplexity")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = benchlib.results_folder(args.model, args.text) if args.out is None else Path(args.out)
    shape = {"pattern": args.pattern} if ":" in args.pattern else {"sparsity": float(args.pattern)}
    config = PruneConfig(method="admm", nsamples=args.nsamples, seqlen=args.seqlen, **shape)
    wanted = [int(i) for i in args.layers.split(",")]
    model, tokenizer, _ = load_model(args.model, "float32")
    if args.whole_model:
        return whole_model_runs(args, model, tokenizer, config, out)
    layers, targets = check_model(model, config)
    with torch.inference_mode():
        calls = [capture_layer_calls(model, layers, windows, 2, torch.device("cpu"), progress=False)
                 for windows in (benchlib.calibration(tokenizer, args.nsamples, args.seqlen, args.text),
                                 benchlib.held_out(tokenizer, args.seqlen, args.held_out_windows, args.text))]
    rows, blocks = [], []
    for i, layer in enumerate(layers[:max(wanted) + 1]):
        if i in wanted:
            with torch.inference_mode():
                cal, held = (collect_statistics(layer, i, c, targets[i], ("hessian",)) for c in calls)
            for group in share_groups(targets[i], cal):
                weight, group_rows = stacked(targets[i], group)
                target = LayerTarget(config.sparsity, config.nm, group_rows)
                row = {"layer": i, "group": "+".join(n.rsplit(".", 1)[-1] for n in group), "errors": {}}
                for variant in args.variants.split(","):
                    pruned, _ = prune_variant(variant, weight, cal[group[0]]["hessian"], target)
                    row["errors"][variant] = {"calibration": relative_error(weight, pruned, cal[group[0]]["hessian"]),
                                              "held_out": relative_error(weight, pruned, held[group[0]]["hessian"])}
                rows.append(row)
                print(f"layer {i} {row['group']}: " + ", ".join(
                    f"{v} {e['calibration']:.4f}/{e['held_out']:.4f}" for v, e in row["errors"].items()), flush=True)
        if i in wanted and args.block_epochs:
            dense = {k: v.clone() for k, v in layer.state_dict().items()}
            for c in calls:
                c.hidden, c.args, c.kwargs = plain(c.hidden), plain(c.args), plain(c.kwargs)
            blocks.append({"layer": i, "curve": fine_tune_block(layer, i, *calls, targets[i], config,
                                                                args.block_epochs, args.block_lr)})
            layer.load_state_dict(dense)
        with torch.inference_mode():
            for c in calls:
                propagate(layer, i, c)  # the dense layer: the next one sees the dense model's inputs
    first = args.variants.split(",")[0]
    summary = {}
    for variant in args.variants.split(","):
        summary[variant] = {part: math.exp(sum(math.log(r["errors"][variant][part] / r["errors"][first][part])
                                               for r in rows) / len(rows)) for part in ("calibration", "held_out")}
        print(f"{variant}: geometric mean error against {first}: calibration {summary[variant]['calibration']:.3f}, "
              f"held-out {summary[variant]['held_out']:.3f}")
    path = out / "held_out_fit.json"
    run = {"pattern": args.pattern, "layers": wanted, "nsamples": args.nsamples, "seqlen": args.seqlen,
           "held_out_windows": args.held_out_windows, "block_epochs": args.block_epochs, "block_lr": args.block_lr,
           "machine": benchlib.machine_info("cpu"), "summary_against_first": summary, "groups": rows,
           "blocks": blocks}
    same = {"model": benchlib.model_name(args.model), "text": args.text}
    saved = json.loads(path.read_text()) if path.exists() else {}
    key = ("pattern", "layers", "nsamples", "seqlen", "held_out_windows", "block_epochs")
    runs = [r for r in saved.get("runs", []) if any(r[k] != run[k] for k in key)] + [run]  # same settings: replaced
    write_json_atomically(path, {**saved, **same, "runs": runs})
    print(f"wrote {path}")


def whole_model_runs(args, model, tokenizer, config, out: Path) -> None:
    """Adds each variant's whole-model row to <out>/held_out_fit.json's `whole_model` list (same settings: replaced)."""
    calibration = benchlib.calibration(tokenizer, args.nsamples, args.seqlen, args.text)
    windows = benchlib.held_out(tokenizer, args.seqlen, args.held_out_windows, args.text)
    dense = {name: p.detach().clone() for name, p in model.state_dict().items()}
    path = out / "held_out_fit.json"
    for variant in args.whole_model.split(","):
        model.load_state_dict(dense)
        ppl, seconds = whole_model_perplexity(model, calibration, windows, config, variant)
        print(f"{variant}, {args.pattern}, whole model: perplexity {ppl:.2f} (prune {seconds:.0f} s)", flush=True)
        row = {"variant": variant, "pattern": args.pattern, "nsamples": args.nsamples, "seqlen": args.seqlen,
               "eval_windows": args.held_out_windows, "ppl": ppl, "prune_s": round(seconds, 1),
               "machine": benchlib.machine_info("cpu")}
        saved = json.loads(path.read_text()) if path.exists() else {
            "model": benchlib.model_name(args.model), "text": args.text, "runs": []}
        key = ("variant", "pattern", "nsamples", "seqlen", "eval_windows")
        saved["whole_model"] = [r for r in saved.get("whole_model", []) if any(r[k] != row[k] for k in key)] + [row]
        write_json_atomically(path, saved)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
