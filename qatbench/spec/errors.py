"""One line for a pydantic ValidationError of an experiment file: key path, message, value.

:func:`describe_validation_error` turns the first error into ``key.path: message (got
value)``, says how many more there are, and for an unknown key lists the keys allowed at
that place with the closest match, so a typo in a YAML file names its fix. Used for the
experiment itself (:mod:`qatbench.spec.schema`) and for each method's options
(:mod:`qatbench.spec.checks`).
"""

from __future__ import annotations

import difflib
from typing import Any, get_args

from pydantic import BaseModel, ValidationError


def describe_validation_error(exc: ValidationError, model: type[BaseModel]) -> str:
    """First validation error as 'key.path: message (got value)' plus how many more.

    An unknown key is reported with the keys allowed at that place and the closest match.
    """
    errors = exc.errors(include_url=False)
    # An unknown key first: a typo (`metods:`) explains the required key it hides.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    parts = tuple(p for p in first["loc"] if p != "[key]")  # pydantic's marker for dict keys
    loc = _key_path(parts)
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, parts)
        guess = difflib.get_close_matches(str(parts[-1]), allowed, n=1)
        msg = "unknown key" + (f" (did you mean {guess[0]!r}?)" if guess else "")
        msg += f"; allowed: {', '.join(allowed)}"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{loc or '(top level)'}: {msg}{shown}{more}"


def _allowed_keys(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the (nested) model that holds the key at ``loc``."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if _is_model(current) else None
        if field is None:
            return []
        current = _inner_model(field.annotation)
    return sorted(current.model_fields) if _is_model(current) else []


def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseModel)


def _inner_model(annotation: Any) -> Any:
    """The pydantic model inside ``X``, ``list[X]`` or ``X | None``, else None."""
    if _is_model(annotation):
        return annotation
    for arg in get_args(annotation):
        found = _inner_model(arg)
        if found is not None:
            return found
    return None


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).isprintable() or not str(part).strip() or " " in str(part):
            out += f"[{str(part)!r}]"  # a key YAML allows but a one-line path cannot show
        else:
            out += f".{part}" if out else str(part)
    return out
