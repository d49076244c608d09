"""Every failure a user can meet, through the real CLI in a subprocess: a non-zero exit, ONE line
`llmprune: error: ...` naming the fix (a traceback only with --debug), no output or partial folder left,
and an existing output untouched.

Faults that cannot be provoked from outside (a full disk, out of memory, a signal at a chosen moment) are
injected by a few lines of Python run in the same subprocess before `llmprune.cli.main`.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tiny_models import save_tiny_model_dir

FAST = ["--nsamples", "2", "--seqlen", "16", "--eval-windows", "2", "--quiet"]


def cli(args, inject: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    code = "import sys\n" + textwrap.dedent(inject) + "\nfrom llmprune.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})


def one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert done.returncode != 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("llmprune: error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def nothing_left(parent: Path, name: str = "out") -> None:
    assert not (parent / name).exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(f"word{i % 97}" for i in range(4000)))
    return path


def run_args(model, corpus, tmp_path, *extra):
    return ["--model", model, "--calib", f"file:{corpus}", "--eval", f"file:{corpus}", *FAST, *extra,
            "--output", tmp_path / "out"]


# ------------------------------------------------------------------ texts


@pytest.mark.parametrize("name,content,needle", [
    ("latin1.txt", "caf\xe9 ".encode("latin-1") * 400, "is not UTF-8 text"),
    ("empty.txt", b"   \n", "holds no text"),
    ("short.txt", b"just a few words", "fewer than the 32 tokens asked"),
    ("bad.jsonl", b'{"text": "fine"}\n{"text": oops}\n', "bad.jsonl:2: not a JSON object"),
    ("notext.jsonl", b'{"body": "no text field"}\n', 'needs a "text" field'),
])
def test_bad_calibration_text(tmp_path, tiny_dir, corpus, name, content, needle):
    (tmp_path / name).write_bytes(content)
    done = cli(["--model", tiny_dir, "--calib", f"file:{tmp_path / name}", "--eval", f"file:{corpus}", *FAST,
                "--output", tmp_path / "out"])
    one_line_error(done, needle)
    nothing_left(tmp_path)


def test_unreadable_text(tmp_path, tiny_dir, corpus):
    (tmp_path / "secret.txt").write_text("text " * 100)
    inject = """
        import pathlib
        real = pathlib.Path.read_bytes
        def denied(self):
            if self.name == "secret.txt":
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)
        pathlib.Path.read_bytes = denied
    """
    done = cli(run_args(tiny_dir, corpus, tmp_path, "--calib", f"file:{tmp_path / 'secret.txt'}"), inject)
    one_line_error(done, "cannot read", "secret.txt", "permissions")
    nothing_left(tmp_path)


def test_eval_text_shorter_than_one_window(tmp_path, tiny_dir, corpus):
    (tmp_path / "tiny.txt").write_text("a b c")
    done = cli(["--model", tiny_dir, "--calib", f"file:{corpus}", "--eval", f"file:{tmp_path / 'tiny.txt'}",
                *FAST, "--output", tmp_path / "out"])
    one_line_error(done, "fewer than the 16 tokens", "--seqlen")
    nothing_left(tmp_path)


# ------------------------------------------------------------------ models


def test_seqlen_beyond_the_models_positions(tmp_path, corpus):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=64, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(
        tmp_path / "gpt2")
    done = cli(["--model", tmp_path / "gpt2", "--calib", f"file:{corpus}", "--seqlen", "128", "--quiet",
                "--output", tmp_path / "out"])
    one_line_error(done, "--seqlen 128 is longer than the model's 64 positions", "--seqlen 64 or less")
    nothing_left(tmp_path)


def test_not_a_causal_decoder(tmp_path, corpus):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=64)).save_pretrained(tmp_path / "bert")
    one_line_error(cli(run_args(tmp_path / "bert", corpus, tmp_path)), "'bert' model, not a causal decoder")
    nothing_left(tmp_path)


def test_truncated_safetensors(tmp_path, corpus):
    model = save_tiny_model_dir(tmp_path / "cut")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    one_line_error(cli(run_args(model, corpus, tmp_path)), "truncated or damaged", "re-download or re-save")
    nothing_left(tmp_path)


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize("flag", ["--percdamp", "--owl-m", "--owl-lambda", "--recover-lr", "--sparsity"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_numbers_are_refused(tmp_path, flag, value):
    extra = ["--allocation", "owl"] if flag.startswith("--owl") else []
    one_line_error(cli([flag, value, *extra, "--output", tmp_path / "out"]), flag, "finite")
    nothing_left(tmp_path)


def test_bad_choice_is_one_line_and_points_to_help(tmp_path):
    one_line_error(cli(["--method", "obs"]), "unknown --method 'obs'", "see --help")
    one_line_error(cli(["--dtype", "fp8"]), "invalid choice: 'fp8'", "--help")
    one_line_error(cli(["--no-such-flag"]), "unrecognized arguments: --no-such-flag", "--help")


def test_recovery_budget_checked_before_pruning(tmp_path, tiny_dir, corpus):
    done = cli(run_args(tiny_dir, corpus, tmp_path, "--recover", "lora", "--recover-steps", "5000"))
    one_line_error(done, "--recover-steps", "--recover-batch", "--recover-seqlen")
    nothing_left(tmp_path)


def test_offline_push_refused_before_any_work(tmp_path):
    done = cli(["--offline", "--push-to-hub", "me/model", "--output", tmp_path / "out"],
               inject="import builtins; real = builtins.__import__\n"
                      "def guard(name, *a, **k):\n"
                      "    assert not name.startswith('huggingface_hub'), 'imported the Hub client'\n"
                      "    return real(name, *a, **k)\n"
                      "builtins.__import__ = guard")
    one_line_error(done, "--offline never contacts the Hub", "--push-to-hub")
    nothing_left(tmp_path)


# ------------------------------------------------------------------ output


def test_output_under_a_file_is_refused(tmp_path, tiny_dir, corpus):
    (tmp_path / "blocker").write_text("a file, not a folder")
    done = cli(["--model", tiny_dir, "--calib", f"file:{corpus}", *FAST, "--output", tmp_path / "blocker" / "out"])
    one_line_error(done, "cannot write under", "--output")


def test_no_room_for_the_model_is_refused_before_work(tmp_path, tiny_dir, corpus):
    inject = """
        import shutil, collections
        shutil.disk_usage = lambda path: collections.namedtuple("usage", "total used free")(10**6, 10**6, 1000)
    """
    one_line_error(cli(run_args(tiny_dir, corpus, tmp_path), inject), "GiB free but the model needs")
    nothing_left(tmp_path)


def test_disk_full_during_the_save_leaves_nothing(tmp_path, tiny_dir, corpus):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    inject = """
        import errno, transformers
        def full(self, path, *a, **k):
            (__import__("pathlib").Path(path) / "model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        transformers.PreTrainedModel.save_pretrained = full
    """
    done = cli(run_args(tiny_dir, corpus, tmp_path, "--overwrite"), inject)
    one_line_error(done, "no space left on device", "nothing partial was kept")
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"  # the old output survives
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_out_of_memory_is_one_line_with_the_fix(tmp_path, tiny_dir, corpus):
    inject = """
        import torch
        from llmprune.pruning import runner
        def oom(*a, **k):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        runner.prune = oom
    """
    one_line_error(cli(run_args(tiny_dir, corpus, tmp_path), inject), "out of memory", "--batch-size")
    nothing_left(tmp_path)


def test_nan_perplexity_is_an_error_not_a_number(tmp_path, tiny_dir, corpus):
    inject = """
        from llmprune.evaluation import perplexity as module
        real = module.perplexity
        module.perplexity = lambda *a, **k: float("nan") if "pruned" in k.get("desc", "") else real(*a, **k)
    """
    one_line_error(cli(run_args(tiny_dir, corpus, tmp_path), inject), "pruned model's perplexity is nan")
    nothing_left(tmp_path)


def test_outputs_have_ordinary_permissions(tmp_path, tiny_dir, corpus):
    done = cli(run_args(tiny_dir, corpus, tmp_path))
    assert done.returncode == 0, done.stderr
    mask = os.umask(0)
    os.umask(mask)
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    for path in out.rglob("*"):
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~mask, path
    report = json.loads((out / "report.json").read_text())
    assert report["schema_version"] == 2 and report["model_name"] == Path(tiny_dir).name


# ------------------------------------------------------------------ interruptions


@pytest.mark.parametrize("sig,word,code", [(signal.SIGTERM, "terminated", 143), (signal.SIGINT, "interrupted", 130)])
def test_signal_mid_run_removes_the_partial_folder(tmp_path, tiny_dir, corpus, sig, word, code):
    """The signal arrives while the output folder is being written (a slow save): it is removed, and the
    message says no output was written, which is true."""
    inject = f"""
        import signal, time, transformers
        # A shell that starts a job in the background (CI may) leaves SIGINT ignored, and Python then installs
        # no KeyboardInterrupt handler: restore the one an interactive user has.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        real = transformers.PreTrainedModel.save_pretrained
        def slow(self, path, *a, **k):
            real(self, path, *a, **k)
            open({str(tmp_path / 'saving')!r}, "w").close()
            time.sleep(60)
        transformers.PreTrainedModel.save_pretrained = slow
    """
    code_text = "import sys\n" + textwrap.dedent(inject) + "\nfrom llmprune.cli import main\nsys.exit(main(sys.argv[1:]))"
    process = subprocess.Popen([sys.executable, "-c", code_text, *map(str, run_args(tiny_dir, corpus, tmp_path))],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    while not (tmp_path / "saving").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "the save did not start"
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert f"llmprune: {word}; no output was written" in err
    nothing_left(tmp_path)


def test_interrupted_push_says_the_output_exists(tmp_path, tiny_dir, corpus):
    inject = """
        from llmprune.output import publish
        publish.check_push = lambda repo_id, token=None: "token"
        def interrupted(*a, **k):
            raise KeyboardInterrupt
        publish.push = interrupted
    """
    done = cli(run_args(tiny_dir, corpus, tmp_path, "--push-to-hub", "me/model"), inject)
    assert done.returncode == 130
    assert f"finished output kept: {tmp_path / 'out'}" in done.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
