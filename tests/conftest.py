import copy
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models, hub_server


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M, loaded once per session (about 30 s); tests restore `dense_state`."""
    from llmprune.inputs.models import load_model

    model, tokenizer, source = load_model("llama")
    return model, tokenizer, copy.deepcopy(model.state_dict())


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from tiny_models import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny"))
