"""The shared base of every user-facing spec (pool catalog, cluster, training run, serve app,
agent graph): unknown keys are refused, every field is described, and a validation failure
becomes one line a user can act on: the field path, the value, what is valid, the near miss.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, ClassVar, Self

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from raycluster.errors import RayplaneError


class SpecError(RayplaneError, ValueError):
    """A user's spec is wrong. ``str(err)`` is one line naming the field and what is valid."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


# Keys that were renamed: the error names the replacement instead of "unknown field".
RENAMED_KEYS: dict[str, str] = {
    "min_workers": "min_nodes",
    "max_workers": "max_nodes",
    "gpu_sharing": "sharing",
    "time_slice_replicas": "replicas",
}


def field_path(loc: tuple[Any, ...]) -> str:
    """('pools', 2, 'sharing', 'replicas') -> 'pools[2].sharing.replicas'; a key that is empty,
    holds a space, a colon or an unprintable character is quoted (labels['a b']), so that a key
    a user typed never breaks the one-line error."""
    out = ""
    for part in loc:
        text = str(part)
        if isinstance(part, int):
            out += f"[{part}]"
        elif not text or not text.isprintable() or any(c.isspace() or c == ":" for c in text):
            out += f"[{text!r}]"
        else:
            out += ("." if out else "") + text
    return out or "<root>"


def did_you_mean(word: str, choices: list[str] | tuple[str, ...] | set[str]) -> str:
    close = difflib.get_close_matches(str(word), sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of ``loc`` (for listing valid keys)."""
    import typing

    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        if isinstance(current, type) and issubclass(current, BaseModel):
            info = current.model_fields.get(str(part))
            if info is None:
                return None
            current = info.annotation
        # unwrap list[X], dict[str, X], X | None
        while typing.get_origin(current) is not None:
            args = [a for a in typing.get_args(current) if a is not type(None)]
            current = args[-1] if args else None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def format_validation_error(model: type[BaseModel], err: ValidationError, source: str = "") -> str:
    """The first error of a pydantic ValidationError as one actionable line."""
    e = err.errors(include_url=False)[0]
    loc = tuple(e["loc"])
    path = field_path(loc)
    prefix = f"{source}: " if source else ""
    if e["type"] == "extra_forbidden":
        key = str(loc[-1])
        if key in RENAMED_KEYS:
            return f"{prefix}{path}: '{key}' was renamed to '{RENAMED_KEYS[key]}'"
        owner = _model_at(model, loc)
        valid = sorted(owner.model_fields) if owner else []
        hint = did_you_mean(key, valid)
        listing = f"; valid keys: {', '.join(valid)}" if valid else ""
        return f"{prefix}{path}: unknown field{hint}{listing}"
    if e["type"] == "missing":
        return f"{prefix}{path}: field required"
    msg = e["msg"]
    # pydantic prefixes messages raised in validators with "Value error, "
    for p in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(p)
    # Validators of a nested model name the sub-field themselves ("sharing.replicas: ..."):
    # fold it into the path so the line reads pools[1].sharing.replicas: ...
    sub = re.match(r"^([A-Za-z_][\w.\[\]-]*): (.*)$", msg)
    if sub and " " not in sub[1]:
        path = sub[1] if path == "<root>" else f"{path}.{sub[1]}"
        msg = sub[2]
    value = e.get("input")
    shown = "" if isinstance(value, dict | list | BaseModel) or value is None or sub \
        else f" {value!r}:"
    if e["type"] == "enum" and "expected" in e.get("ctx", {}):
        msg = f"must be one of {e['ctx']['expected']}"
        msg += did_you_mean(str(value), [s.strip(" '") for s in e["ctx"]["expected"].replace(" or ", ",").split(",")])
    return f"{prefix}{path}:{shown} {msg}" if path != "<root>" else f"{prefix}{msg}"


class Spec(BaseModel):
    """Base of every rayplane spec: strict keys, described fields, one-line errors."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=False,
                              use_enum_values=False)

    #: What ``from_file`` calls the document in errors (``pools file``, ``training config``).
    spec_kind: ClassVar[str] = "spec"

    @classmethod
    def parse(cls, data: Any, source: str = "") -> Self:
        """Validate ``data`` and raise SpecError (one line) instead of pydantic's report."""
        if not isinstance(data, dict):
            raise SpecError(f"{source or cls.spec_kind}: expected a mapping at the top level, "
                            f"got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise SpecError(format_validation_error(cls, err, source),
                            field=field_path(tuple(err.errors()[0]["loc"]))) from None

    @classmethod
    def from_file(cls, path: str | Path) -> Self:
        path = Path(path)
        if not path.is_file():
            raise SpecError(f"{path}: no such file", field=None)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise SpecError(f"{path}:{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
        return cls.parse(data, source=str(path))
