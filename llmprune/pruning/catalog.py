"""What `--help` lists, read from the method files' `register(...)` calls without importing them.

Importing a method imports torch, which is slow; reading its decorator's literal arguments is not.
The registry (methods/__init__.py) stays the one source: these are the same calls, read as text.
"""

from __future__ import annotations

import ast
from pathlib import Path

METHODS_DIR = Path(__file__).parent / "methods"
IMPORTANCE_DIR = Path(__file__).parent / "structured" / "importance"
KINDS = {"register": "method", "register_update": "update", "register_importance": "importance"}


def catalog() -> dict[str, list[tuple[str, str]]]:
    """{"method": [(name, summary)...], "update": [...], "importance": [...]}, in file order."""
    found: dict[str, list[tuple[str, str]]] = {kind: [] for kind in KINDS.values()}
    for path in [*sorted(METHODS_DIR.glob("*.py")), *sorted(IMPORTANCE_DIR.glob("*.py"))]:
        if path.name.startswith("_"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in KINDS and node.args):
                continue
            summary = next((k.value for k in node.keywords if k.arg == "summary"), None)
            name = node.args[0]
            if isinstance(name, ast.Constant) and isinstance(summary, ast.Constant):
                found[KINDS[node.func.id]].append((name.value, summary.value))
    return found
