"""How a setting is written: a dataclass field made with `option(...)` (its default, help, CLI group, flag and
choices), shared by name with `same_as(...)` where two commands take the same setting, and the checks every
config's `__post_init__` uses. Torch-free, and imports nothing else of llmprune but its errors.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, field, fields

from .errors import LLMPruneError


def option(default=MISSING, help: str = "", *, group: str | None = None, flag: str | None = None,
           choices=None, metavar: str | None = None, factory=MISSING, cli: bool = True):
    """A config field with what the CLI needs to show it. `flag` defaults to --field-name."""
    metadata = {"help": help, "group": group, "flag": flag, "choices": choices, "metavar": metavar, "cli": cli}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def same_as(owner, name: str, **changes):
    """The field `name` of the dataclass `owner`, for another config that takes the same setting: one default,
    help, flag and set of choices. `changes` adjusts what differs in this command (its group, a flag)."""
    source = next(f for f in fields(owner) if f.name == name)
    metadata = {**source.metadata, **changes}
    if source.default_factory is not MISSING:
        return field(default_factory=source.default_factory, metadata=metadata)
    return field(default=source.default, metadata=metadata)


def flag_of(config, name: str) -> str:
    """The command-line flag of field `name` of a config (class or instance)."""
    found = next(f for f in fields(config) if f.name == name)
    return found.metadata.get("flag") or "--" + name.replace("_", "-")


def check_finite(value, flag: str, positive: bool = False, nonnegative: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LLMPruneError(f"{flag} must be a finite number (got {value!r})")
    if positive and value <= 0:
        raise LLMPruneError(f"{flag} must be positive (got {value:g})")
    if nonnegative and value < 0:
        raise LLMPruneError(f"{flag} must be 0 or more (got {value:g})")


def check_at_least(config, names: tuple[str, ...], minimum: int = 1) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise LLMPruneError(f"{flag_of(config, name)} must be an integer of at least {minimum} (got {value!r})")


def check_choice(config, name: str) -> None:
    """A field's value is one of its `choices` (the CLI checks flags; a config file or the API may not)."""
    found = next(f for f in fields(config) if f.name == name)
    value, allowed = getattr(config, name), found.metadata["choices"]
    if value not in allowed:
        raise LLMPruneError(f"{flag_of(config, name)} must be one of {', '.join(map(str, allowed))} (got {value!r})")


def settle(config, name: str, value) -> None:
    """Set a field of a frozen config while it is being constructed (its `__post_init__` fills defaults)."""
    object.__setattr__(config, name, value)
