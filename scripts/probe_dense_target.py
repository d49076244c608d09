"""Probe: fit each pruned linear to the dense model's outputs instead of its own outputs on the pruned inputs.

    python scripts/probe_dense_target.py --model qwen-coder-0.5b --text code --method sparsegpt --pattern 2:4 \
        --ridge 0,0.01,0.1

SparseGPT and ADMM fit a pruned linear to W X_p, the dense weights applied to the *pruned* model's inputs: the
error the earlier layers left stays. Fitting to W X_d, the dense model's outputs (an "asymmetric" target), would
correct it too. With C = X_d^T X_p and H = X_p^T X_p,

    min ||X_d W^T - X_p V^T||^2 + ridge * sum_j H_jj ||V_:j - W_:j||^2   is solved by   W' = W (C + R)(H + R)^-1,

R = ridge * diag(H), and ||X_d W^T - X_p V^T||^2 = ||X_p (W' - V)^T||^2 + const without the ridge: so the method
runs unchanged on W' in place of W (--ridge 0 is the method as it is: W' = W). The ridge pulls W' towards W, scaled
per input as ADMM scales its damping. This is a prototype beside the runner: the dense model's activations are
carried as a second stream, one more forward per layer, nothing else of the runner (checkpoints, streaming) is
used. Per group of linears it records how far W' moves from W and what fraction of the error the earlier layers
left, ||(X_d - X_p) W^T||^2, W' removes on the calibration tokens. Writes <out>/dense_target.json (rows added to those already there).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import benchlib
from llmprune import PruneConfig
from llmprune.evaluation.perplexity import perplexity
from llmprune.inputs.models import load_model, set_weight_matrix, weight_matrix
from llmprune.output.atomic import write_json_atomically
from llmprune.pruning.methods import LayerTarget, get_method
from llmprune.pruning.runner import capture_layer_calls, check_model, propagate


def dense_target_weights(weight, cross, hessian, ridge):
    """W (C + R)(H + R)^-1 in float64, R = ridge * diag(H) (an input never seen keeps a tiny ridge)."""
    diagonal = hessian.diagonal().double()
    r = ridge * diagonal.clamp_min(1e-8 * float(diagonal.mean()))
    factor = torch.linalg.cholesky(hessian.double() + torch.diag(r))
    return torch.cholesky_solve((weight.double() @ (cross.double() + torch.diag(r))).t(), factor).t()


def fit_gain(weight, moved, dense_hessian, cross, hessian) -> float:
    """How much moving W to W' lowers ||X_d W^T - X_p V^T||^2 on the calibration tokens (before pruning), as a
    fraction of that error at V = W, ||(X_d - X_p) W^T||^2: the error the earlier layers left."""
    w, v, d, c, h = weight.double(), moved.double(), dense_hessian.double(), cross.double(), hessian.double()

    def error(u):  # tr(W D W^T) - 2 tr(W C U^T) + tr(U H U^T), D = X_d^T X_d
        return float(((w @ d) * w).sum() - 2 * ((w @ c) * u).sum() + ((u @ h) * u).sum())

    return (error(w) - error(v)) / max(error(w), 1e-30)


@torch.inference_mode()
def prune_to_dense_target(model, calibration, config: PruneConfig, ridge: float) -> list[dict]:
    method = get_method(config.method)
    layers, targets = check_model(model, config)
    calls = capture_layer_calls(model, layers, calibration, config.batch_size, torch.device("cpu"), progress=False)
    dense_hidden = calls.hidden.clone()
    groups_seen = []
    for i, layer in enumerate(layers):
        names = {module: name for name, module in targets[i].items()}
        # Linears that read one input tensor (q/k/v, gate/up) share one set of sums and are pruned stacked, as in
        # the runner's collect_statistics: the leader of each is learnt from the first batch, by tensor identity.
        sums, dense_inputs, stream, leader, previous = {}, {}, ["dense"], {}, [None, None]

        def hook(module, args):
            name, x = names[module], args[0]
            if stream[0] == "dense":
                if leader.get(name, name) == name:  # (the first batch keeps them all: no leader is known yet)
                    dense_inputs[name] = x.reshape(-1, x.shape[-1]).float()
                return
            if name not in leader:
                leader[name] = leader[previous[1]] if x is previous[0] else name
            previous[:] = [x, name]
            if leader[name] != name:
                return
            x = x.reshape(-1, x.shape[-1]).float()
            if name not in sums:
                sums[name] = [torch.zeros(x.shape[1], x.shape[1]) for _ in range(3)]
            sums[name][0].addmm_(x.t(), x)  # H
            sums[name][1].addmm_(dense_inputs[name].t(), x)  # C
            sums[name][2].addmm_(dense_inputs[name].t(), dense_inputs[name])  # D, for fit_gain only

        handles = [module.register_forward_pre_hook(hook) for module in targets[i].values()]
        for b, rows in enumerate(calls.batches):
            stream[0] = "dense"
            out = layer(dense_hidden[rows], *calls.args[b][i], **calls.kwargs[b][i])
            dense_out = out[0] if isinstance(out, (tuple, list)) else out
            stream[0] = "pruned"
            layer(calls.hidden[rows], *calls.args[b][i], **calls.kwargs[b][i])
            dense_hidden[rows] = dense_out
            dense_inputs.clear()
            previous[:] = [None, None]
        for handle in handles:
            handle.remove()
        tokens = calls.hidden.shape[0] * calls.hidden.shape[1]
        groups: dict[str, list[str]] = {}
        for name in targets[i]:
            groups.setdefault(leader[name], []).append(name)
        for group in groups.values():
            hessian, cross, dense_hessian = (s.mul(2 / tokens) for s in sums[group[0]])
            modules = [targets[i][name] for name in group]
            rows = [weight_matrix(m).shape[0] for m in modules]
            weight = torch.cat([weight_matrix(m).float() for m in modules])
            moved = dense_target_weights(weight, cross, hessian, ridge).float() if ridge else weight
            groups_seen.append({"layer": i, "group": "+".join(n.rsplit(".", 1)[-1] for n in group),
                                "moved": float((moved - weight).norm() / weight.norm()),
                                "fit_gain": fit_gain(weight, moved, dense_hessian, cross, hessian)})
            statistic = hessian if method.statistic == "hessian" else hessian.diagonal().mul(tokens / 2).sqrt()
            new, _ = method.fn(moved, statistic, LayerTarget(config.sparsity, config.nm, tuple(rows)),
                               **config.method_config.knobs())
            for module, part in zip(modules, new.split(rows)):
                set_weight_matrix(module, part)
        del sums
        propagate(layer, i, calls)
    return groups_seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama")
    parser.add_argument("--text", default=benchlib.TEXT)
    parser.add_argument("--method", default="sparsegpt", help="a method of the runner (sparsegpt, admm, wanda)")
    parser.add_argument("--pattern", default="2:4", help="N:M, or a sparsity such as 0.5")
    parser.add_argument("--ridge", default="0,0.1", help="comma list; 0 = the method as it is")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = benchlib.results_folder(args.model, args.text) if args.out is None else Path(args.out)
    path = out / "dense_target.json"
    shape = {"pattern": args.pattern} if ":" in args.pattern else {"sparsity": float(args.pattern)}
    config = PruneConfig(method=args.method, nsamples=args.nsamples, seqlen=args.seqlen, **shape)
    same = {"model": benchlib.model_name(args.model), "text": args.text, "nsamples": args.nsamples,
            "seqlen": args.seqlen, "eval_windows": args.eval_windows, "seed": benchlib.SEED}
    rows = []
    if path.exists():
        earlier = json.loads(path.read_text())
        benchlib.refuse_other_settings("probe_dense_target.py", path, {k: earlier.get(k) for k in same}, same)
        rows = earlier["rows"]
    model, tokenizer, _ = load_model(args.model, "float32")
    calibration = benchlib.calibration(tokenizer, args.nsamples, args.seqlen, args.text)
    windows = benchlib.held_out(tokenizer, args.seqlen, args.eval_windows, args.text)
    dense_state = {name: p.detach().clone() for name, p in model.state_dict().items()}
    for ridge in (float(r) for r in args.ridge.split(",")):
        model.load_state_dict(dense_state)
        started = time.perf_counter()
        groups = prune_to_dense_target(model, calibration, config, ridge)
        seconds = time.perf_counter() - started
        row = {"method": args.method, "pattern": args.pattern, "ridge": ridge,
               "ppl": perplexity(model, windows, "cpu", progress=False), "prune_s": round(seconds, 1),
               "moved_median": float(torch.tensor([g["moved"] for g in groups]).median()),
               "fit_gain_median": float(torch.tensor([g["fit_gain"] for g in groups]).median()),
               "groups": groups}
        rows = [r for r in rows if (r["method"], r["pattern"], r["ridge"]) != (args.method, args.pattern, ridge)]
        rows.append(row)
        print(f"{args.method} {args.pattern}, ridge {ridge:g}: ppl {row['ppl']:.2f} ({seconds:.0f} s); W' moved "
              f"{row['moved_median']:.1%} of |W| for {row['fit_gain_median']:.1%} of the fit (medians)", flush=True)
        write_json_atomically(path, {**same, "machine": benchlib.machine_info("cpu"), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
