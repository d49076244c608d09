"""GPU checks and timings, for a machine with a CUDA GPU (nothing here runs in CI).

Four parts, each printing a table and writing into one JSON file (after every part):

1. `agreement`: tiny random decoders of several families pruned on the CPU and on the GPU (float32):
   the fraction of identical mask entries, and the relative difference of the pruned models' logits.
   The CUDA path must choose (almost) the same weights as the CPU path the tests check.
2. `prune`: wall time per phase of Wanda and SparseGPT on random Llama-shaped models on the GPU, at the
   papers' 128 x 2048 calibration, with the floor (two bare forwards of the same batches through the
   decoder layers) for the ratio.
3. `solver`: SparseGPT's two GPU costs on LLaMA-7B shapes: X^T X in float32 against tensor cores (each against
   float64), and the column loop eager against its CUDA-graph replay (time, and bit-identity of the weights).
4. `sparse24`: real 2:4 speed. The 2:4 masks llmprune writes are handed to PyTorch's semi-structured
   sparse kernels (`to_sparse_semi_structured`); each linear's matmul and a whole decoder forward are
   timed dense and sparse, and the sparse results checked against the dense product of the pruned
   weights.

Weights are random (no network on GPU machines, and speed does not depend on their values); quality
numbers come from `scripts/bench_prune.py` on the real embedded model.

    python scripts/bench_gpu.py --out results/gpu.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import benchlib
from bench_prune import time_floor  # the CPU benchmark's floor, timed the same way
from llmprune.config import PruneConfig
from llmprune.errors import LLMPruneError
from llmprune.inputs.models import decoder_layers, linears, weight_matrix
from llmprune.output.atomic import write_json_atomically
from llmprune.pruning.runner import prune
from llmprune.runtime import resolve_device
from llmprune.testing import tiny_model

SHAPES = {  # (hidden, intermediate, heads, kv heads): the embedded model's and LLaMA-7B's layer shapes
    "smollm2-135m": (576, 1536, 9, 3),
    "llama-7b": (4096, 11008, 32, 32),
}


def random_llama(shape: str, layers: int, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    hidden, intermediate, heads, kv_heads = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, num_hidden_layers=layers, vocab_size=32000,
                         max_position_embeddings=4096)
    torch.manual_seed(0)
    with device:  # initialise on the GPU (fast), then park on the CPU: the runner moves layers
        model = LlamaForCausalLM(config).to(dtype)
    return model.cpu().eval()


def agreement(rows: list, device: torch.device) -> None:
    print("\n== CPU vs CUDA: same masks? (tiny random models, float32, 16 x 64 calibration)")
    print(f"{'family':10} {'method':10} {'pattern':12} {'mask agree':>11} {'logit rel diff':>15}")
    calibration = torch.randint(0, 128, (16, 64), generator=torch.Generator().manual_seed(0))
    for family in ["llama", "gemma3", "opt", "gpt2"]:
        for method in ["magnitude", "wanda", "sparsegpt"]:
            for pattern in ["unstructured", "2:4"]:
                pruned = {}
                for where in ("cpu", str(device)):
                    model = tiny_model(family)
                    prune(model, calibration, PruneConfig(method=method, pattern=pattern, device=where),
                          progress=False)
                    pruned[where] = model
                masks = [(weight_matrix(a) != 0) == (weight_matrix(b) != 0) for a, b in
                         zip(_all_linears(pruned["cpu"]), _all_linears(pruned[str(device)]))]
                agree = sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
                with torch.no_grad():
                    a, b = (pruned[d](calibration[:4]).logits for d in ("cpu", str(device)))
                diff = float((a - b).norm() / a.norm())
                print(f"{family:10} {method:10} {pattern:12} {agree:11.6f} {diff:15.2e}")
                rows.append({"family": family, "method": method, "pattern": pattern, "mask_agreement": agree,
                             "logit_rel_diff": diff})


def _all_linears(model):
    _, layers = decoder_layers(model)
    return [m for layer in layers for m in linears(layer).values()]


def solver(rows: list, device: torch.device) -> None:
    """SparseGPT's two GPU costs on LLaMA-7B shapes: X^T X from bf16 activations (float32 against tensor cores
    with float32 sums, both against float64), and the column loop (eager against its CUDA-graph replay)."""
    from llmprune.pruning.methods import sparsegpt as solver_module
    from llmprune.pruning.methods import LayerTarget
    from llmprune.pruning.statistics import Hessian

    print("\n== SparseGPT's parts on the GPU (LLaMA-7B shapes, 16384 bf16 tokens)")
    generator = torch.Generator(device=device).manual_seed(0)
    for features in (4096, 11008):
        x = torch.randn(8, 2048, features, device=device, generator=generator).to(torch.bfloat16)
        exact = x.reshape(-1, features).double()
        exact = exact.t() @ exact * (2 / exact.shape[0])
        timings = {}
        for name, tensor in (("float32", x.float()), ("tensor cores", x)):
            hessian = Hessian(features, device)
            hessian.add(tensor)  # warm-up
            hessian = Hessian(features, device)
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            for _ in range(4):
                hessian.add(tensor)
            torch.cuda.synchronize(device)
            timings[name] = (time.perf_counter() - start) / 4
            error = float((hessian.finalize().double() - exact).norm() / exact.norm())  # finalize: 2/n over all adds
            print(f"X^T X, {features:5d} features, {name:12}: {timings[name] * 1e3:8.2f} ms per 16384 tokens, "
                  f"relative error against float64 {error:.2e}")
            rows.append({"part": "hessian", "features": features, "path": name, "ms": timings[name] * 1e3,
                         "rel_err_vs_float64": error})
        del x, exact

    eager = lambda rows_, width, nm, device_, dtype: (  # noqa: E731  the loop without the graph
        lambda *t: solver_module.column_loop(*t, nm))
    for (out_features, in_features), pattern in [((12288, 4096), None), ((4096, 11008), None), ((12288, 4096), (2, 4))]:
        weight = torch.randn(out_features, in_features, device=device, generator=generator)
        x = torch.randn(4096, in_features, device=device, generator=generator)
        hessian = x.t() @ x * (2 / 4096)
        target = LayerTarget(sparsity=0.5, nm=pattern)
        results = {}
        for name in ("eager", "CUDA graph"):
            if name == "eager":
                solver_module.column_graph, saved = eager, solver_module.column_graph
            solver_module.sparsegpt(weight[:, :256], hessian[:256, :256], target)  # warm-up, graph capture
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            results[name] = solver_module.sparsegpt(weight, hessian, target)
            torch.cuda.synchronize(device)
            results[name + " s"] = time.perf_counter() - start
            if name == "eager":
                solver_module.column_graph = saved
        identical = bool(torch.equal(results["eager"][0], results["CUDA graph"][0])
                         and torch.equal(results["eager"][1], results["CUDA graph"][1]))
        label = "2:4" if pattern else "50%"
        print(f"solve {out_features}x{in_features} {label}: eager {results['eager s']:.3f} s, CUDA graph "
              f"{results['CUDA graph s']:.3f} s ({results['eager s'] / results['CUDA graph s']:.1f}x), "
              f"bit-identical: {identical}")
        rows.append({"part": "solve", "shape": [out_features, in_features], "pattern": label,
                     "eager_s": results["eager s"], "graph_s": results["CUDA graph s"], "bit_identical": identical})


PRUNE_ROWS = ("smollm2-135m:wanda:unstructured", "smollm2-135m:sparsegpt:unstructured", "smollm2-135m:sparsegpt:2:4",
              "llama-7b:wanda:unstructured", "llama-7b:sparsegpt:unstructured", "llama-7b:sparsegpt:2:4")


def prune_timings(rows: list, nsamples: int, seqlen: int, device: torch.device, layers_7b: int = 32,
                  only: tuple[str, ...] = PRUNE_ROWS) -> None:
    print(f"\n== prune on the GPU: seconds per phase, {nsamples} x {seqlen} calibration (random bf16 weights)")
    print(f"{'model':22} {'method':10} {'pattern':12} {'capture':>8} {'stats':>8} {'solve':>8} {'propag':>8} "
          f"{'total':>8} {'floor':>7} {'x floor':>8} {'peak GPU GiB':>13}")
    calibration = torch.randint(0, 32000, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    for shape, layers in [("smollm2-135m", 30), ("llama-7b", layers_7b)]:
        if not any(row.startswith(shape + ":") for row in only):
            continue
        base = random_llama(shape, layers, torch.bfloat16, device)
        floor = time_floor(copy.deepcopy(base), calibration, device)["two_pass_s"]
        for method, pattern in [("wanda", "unstructured"), ("sparsegpt", "unstructured"), ("sparsegpt", "2:4")]:
            if f"{shape}:{method}:{pattern}" not in only:
                continue
            model = copy.deepcopy(base)
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            report = prune(model, calibration, PruneConfig(method=method, pattern=pattern, device=str(device),
                                                           nsamples=nsamples, seqlen=seqlen), progress=False)
            total = time.perf_counter() - start
            s = report.seconds
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            name = f"{shape} ({layers} layers)"
            print(f"{name:22} {method:10} {pattern:12} {s['capture']:8.2f} {s['statistics']:8.2f} {s['solve']:8.2f} "
                  f"{s['propagate']:8.2f} {total:8.2f} {floor:7.2f} {total / floor:8.2f} {peak:13.2f}")
            rows.append({"model": shape, "layers": layers, "method": method, "pattern": pattern,
                         "seconds": dict(s), "total_seconds": total, "floor_seconds": floor,
                         "achieved_sparsity": report.achieved_sparsity, "peak_gpu_gib": peak})
            del model
        del base


def bench(fn, warmup=5, repeat=30) -> float:
    """Median milliseconds of `fn`, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def sparse24(rows: list, token_counts: list[int], device: torch.device) -> None:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    print("\n== 2:4 on the GPU: llmprune's 2:4 masks through PyTorch's semi-structured kernels (F.linear), fp16")
    print(f"{'shape':14} {'tokens':>7} {'linear':10} {'out x in':>14} {'dense ms':>9} {'2:4 ms':>9} {'speedup':>8} "
          f"{'rel err':>9}")
    for shape in ["smollm2-135m", "llama-7b"]:
        model = random_llama(shape, 1, torch.float16, device)
        prune(model, None, PruneConfig(method="magnitude", pattern="2:4", device=str(device)), progress=False)
        _, layers = decoder_layers(model)
        rotary_emb = model.model.rotary_emb.to(device)
        for tokens in token_counts:
            layer = copy.deepcopy(layers[0]).to(device)
            x = torch.randn(tokens, SHAPES[shape][0], device=device, dtype=torch.float16)
            x_down = torch.randn(tokens, SHAPES[shape][1], device=device, dtype=torch.float16)
            for name, module in linears(layer).items():
                short = name.rsplit(".", 1)[-1]
                weight = module.weight.detach()
                sparse = to_sparse_semi_structured(weight)  # refuses anything that is not exactly 2:4
                backend = type(sparse).__name__.removeprefix("SparseSemiStructuredTensor") or "default"
                inputs = x_down if short == "down_proj" else x
                dense_ms = bench(lambda: F.linear(inputs, weight))
                sparse_ms = bench(lambda: F.linear(inputs, sparse))
                ref = F.linear(inputs.float(), weight.float())
                err = float((F.linear(inputs, sparse).float() - ref).norm() / ref.norm())
                print(f"{shape:14} {tokens:7d} {short:10} {str(tuple(weight.shape)):>14} {dense_ms:9.3f} "
                      f"{sparse_ms:9.3f} {dense_ms / sparse_ms:8.2f} {err:9.1e}")
                rows.append({"model": shape, "linear": short, "shape": list(weight.shape), "tokens": tokens,
                             "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
                             "rel_err": err, "backend": backend})
            # a whole decoder layer (sequences of 2048): every linear's weight swapped for its 2:4 form
            batch = torch.randn(max(1, tokens // 2048), min(tokens, 2048), SHAPES[shape][0], device=device,
                                dtype=torch.float16)
            position_ids = torch.arange(batch.shape[1], device=device).expand(batch.shape[0], -1)
            rotary = rotary_emb(batch, position_ids)

            def forward():
                out = layer(batch, position_embeddings=rotary, attention_mask=None, position_ids=position_ids)
                return out[0] if isinstance(out, tuple) else out

            with torch.inference_mode():
                dense_out, dense_ms = forward(), bench(forward)
                for module in linears(layer).values():
                    module.weight = torch.nn.Parameter(to_sparse_semi_structured(module.weight.detach()),
                                                       requires_grad=False)
                assert all(isinstance(m.weight, SparseSemiStructuredTensor) for m in linears(layer).values())
                sparse_out, sparse_ms = forward(), bench(forward)
            err = float((sparse_out.float() - dense_out.float()).norm() / dense_out.float().norm())
            print(f"{shape:14} {tokens:7d} {'layer':10} {'':>14} {dense_ms:9.3f} {sparse_ms:9.3f} "
                  f"{dense_ms / sparse_ms:8.2f} {err:9.1e}")
            rows.append({"model": shape, "linear": "whole decoder layer", "tokens": tokens, "dense_ms": dense_ms,
                         "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms, "rel_err": err})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/gpu.json", help="JSON file for every figure printed")
    parser.add_argument("--parts", default="agreement,solver,prune,sparse24", help="comma-separated parts to run")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--tokens", default="2048,32768", help="tokens per matmul in the 2:4 timings, comma list")
    parser.add_argument("--prune-rows", default=",".join(PRUNE_ROWS), help="shape:method:pattern rows of the prune part")
    parser.add_argument("--layers-7b", type=int, default=32, help="decoder layers of the LLaMA-7B shape (32: whole)")
    parser.add_argument("--device", default="cuda", help="the CUDA device to measure: cuda, cuda:N")
    args = parser.parse_args()
    if not torch.cuda.is_available() or not args.device.startswith("cuda"):  # CUDA events, CUDA's 2:4 kernels
        sys.exit("bench_gpu.py measures a CUDA GPU: run it where one is, with --device cuda or cuda:N")
    try:
        device = resolve_device(args.device)
    except LLMPruneError as err:
        sys.exit(f"bench_gpu.py: {err}")
    if device.index is not None:
        torch.cuda.set_device(device)  # the events and synchronisations below address the current device
    results = {"gpu": torch.cuda.get_device_name(device), "machine": benchlib.machine_info(device)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = {"agreement": lambda rows: agreement(rows, device),
             "solver": lambda rows: solver(rows, device),
             "prune": lambda rows: prune_timings(rows, args.nsamples, args.seqlen, device, args.layers_7b,
                                                 tuple(args.prune_rows.split(","))),
             "sparse24": lambda rows: sparse24(rows, [int(t) for t in args.tokens.split(",")], device)}
    for part in args.parts.split(","):
        parts[part](results.setdefault(part, []))
        write_json_atomically(out, results)  # after every part: a run cut short keeps what it measured
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
