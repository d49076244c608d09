"""Benchmark pruning at scale: peak RSS against model size when streaming a random Llama from disk, the
streamed output against the in-memory one, and the calibration passes' wall time with 1 and N ranks.

    python scripts/bench_scale.py [--config llama-1b] [--model-dir DIR] [--in-memory] [--ranks 1,2] [--quick]
    python scripts/bench_scale.py --model qwen-coder-0.5b [--text code] [--model-dir DIR]   # a real model
    python scripts/bench_scale.py --config qwen3-30b-a3b --layers 4 --methods wanda --nsamples 8 --seqlen 128 \
        --out results/scale/qwen3-30b-a3b                                    # a mixture of experts, cut to 4 layers

Each prune runs in a fresh process, so that its peak RSS (VmHWM) is its own. The random model is written
once to --model-dir (llama-1b: 4.4 GB in float32; llama-7b: 27 GB, more than many machines' RAM). The
calibration activations, nsamples x seqlen x hidden floats, are reported beside the RSS (the goal is stated
as peak RSS <= 0.3 x model size plus them). With --model, a real model is saved once as safetensors to
--model-dir (float32) and calibrated on --text (tokenized here, so the tokenizer's memory is not the prune's).
Writes <out>/bench_scale.json and <out>/bench_scale.md; <out> is results/scale, or results/MODEL/[TEXT/]scale
with --model (benchlib.results_folder). The peak RSS is also stated against the model's float32 size (what
the prune computes in) and, for a shape cut with --layers, against the float32 size of the full-depth shape: the
streamed peak is one layer's, whatever the depth.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import socket
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import benchlib


def child(job: dict) -> dict:
    """One prune in this process; returns what was measured."""
    importlib.import_module("transformers")  # before the baseline is taken: its RSS is not the model's

    from llmprune import PruneConfig
    from llmprune.runtime import current_rss_bytes, peak_rss_bytes

    baseline = current_rss_bytes()

    config = PruneConfig(method=job["method"], nsamples=job["nsamples"], seqlen=job["seqlen"], batch_size=job["batch"])
    parallel = None
    if job["mode"] == "ranks":
        from llmprune.scale.distributed import DataParallel

        parallel = DataParallel.from_environment(torch.device("cpu"))
    if job["model"] == "llama":  # the embedded model, calibrated on --text
        from llmprune.inputs.data import calibration_windows, load_text, tokenize
        from llmprune.inputs.models import load_model

        model, tokenizer, _ = load_model("llama")
        calibration = calibration_windows(tokenize(tokenizer, load_text(job["text"], "calib")), config.nsamples,
                                          config.seqlen, config.seed)
    elif job.get("calibration"):  # a real model's windows, tokenized by the parent
        calibration = torch.load(job["calibration"])
    else:
        vocab = json.loads(Path(job["model"], "config.json").read_text())["vocab_size"]
        calibration = torch.randint(0, vocab, (config.nsamples, config.seqlen), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    if job["mode"] == "stream":
        from llmprune.scale.streaming import prune_streamed

        report = prune_streamed(job["model"], job["out"], calibration, config, offload_activations=job.get("offload"),
                                overwrite=True, progress=False)
    else:
        from transformers import AutoModelForCausalLM

        from llmprune.pruning.runner import prune

        if job["model"] != "llama":
            model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
        if parallel is not None:
            calibration = parallel.share(calibration)
        report = prune(model, calibration, config, progress=False, parallel=parallel)
        if job["mode"] == "memory":
            model.save_pretrained(job["out"])
    seconds = report.seconds
    return {"rank": parallel.rank if parallel else 0, "wall_s": time.perf_counter() - start,
            "calibration_passes_s": seconds["capture"] + seconds["statistics"] + seconds["propagate"],
            "phases": dict(seconds), "peak_rss_bytes": peak_rss_bytes(), "baseline_rss_bytes": baseline, "achieved_sparsity": report.achieved_sparsity}


def real_model(spec: str, model_dir: Path, text: str, nsamples: int, seqlen: int, work: Path) -> str:
    """Save `spec` (an alias, .gguf, HF dir) to `model_dir` as float32 safetensors once; write its calibration
    windows of `text` to a file in `work`, for the children to read."""
    from llmprune.inputs.data import calibration_windows, check_source, load_text, tokenize
    from llmprune.inputs.models import load_model

    check_source(text, "calib", nsamples * seqlen, "--nsamples or --seqlen")
    if not (model_dir / "config.json").is_file():
        print(f"saving {spec} to {model_dir}", file=sys.stderr)
        model, tokenizer, _ = load_model(spec)
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        del model
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = calibration_windows(tokenize(tokenizer, load_text(text, "calib")), nsamples, seqlen, 0)
    path = work / "calibration.pt"
    torch.save(windows, path)
    return str(path)


def parameter_count(model_dir: Path) -> int:
    """Elements of every tensor in a safetensors directory, from the headers (nothing is read)."""
    from safetensors import safe_open

    count = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                count += math.prod(f.get_slice(name).get_shape())
    return count


def full_depth_parameters(config: str) -> int:
    """Parameters of make_random_model's shape at its public depth (a skeleton on the meta device)."""
    from accelerate import init_empty_weights
    from make_random_model import make_config
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(make_config(config))
    return sum(p.numel() for p in model.parameters())


