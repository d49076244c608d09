"""Output directories are written atomically: built in a temporary folder beside the target, then renamed.

A failed or interrupted run leaves no half-written output, and an existing one survives unless
--overwrite is given, in which case it is replaced only once the new one is complete.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import LLMPruneError


def check_output(path: str | Path, overwrite: bool) -> Path:
    """Called before any work, so that a long run cannot end in a refusal to write."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise LLMPruneError(f"{path} already exists: pass --overwrite to replace it, or choose another --output")
    if path.exists() and not path.is_dir():
        raise LLMPruneError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def atomic_directory(path: str | Path, overwrite: bool):
    """Yield a temporary directory; on success it becomes `path`, on any error it disappears."""
    path = check_output(path, overwrite)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield staging
        if path.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            path.rename(retired / path.name)
            staging.rename(path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
