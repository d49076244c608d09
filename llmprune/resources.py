"""Folders that ship with llmprune: calib/ (text source definitions) and eval/ (lm-eval tasks).

pyproject installs them as package data (`llmprune.calib`, `llmprune.tasks`); when the package is
imported straight from a source checkout (e.g. `python -m llmprune` in the repo root, which shadows
the installed mapping), they are the checkout's top-level folders.
"""

from __future__ import annotations

import importlib.resources
from importlib.abc import Traversable
from pathlib import Path

FOLDERS = {"llmprune.calib": "calib", "llmprune.tasks": "eval"}


def bundled_dir(package: str) -> Traversable:
    try:
        return importlib.resources.files(package)
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / FOLDERS[package]


def source_names() -> list[str]:
    """The named text sources: calib/*.yaml."""
    return sorted(p.name.removesuffix(".yaml") for p in bundled_dir("llmprune.calib").iterdir()
                  if p.name.endswith(".yaml"))
