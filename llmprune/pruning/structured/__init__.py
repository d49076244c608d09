"""Structured pruning: remove MLP channels, attention heads or whole decoder layers, leaving an ordinary,
smaller Hugging Face model. Entry point: `prune_structured(model, calibration, StructuredConfig(...))`."""

from .config import StructuredConfig
from .runner import prune_structured, sparsity_for_params

__all__ = ["StructuredConfig", "prune_structured", "sparsity_for_params"]
