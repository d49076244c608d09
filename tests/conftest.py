import copy
import sys
from pathlib import Path

import pytest

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "scripts")]  # tiny_models, hub_server; benchlib


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
