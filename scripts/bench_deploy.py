"""Deploy benchmark: llmprune outputs exported to GGUF and measured inside llama.cpp itself.

    python scripts/bench_deploy.py [OUTPUT_DIR ...] [--model llama] [--text wiki] [--outtype f16,q8_0] [--threads 2]
                                   [--rounds 5] [--out results]
    python scripts/bench_deploy.py --quick        # a tiny random model, seconds (needs the llama.cpp build)

llama.cpp comes from the `llama-cpp-python` package, built from source (its sdist vendors llama.cpp) into a
venv of its own under --cache (default ~/.cache/llmprune/llama-cpp) on first use; the build time is recorded
there and reported. Nothing of it is installed in the project's environment, and CI never builds it.

Models: the dense --model (default the embedded one, `load_model("llama")`, saved to a temporary Hugging Face
directory) and each OUTPUT_DIR given (llmprune outputs: pruned, structured, recovered). For each, and each --outtype:
GGUF file size; llama.cpp prompt processing of 512 tokens and generation of 128 tokens (greedy, KV cache,
batch 1) in tokens/s with --threads threads, like llama-bench's pp512/tg128, the models interleaved round by
round so that the machine's drift does not decide the ratios (median over --rounds); held-out perplexity
through llama.cpp on exactly the token windows llmprune scores (--text's held-out part, 40 x 512), beside ours
in transformers (float32); and whether llama.cpp's tokenizer reproduces ours on the evaluation text.

Writes <out>/deploy.json and <out>/deploy.md (a markdown table); <out> is results/ for the embedded model on wiki
text, results/MODEL/[TEXT/] for another (benchlib.results_folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib  # standard library only at load time: the worker below runs without torch and llmprune

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # pinned: speeds are comparable only build to build


# --------------------------------------------------------------------------------------------------------
# The worker: runs inside the llama.cpp venv (llama_cpp + numpy only; no torch, no llmprune).


def worker(job_path: str) -> None:
    import numpy as np
    from llama_cpp import Llama

    job = json.loads(Path(job_path).read_text())
    threads = job["threads"]
    result: dict = {}
    if job["kind"] == "speed":
        llm = Llama(model_path=job["gguf"], n_ctx=job["pp"] + job["tg"], n_batch=job["pp"], n_ubatch=job["pp"],
                    n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
        prompt = job["tokens"][: job["pp"]]
        llm.reset()
        llm.eval(prompt[:8])  # warm-up: first-touch of the weights and buffers
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        result["pp_tok_s"] = len(prompt) / (time.perf_counter() - start)
        # Generation from an empty context, as llama-bench's tg: one token per decode, the next one greedy.
        llm.reset()
        n_vocab = llm.n_vocab()
        token = job["tokens"][0]
        start = time.perf_counter()
        for _ in range(job["tg"]):
            llm.eval([token])
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
            token = int(logits.argmax())
        result["tg_tok_s"] = job["tg"] / (time.perf_counter() - start)
    elif job["kind"] == "perplexity":
        windows = np.load(job["windows"])
        seqlen = windows.shape[1]
        llm = Llama(model_path=job["gguf"], n_ctx=seqlen, n_batch=seqlen, n_ubatch=seqlen, n_threads=threads,
                    n_threads_batch=threads, logits_all=True, verbose=False)
        total, count = 0.0, 0
        for window in windows.tolist():
            llm.reset()
            llm.eval(window)  # each window alone, no BOS: the same protocol as llmprune's perplexity
            logits = np.asarray(llm.scores[: seqlen - 1], dtype=np.float64)
            top = logits.max(axis=1, keepdims=True)
            log_norm = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
            total += float((log_norm - logits[np.arange(seqlen - 1), window[1:]]).sum())
            count += seqlen - 1
        result["ppl"] = float(np.exp(total / count))
        ours = job["text_ids"]
        theirs = llm.tokenize(job["text"].encode("utf-8"), add_bos=False, special=False)
        mismatch = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        if mismatch is None and len(ours) != len(theirs):
            mismatch = min(len(ours), len(theirs))
        result |= {"tokens_match": mismatch is None, "first_token_mismatch": mismatch, "text_tokens": len(ours)}
    Path(job["result"]).write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------------------
# The driver: runs in the project's environment.


def llama_cpp_python(cache: Path, build: bool) -> tuple[Path | None, dict]:
    """The llama.cpp venv's python, built on first use; (None, {}) when absent and building is not allowed."""
    venv, record = cache / "venv", cache / "build.json"
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python, json.loads(record.read_text()) if record.exists() else {}
    if not build:
        return None, {}
    cache.mkdir(parents=True, exist_ok=True)
    print(f"building {LLAMA_CPP_PYTHON} from source into {venv} (tens of minutes on 2 cores)...", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    env = os.environ | {"CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    with open(cache / "build.log", "w") as log:
        subprocess.run([str(venv / "bin" / "pip"), "install", "--no-cache-dir", "--no-binary", "llama-cpp-python",
                        LLAMA_CPP_PYTHON], check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    version = subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()
    info = {"package": LLAMA_CPP_PYTHON, "version": version, "build_seconds": round(time.perf_counter() - start),
            "cpus": os.cpu_count(), "machine": platform.machine()}
    record.write_text(json.dumps(info, indent=1))
    return python, info


def run_worker(python: Path, job: dict, scratch: Path) -> dict:
    job_file, result_file = scratch / "job.json", scratch / "result.json"
    job_file.write_text(json.dumps(job | {"result": str(result_file)}))
    result_file.unlink(missing_ok=True)
    subprocess.run([str(python), __file__, "--worker", str(job_file)], check=True)
    return json.loads(result_file.read_text())


def decoder_params(model) -> int:
    from llmprune.inputs.models import decoder_layers
    from llmprune.runtime import parameter_count

    return parameter_count(decoder_layers(model)[1].parameters())


def prepare(name: str, model_dir: Path, outtypes: list[str], scratch: Path, seqlen: int, windows_wanted: int,
            eval_text: str, text_chars: int) -> dict:
    """Ours in transformers (perplexity, parameters) and the GGUF files, for one saved model directory."""
    import numpy as np

    from llmprune.evaluation.perplexity import perplexity
    from llmprune.inputs.data import eval_windows, tokenize
    from llmprune.inputs.models import load_model
    from llmprune.output.export import export_gguf
    from llmprune.runtime import parameter_count

    model, tokenizer, _ = load_model(str(model_dir))
    windows = eval_windows(tokenize(tokenizer, eval_text), seqlen, windows_wanted)
    windows_file = scratch / f"{name}.windows.npy"
    np.save(windows_file, windows.numpy().astype(np.int32))
    sample = eval_text[:text_chars]
    entry = {"name": name, "model_dir": str(model_dir), "decoder_params": decoder_params(model),
             "params": parameter_count(model.parameters()),
             "ppl_ours": perplexity(model, windows, progress=False), "windows": len(windows), "seqlen": seqlen,
             "windows_file": str(windows_file), "text": sample, "text_ids": tokenize(tokenizer, sample).tolist(),
             "gguf": {}}
    del model
    for outtype in outtypes:
        path = export_gguf(model_dir, scratch / f"{name}-{outtype}.gguf", outtype)
        entry["gguf"][outtype] = str(path)
    return entry


def table(rows: list[dict], pp: int, tg: int) -> str:
    lines = [f"| model | outtype | decoder params removed | GGUF MiB | pp{pp} tok/s | tg{tg} tok/s | tg vs dense "
             "| ppl llama.cpp | ppl ours | ratio | tokens match |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(value, spec):
        return "-" if value is None else format(value, spec)

    for r in rows:
        lines.append(f"| {r['model']} | {r['outtype']} | {f(r['decoder_params_removed'], '.1%')} "
                     f"| {r['gguf_bytes'] / 2**20:.1f} | {f(r['pp_tok_s'], '.0f')} | {f(r['tg_tok_s'], '.1f')} "
                     f"| {f(r['tg_vs_dense'], '.2f')}x | {f(r['ppl_llama_cpp'], '.2f')} | {f(r['ppl_ours'], '.2f')} "
                     f"| {f(r['ppl_ratio'], '.3f')} | {r['tokens_match']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="llmprune output directories to measure beside the dense model")
    parser.add_argument("--model", default="llama", help="the dense model: anything load_model accepts (llama, "
                        "qwen-coder-0.5b, a local HF dir, a .gguf)")
    parser.add_argument("--text", default="wiki", help="text source whose held-out part is scored (wiki, code...)")
    parser.add_argument("--outtype", default="f16,q8_0", help="comma-separated GGUF outtypes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="speed rounds, every model once per round (median)")
    parser.add_argument("--pp", type=int, default=512, help="prompt tokens processed in one batch")
    parser.add_argument("--tg", type=int, default=128, help="tokens generated one at a time")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "llmprune" / "llama-cpp"))
    parser.add_argument("--no-build", action="store_true", help="fail instead of building llama-cpp-python")
    parser.add_argument("--quick", action="store_true", help="a tiny random model, small sizes: checks the script")
    parser.add_argument("--out", help="folder for deploy.json and deploy.md (default: results, or "
                        "results/MODEL[/TEXT] for another model or text)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    python, build = llama_cpp_python(Path(args.cache).expanduser(), build=not args.no_build)
    if python is None:
        sys.exit(f"llama-cpp-python is not built in {args.cache}: run without --no-build once")
    outtypes = args.outtype.split(",")
    if args.quick:
        args.pp, args.tg, args.seqlen, args.eval_windows, args.rounds = 64, 16, 64, 2, 1

    from llmprune.inputs.data import check_source, load_text, source_description

    check_source(args.text, "eval", args.seqlen)
    eval_text = load_text(args.text, "eval")
    with tempfile.TemporaryDirectory(prefix="bench_deploy.") as tmp:
        scratch = Path(tmp)
        dense_dir = scratch / "dense"
        if args.quick:
            from llmprune.testing import save_tiny_model_dir

            save_tiny_model_dir(dense_dir)
        else:
            from llmprune.inputs.models import load_model

            model, tokenizer, _ = load_model(args.model)
            model.save_pretrained(dense_dir)
            tokenizer.save_pretrained(dense_dir)
            del model
        sources = [("dense", dense_dir)] + [(Path(m).name, Path(m)) for m in args.models]
        entries = [prepare(name, path, outtypes, scratch, args.seqlen, args.eval_windows, eval_text,
                           text_chars=2000 if args.quick else 20000) for name, path in sources]

        speed: dict = {}
        first_tokens = [int(t) for t in __import__("numpy").load(entries[0]["windows_file"])[0]]
        prompt = (first_tokens * (args.pp // len(first_tokens) + 1))[: args.pp]
        for round_index in range(args.rounds):  # interleaved: every model once per round
            for entry in entries:
                for outtype in outtypes:
                    job = {"kind": "speed", "gguf": entry["gguf"][outtype], "threads": args.threads,
                           "pp": args.pp, "tg": args.tg, "tokens": prompt}
                    measured = run_worker(python, job, scratch)
                    for key, value in measured.items():
                        speed.setdefault((entry["name"], outtype, key), []).append(value)
            print(f"speed round {round_index + 1}/{args.rounds} done", flush=True)

        rows = []
        for entry in entries:
            for outtype in outtypes:
                job = {"kind": "perplexity", "gguf": entry["gguf"][outtype], "threads": args.threads,
                       "windows": entry["windows_file"], "text": entry["text"], "text_ids": entry["text_ids"]}
                quality = run_worker(python, job, scratch)
                rows.append({"model": entry["name"], "model_dir": entry["model_dir"], "outtype": outtype,
                             "params": entry["params"], "decoder_params": entry["decoder_params"],
                             "gguf_bytes": Path(entry["gguf"][outtype]).stat().st_size,
                             "pp_tok_s": statistics.median(speed[(entry["name"], outtype, "pp_tok_s")]),
                             "tg_tok_s": statistics.median(speed[(entry["name"], outtype, "tg_tok_s")]),
                             "pp_runs": speed[(entry["name"], outtype, "pp_tok_s")],
                             "tg_runs": speed[(entry["name"], outtype, "tg_tok_s")],
                             "ppl_llama_cpp": quality["ppl"], "ppl_ours": entry["ppl_ours"],
                             "ppl_ratio": quality["ppl"] / entry["ppl_ours"],
                             "tokens_match": quality["tokens_match"],
                             "first_token_mismatch": quality["first_token_mismatch"],
                             "text_tokens": quality["text_tokens"]})
    dense = {r["outtype"]: r for r in rows if r["model"] == "dense"}
    for r in rows:
        r["decoder_params_removed"] = 1 - r["decoder_params"] / dense[r["outtype"]]["decoder_params"]
        r["pp_vs_dense"] = r["pp_tok_s"] / dense[r["outtype"]]["pp_tok_s"]
        r["tg_vs_dense"] = r["tg_tok_s"] / dense[r["outtype"]]["tg_tok_s"]
    report = {"llama_cpp": build, "threads": args.threads, "pp": args.pp, "tg": args.tg, "rounds": args.rounds,
              "seqlen": args.seqlen, "eval_windows": args.eval_windows, "quick": args.quick,
              "model": "tiny random llama (--quick)" if args.quick else args.model,
              "text": {"source": args.text, "description": source_description(args.text)},
              "machine": benchlib.machine_info(), "rows": rows}
    if args.out is None:
        args.out = benchlib.results_folder(args.model, args.text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "deploy_quick" if args.quick else "deploy"
    from llmprune.output.atomic import write_json_atomically, write_text_atomically

    write_json_atomically(out / f"{name}.json", report)
    markdown = table(rows, args.pp, args.tg)
    write_text_atomically(out / f"{name}.md", markdown + "\n")
    print(markdown)
    if build.get("build_seconds"):
        print(f"llama-cpp-python {build.get('version')} built from source in {build['build_seconds']} s")


if __name__ == "__main__":
    main()
