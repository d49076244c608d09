"""Structured pruning: remove MLP channels, attention heads or whole decoder layers, leaving an ordinary,
smaller Hugging Face model. Entry point: `prune_structured(model, calibration, StructuredConfig(...))`.

The runner is imported on first use, so the config (structured/config.py) stays torch-free."""

from .config import StructuredConfig

__all__ = ["StructuredConfig", "prune_structured", "sparsity_for_params"]


def __getattr__(name):
    if name in ("prune_structured", "sparsity_for_params"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
