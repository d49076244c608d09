"""Outputs are written atomically: a folder is built in a temporary folder beside the target, a file in a temporary
file beside it, then renamed into place.

A failed or interrupted run leaves no half-written output, and an existing one survives unless
--overwrite is given, in which case it is replaced only once the new one is complete. Outputs get
ordinary permissions (folders 0755, files 0644 under the usual umask), not the 0700/0600 of temporary ones.
Every file the package writes in place goes through :func:`write_atomically`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from ..errors import LLMPruneError

WRITTEN: list[str] = []  # outputs completed by this process, so an interruption afterwards can say they exist


def check_output(path: str | Path, overwrite: bool) -> Path:
    """Called before any work, so that a long run cannot end in a refusal to write."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise LLMPruneError(f"{path} already exists: pass --overwrite to replace it, or choose another --output")
    if path.exists() and not path.is_dir():
        raise LLMPruneError(f"{path} exists and is not a directory: choose another --output")
    parent = path.parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise LLMPruneError(f"cannot write under {existing}: choose an --output in a folder you can write to")
    return path


def check_free_space(path: str | Path, needed_bytes: int, margin: float = 1.1) -> None:
    """Refuse before the work when the output's filesystem cannot hold the model (plus a 10% margin)."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed_bytes * margin:
        raise LLMPruneError(f"{existing} has {free / 2**30:.2f} GiB free but the model needs about "
                            f"{needed_bytes * margin / 2**30:.2f} GiB: free some space or choose another --output")


def umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _ordinary_permissions(root: Path) -> None:
    mask = umask()
    os.chmod(root, 0o777 & ~mask)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~mask)


@contextmanager
def atomic_directory(path: str | Path, overwrite: bool):
    """Yield a temporary directory; on success it becomes `path`, on any error or interruption it disappears."""
    path = check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield staging
        _ordinary_permissions(staging)
        if path.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            path.rename(retired / path.name)
            staging.rename(path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(path)
        WRITTEN.append(str(path))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Write the file ``path`` through ``write(temporary_path)``, a hidden file beside it, then rename it over
    ``path``: a reader sees the old file or the complete new one, never half of one. On any failure, interruption
    included, the temporary file is removed and ``path`` is left as it was. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    partial = Path(name)
    try:
        write(partial)
        os.chmod(partial, 0o666 & ~umask())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    return write_atomically(path, lambda partial: partial.write_text(text, encoding="utf-8"))


def write_json_atomically(path: str | Path, data) -> Path:
    """``data`` as indented JSON with a final newline."""
    return write_text_atomically(path, json.dumps(data, indent=2) + "\n")
