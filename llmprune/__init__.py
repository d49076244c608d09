"""llmprune: one-shot pruning of Hugging Face causal decoders, layer by layer.

    from llmprune import RunConfig, PruneConfig, run      # the whole job, as the CLI runs it
    from llmprune import prune                            # prune a model already in memory

Names are imported on first use, so `import llmprune` (and `python -m llmprune --help`) stays light.
"""

__version__ = "0.2.0"

_EXPORTS = {
    "PruneConfig": ".config", "RunConfig": ".config", "RecoverConfig": ".config", "LLMPruneError": ".errors",
    "Report": ".report", "PruneReport": ".pruning.runner", "prune": ".pruning.runner", "run": ".pipeline",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'llmprune' has no attribute {name!r}")