def spawn(job: dict, ranks: int = 1) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(ranks):
        env = os.environ | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, __file__, "--child", json.dumps(job)], env=env,
                                      stdout=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"a benchmark run failed ({job['mode']} {job['method']}): exit {proc.returncode}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def tensor_hashes(directory) -> dict[str, str]:
    import hashlib

    from safetensors import safe_open

    hashes = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                hashes[name] = hashlib.sha256(f.get_tensor(name).contiguous().view(torch.uint8).numpy()).hexdigest()
    return hashes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="llama-1b", help="a shape of make_random_model.py")
    parser.add_argument("--model", default=None, help="a real model instead of a random one: anything load_model "
                        "accepts (qwen-coder-0.5b, a .gguf, a local HF dir)")
    parser.add_argument("--text", default="wiki", help="calibration text of a real model (wiki, code...)")
    parser.add_argument("--layers", type=int, default=None, help="override the shape's decoder layer count")
    parser.add_argument("--dtype", default="float32", help="the random model's dtype on disk (bfloat16 halves it)")
    parser.add_argument("--model-dir", default=None, help="where the random model is (written if absent)")
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--offload", action="store_true", help="keep the calibration activations in a file")
    parser.add_argument("--in-memory", action="store_true", help="also prune in memory and compare outputs bit for bit")
    parser.add_argument("--ranks", default="", help="e.g. 1,2: calibration wall time with that many gloo ranks")
    parser.add_argument("--parallel-model", default="llama", help="model for --ranks (llama: the embedded one)")
    parser.add_argument("--out", default=None, help="default: results/scale, or results/MODEL[/TEXT]/scale with "
                        "--model")
    parser.add_argument("--note", default=None, help="a line stored with the results (e.g. how the machine was shared)")
    parser.add_argument("--quick", action="store_true", help="a tiny model, seconds: checks that this script works")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.quick:
        args.config, args.nsamples, args.seqlen, args.batch, args.in_memory = "tiny", 8, 16, 4, True
        args.ranks, args.parallel_model = args.ranks or "1,2", None
    from make_random_model import make_config, write_random_model

    from llmprune.output.atomic import write_json_atomically, write_text_atomically

    # the JSON and markdown only: pruned weights never go into the repository
    out = Path(args.out) if args.out else benchlib.results_folder(args.model or "llama", args.text, "scale")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="llmprune-bench-scale-"))
    calibration_file = None
    if args.model:
        model_dir = Path(args.model_dir or f"/tmp/llmprune-{Path(args.model.rstrip('/')).name}")
        calibration_file = real_model(args.model, model_dir, args.text, args.nsamples, args.seqlen, work)
        hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
        args.config = Path(args.model.rstrip("/")).name  # the name in the table
    else:
        cut = f"-{args.layers}l" if args.layers else ""
        model_dir = Path(args.model_dir or f"/tmp/llmprune-random-{args.config}{cut}-{args.dtype}")
        if not (model_dir / "model.safetensors.index.json").is_file():
            print(f"writing a random {args.config} to {model_dir}", file=sys.stderr)
            write_random_model(make_config(args.config, args.layers), model_dir, args.dtype)
        hidden = make_config(args.config).hidden_size
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    float32_size = 4 * parameter_count(model_dir)
    full_depth = 4 * full_depth_parameters(args.config) if args.layers and not args.model else float32_size
    activations = args.nsamples * args.seqlen * hidden * 4
    rows = []
    for method in [m for m in args.methods.split(",") if m]:  # --methods "": only the --ranks timings
        base = {"method": method, "model": str(model_dir), "nsamples": args.nsamples, "seqlen": args.seqlen,
                "batch": args.batch, "text": args.text, "calibration": calibration_file}
        streamed = spawn(base | {"mode": "stream", "out": str(work / f"{method}-stream"),
                                 "offload": str(work / "activations") if args.offload else None})[0]
        row = {"method": method, "model_bytes": size, "activation_bytes": activations, "streamed": streamed,
               "rss_over_model": streamed["peak_rss_bytes"] / size,
               "rss_above_baseline_over_model": (streamed["peak_rss_bytes"] - streamed["baseline_rss_bytes"]) / size,
               "rss_minus_activations_over_model": (streamed["peak_rss_bytes"] - activations) / size,
               "float32_bytes": float32_size, "rss_over_float32": streamed["peak_rss_bytes"] / float32_size,
               "full_depth_float32_bytes": full_depth, "rss_over_full_depth_float32":
                   streamed["peak_rss_bytes"] / full_depth}
        if args.in_memory:
            row["in_memory"] = spawn(base | {"mode": "memory", "out": str(work / f"{method}-memory")})[0]
            row["streamed_equals_in_memory"] = tensor_hashes(work / f"{method}-stream") == \
                tensor_hashes(work / f"{method}-memory")
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        shutil.rmtree(work / f"{method}-stream", ignore_errors=True)  # a 7B-shaped output is 27 GB
        shutil.rmtree(work / f"{method}-memory", ignore_errors=True)
    parallel = []
    for ranks in [int(r) for r in args.ranks.split(",") if r]:
        job = {"method": "sparsegpt", "model": args.parallel_model or str(model_dir), "nsamples": args.nsamples,
               "seqlen": args.seqlen, "batch": args.batch, "mode": "ranks", "text": args.text,
               "calibration": None if args.parallel_model else calibration_file}
        result = spawn(job, ranks)
        parallel.append({"ranks": ranks, "calibration_passes_s": max(r["calibration_passes_s"] for r in result),
                         "wall_s": max(r["wall_s"] for r in result)})
    shutil.rmtree(work, ignore_errors=True)  # after the ranks: they read the calibration file in it
    result = {"note": args.note, "config": args.config, "layers": args.layers, "dtype_on_disk": args.dtype, "model": args.model, "text": args.text if args.model else None,
              "model_dir": str(model_dir), "rows": rows, "parallel": parallel,
              "machine": benchlib.machine_info("cpu"), "quick": args.quick}
    write_json_atomically(out / "bench_scale.json", result)
    lines = [f"# Scale benchmark: {args.config if args.model else 'random ' + args.config}, {size / 2**30:.2f} GiB "
             f"on disk, calibration activations "
             f"{activations / 2**20:.0f} MiB", *(["", args.note] if args.note else []), "", "| method | peak RSS (GiB) | RSS / model | (RSS - activations) / model | "
             "(RSS - interpreter) / model | wall (s) | streamed == in-memory |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['streamed']['peak_rss_bytes'] / 2**30:.2f} | {row['rss_over_model']:.2f} | "
                     f"{row['rss_minus_activations_over_model']:.2f} | {row['rss_above_baseline_over_model']:.2f} | {row['streamed']['wall_s']:.1f} | "
                     f"{row.get('streamed_equals_in_memory', 'not run')} |")
    if parallel:
        lines += ["", "| ranks (gloo) | calibration passes (s) | wall (s) |", "|---|---|---|"]
        lines += [f"| {p['ranks']} | {p['calibration_passes_s']:.2f} | {p['wall_s']:.1f} |" for p in parallel]
    if args.dtype != "float32" or any(row["full_depth_float32_bytes"] != row["float32_bytes"] for row in rows):
        lines += ["", "| method | float32 size (GiB) | RSS / float32 size | full-depth float32 size (GiB) | "
                  "RSS / full-depth float32 size |", "|---|---|---|---|---|"]
        lines += [f"| {row['method']} | {row['float32_bytes'] / 2**30:.2f} | {row['rss_over_float32']:.3f} | "
                  f"{row['full_depth_float32_bytes'] / 2**30:.1f} | {row['rss_over_full_depth_float32']:.3f} |"
                  for row in rows]
    write_text_atomically(out / "bench_scale.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
