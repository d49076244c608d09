"""Folders that ship inside the package: llmprune/calib (text source definitions) and llmprune/tasks
(lm-eval task files)."""

from __future__ import annotations

import importlib.resources
from importlib.abc import Traversable


def bundled_dir(package: str) -> Traversable:
    return importlib.resources.files(package)


def source_names() -> list[str]:
    """The named text sources: llmprune/calib/*.yaml."""
    return sorted(p.name.removesuffix(".yaml") for p in bundled_dir("llmprune.calib").iterdir()
                  if p.name.endswith(".yaml"))
