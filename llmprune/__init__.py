"""llmprune: one-shot pruning of Hugging Face causal decoders, layer by layer."""

__version__ = "0.1.0"

from .config import PruneConfig, RunConfig  # noqa: E402
from .errors import LLMPruneError  # noqa: E402
from .pruning.runner import PruneReport, prune  # noqa: E402

__all__ = ["PruneConfig", "RunConfig", "LLMPruneError", "PruneReport", "prune", "__version__"]
