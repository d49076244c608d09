"""Bad input: one readable line naming the fix, a non-zero exit, and no output left behind."""

import json
import os
import subprocess
import sys

import pytest

from llmprune.cli import main
from llmprune.errors import LLMPruneError
from llmprune.output.atomic import atomic_directory
from tiny_models import save_tiny_model_dir

FAST = ["--nsamples", "2", "--seqlen", "16", "--eval-windows", "2", "--quiet"]


def fails(capsys, args, message, tmp_path=None):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert message in err[-1], err
    assert "Traceback" not in "\n".join(err)
    if tmp_path is not None:
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


@pytest.mark.parametrize("args,message", [
    (["--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
    (["--sparsity", "-0.1"], "--sparsity must be in [0, 1)"),
    (["--pattern", "2-4"], "must be 'unstructured' or N:M"),
    (["--pattern", "4:4"], "needs 0 < N < M"),
    (["--pattern", "2:4", "--sparsity", "0.6"], "drop --sparsity or set it to 0.5"),
    (["--nsamples", "0"], "--nsamples must be an integer of at least 1"),
    (["--seqlen", "0"], "--seqlen must be an integer of at least 1"),
    (["--model", "./no/such/dir"], "no such model directory or file"),
    (["--model", "missing.gguf"], "no such GGUF file"),
    (["--calib", "file:/no/such.txt"], "no such text file"),
    (["--calib", "wikipedia"], "unknown text source 'wikipedia'"),
    (["--device", "tpu9"], "is not a device"),
])
def test_bad_input_fails_before_work(capsys, tmp_path, args, message):
    fails(capsys, args + ["--output", str(tmp_path / "out")], message, tmp_path)


def test_absent_cuda_device_fails_before_work(capsys, tmp_path):
    """On a machine without CUDA, any CUDA device is absent; on one with GPUs, the one past the last."""
    import torch

    if torch.cuda.is_available():
        args, message = ["--device", f"cuda:{torch.cuda.device_count()}"], "CUDA device(s) present"
    else:
        args, message = ["--device", "cuda"], "no CUDA GPU is available here; use --device cpu"
    fails(capsys, args + ["--output", str(tmp_path / "out")], message, tmp_path)


def test_unknown_method_is_one_line_pointing_at_help(capsys):
    assert main(["--method", "obs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown --method 'obs'" in err[0] and "see --help" in err[0], err
    assert main(["--dtype", "fp8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'fp8'" in err[0] and "--help" in err[0], err


def test_hub_id_and_hub_dataset_offline(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fails(capsys, ["--model", "someone/some-model"], "Offline, use the embedded model (--model llama)")
    fails(capsys, ["--calib", "c4"], "Offline, use code, wiki or file:PATH")
    fails(capsys, ["--eval", "wikitext2"], "Offline, use code, wiki or file:PATH")


@pytest.fixture
def connection_guard(monkeypatch):
    """Every outgoing connection this process attempts is recorded, then refused as an unreachable Hub would."""
    import socket

    attempts = []

    def refuse(address, *_, **__):
        attempts.append(address)
        raise ConnectionRefusedError(f"test guard: no connection to {address}")

    monkeypatch.setattr(socket.socket, "connect", lambda self, address: refuse(address))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, address: refuse(address))
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.mark.parametrize("args,message", [
    (["--model", "someone/some-model"], "Offline, use the embedded model (--model llama)"),
    (["--calib", "c4"], "Offline, use code, wiki or file:PATH"),
])
def test_offline_flag_never_contacts_the_hub(capsys, monkeypatch, tmp_path, connection_guard, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test: --offline sets both for the process
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    args = [*args, "--output", str(tmp_path / "out")]
    # Without --offline the same command does try to reach the Hub: the guard sees it.
    fails(capsys, args, message, tmp_path)
    assert connection_guard, "no connection attempted: this command cannot show a leak"
    connection_guard.clear()
    fails(capsys, ["--offline", *args], message, tmp_path)
    assert connection_guard == []


def test_existing_output_needs_overwrite(capsys, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    fails(capsys, ["--output", str(tmp_path / "out")], "pass --overwrite to replace it")
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_gguf_without_gguf_package(capsys, monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    fails(capsys, ["--model", str(tmp_path / "m.gguf"), "--method", "magnitude", "--eval", "none"],
          "pip install gguf")


def test_width_not_divisible_and_nan_weights(capsys, tmp_path):
    odd = save_tiny_model_dir(tmp_path / "odd", intermediate=132)
    fails(capsys, ["--model", str(odd), "--pattern", "4:8", *FAST, "--output", str(tmp_path / "out")],
          "down_proj has 132 inputs, not divisible by M=8", tmp_path)
    broken = save_tiny_model_dir(tmp_path / "nan", nan=True)
    fails(capsys, ["--model", str(broken), *FAST, "--output", str(tmp_path / "out")], "NaN or Inf weights", tmp_path)


def test_more_tokens_than_the_text_holds(capsys, tmp_path, tiny_dir):
    (tmp_path / "small.txt").write_text("The quick brown fox. " * 10)
    fails(capsys, ["--model", str(tiny_dir), "--calib", f"file:{tmp_path / 'small.txt'}", "--nsamples", "64",
                   "--seqlen", "64", "--eval", "none", "--output", str(tmp_path / "out")],
          "lower --nsamples or --seqlen", tmp_path)


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out", overwrite=False) as staging:
            (staging / "half.bin").write_bytes(b"x")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_only_when_complete(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(LLMPruneError):
        with atomic_directory(tmp_path / "out", overwrite=True):
            raise LLMPruneError("failed mid-way")
    assert (tmp_path / "out" / "old.txt").exists()
    with atomic_directory(tmp_path / "out", overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_cli_subprocess_on_a_local_model(tmp_path, tiny_dir):
    """The real `python -m llmprune` on a local HF directory: exit 0, a summary, a loadable output."""
    (tmp_path / "text.jsonl").write_text("\n".join('{"text": "The quick brown fox jumps over the lazy dog."}'
                                                   for _ in range(200)))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "llmprune", "--model", str(tiny_dir), "--method", "sparsegpt",
                           "--pattern", "2:4", "--calib", f"file:{tmp_path / 'text.jsonl'}",
                           "--eval", f"file:{tmp_path / 'text.jsonl'}", *FAST, "--output", str(out)],
                          capture_output=True, text=True, env=os.environ)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "achieved sparsity over 21 pruned linears in 3 layers: 0.500000" in done.stdout
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    again = subprocess.run([sys.executable, "-m", "llmprune", "--model", str(tiny_dir), "--output", str(out)],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "pass --overwrite" in again.stderr


def test_help_documents_every_option():
    done = subprocess.run([sys.executable, "-m", "llmprune", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for option in ("--model", "--method", "--sparsity", "--pattern", "--calib", "--nsamples", "--seqlen", "--seed",
                   "--eval", "--device", "--dtype", "--output", "--overwrite", "--skip", "--blocksize",
                   "--percdamp", "2:4 keeps 2 of 4", "(default: 0.01)", "(default: 128)"):
        assert option in done.stdout, option


def test_remove_params_run_reruns_from_its_saved_config(tmp_path, tiny_dir):
    """The saved config keeps --remove-params, not the sparsity it chose (that is the run's plan): a rerun from
    it chooses the same sparsity and reports the same prune."""
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join('{"text": "The quick brown fox jumps over the lazy dog number %d."}' % i
                              for i in range(300)))
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["--model", str(tiny_dir), "--structure", "channels", "--remove-params", "0.2", "--method", "wanda",
                 "--round-to", "1", "--calib", f"file:{text}", "--eval", f"file:{text}", *FAST,
                 "--output", str(first)]) == 0
    saved = json.loads((first / "llmprune_config.json").read_text())
    assert saved["prune"]["remove_params"] == 0.2 and saved["prune"]["sparsity"] is None
    assert main(["--config", str(first / "llmprune_config.json"), "--output", str(second), "--quiet"]) == 0

    def measured(folder):
        report = json.loads((folder / "report.json").read_text())
        for timing in ("seconds", "prune_phases", "rss_after_load_bytes", "peak_rss_bytes", "command"):
            report.pop(timing)
        report["structure"].pop("seconds", None)
        report["scale"].pop("reason")  # names the memory available at the time
        return report

    report = measured(first)
    assert 0 < report["sparsity"] < 1 and report["structure"]["sparsity"] == report["sparsity"]
    assert measured(second) == report
