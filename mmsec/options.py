"""Validated plugin options: one validator for ``-o KEY VALUE`` on the CLI and for YAML recipes.

A plugin declares its options as a pydantic model that subclasses :class:`Options`; the
defaults are the paper's values::

    class PGDOptions(Options):
        eps: float = Field(4 / 255, ge=0, description="L-inf budget, pixels in [0, 1]")
        steps: int = Field(10, ge=1, description="PGD iterations")

Every float field (also inside ``Optional``/``list``) accepts a fraction written as a string,
``"4/255"``, because that is how people write pixel budgets on a command line and in YAML.
List fields accept ``"1,2,3"`` or ``"[1, 2, 3]"`` from the CLI, dict fields YAML flow syntax
(``-o simulator_options "{epochs: 2, area: 0.1}"``), and optional fields ``"none"``/``"null"``.
Defaults are validated too: a plugin whose default does not pass its own field is reported
when it loads.
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, TypeVar, Union

import annotated_types
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticUndefined, to_jsonable_python

from mmsec.errors import UsageError, one_line

__all__ = [
    "FloatExpr",
    "Options",
    "OptionsT",
    "describe_options",
    "format_validation_error",
    "parse_cli_pairs",
    "parse_float_expr",
    "validate_options",
]

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_FRACTION = re.compile(rf"^\s*({_NUMBER})\s*/\s*({_NUMBER})\s*$")
_NONE_WORDS = frozenset({"none", "null", "~"})


def parse_float_expr(text: str) -> float:
    """Parse ``"0.5"``, ``"1e-3"``, ``"4/255"`` or ``"-8 / 255"`` into a float.

    Raises ``ValueError`` for anything else (no general expression evaluation).
    """
    try:
        return float(text)
    except ValueError:
        pass
    match = _FRACTION.match(text)
    if match is None:
        raise ValueError(f"not a number or fraction: {text!r}")
    numerator, denominator = float(match.group(1)), float(match.group(2))
    if denominator == 0:
        raise ValueError(f"division by zero in {text!r}")
    return numerator / denominator


def _float_or_passthrough(value: Any) -> Any:
    """Turn a fraction string into a float; leave anything else for pydantic to judge."""
    if isinstance(value, str):
        try:
            return parse_float_expr(value)
        except ValueError:
            return value
    return value


FloatExpr = Annotated[float, BeforeValidator(_float_or_passthrough)]
"""A float that also accepts ``"4/255"``; for models that do not subclass :class:`Options`."""


def _union_args(annotation: Any) -> tuple[Any, ...] | None:
    """The members of ``X | Y`` / ``Optional[X]``, or ``None`` when not a union."""
    origin = typing.get_origin(annotation)
    if origin is Union or origin is types.UnionType:
        return typing.get_args(annotation)
    return None


def _strip_annotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _split_list(text: str) -> list[Any]:
    """``"1,2,3"`` or ``"[1, 2, 3]"`` (JSON) into a list of items."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            loaded = json.loads(stripped)
        except (json.JSONDecodeError, RecursionError):
            loaded = None
        if isinstance(loaded, list):
            return loaded
    if not stripped:
        return []
    return [item.strip() for item in stripped.split(",")]


def _flow_mapping(text: str) -> Any:
    """``"{epochs: 2, area: 0.1}"`` (YAML flow syntax, safe-loaded) -> a dict; anything else is
    returned unchanged for the field's own validation to reject."""
    import yaml

    try:
        # anchors/aliases could expand a short value into gigabytes once results.json
        # records it; deep nesting overflows the composer's recursion
        if any(isinstance(e, (yaml.AliasEvent,)) for e in yaml.parse(text)):
            return text
        loaded = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):
        return text
    return loaded if isinstance(loaded, dict) else text


def _coerce(value: Any, annotation: Any) -> Any:
    """Make CLI/YAML-friendly spellings acceptable to the field's own validation.

    Only rewrites values that pydantic would reject anyway (fraction strings, comma lists,
    ``"none"``); everything else passes through unchanged so the error messages stay honest.
    """
    annotation = _strip_annotated(annotation)
    members = _union_args(annotation)
    if members is not None:
        members = tuple(_strip_annotated(m) for m in members)
        takes_str = str in members
        if isinstance(value, str) and not takes_str:
            if type(None) in members and value.strip().lower() in _NONE_WORDS:
                return None
            for member in members:
                if member is type(None):
                    continue
                coerced = _coerce(value, member)
                if coerced is not value:
                    return coerced
        elif not isinstance(value, str):
            for member in members:
                if member is not type(None) and typing.get_origin(member) in (list, tuple, set):
                    return _coerce(value, member)
        return value
    if annotation is float:
        return _float_or_passthrough(value)
    origin = typing.get_origin(annotation)
    if (annotation is dict or origin in (dict, Mapping)) and isinstance(value, str):
        return _flow_mapping(value)
    if origin in (list, tuple, set, frozenset, Sequence):
        args = typing.get_args(annotation)
        if isinstance(value, str):
            value = _split_list(value)
        if isinstance(value, (list, tuple)) and args:
            if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
                if len(args) == len(value):
                    return [_coerce(v, a) for v, a in zip(value, args, strict=True)]
                return value
            return [_coerce(v, args[0]) for v in value]
    return value


class Options(BaseModel):
    """Base class of every plugin's options: unknown keys are rejected, assignment validated.

    Subclasses declare fields with defaults (the paper's values) and
    ``Field(description=...)``. Float fields accept ``"4/255"`` automatically.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _accept_cli_spellings(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None:
            return value
        return _coerce(value, field.annotation)


OptionsT = TypeVar("OptionsT", bound=Options)


def parse_cli_pairs(pairs: Sequence[tuple[str, str]]) -> dict[str, str]:
    """Collect repeated ``-o KEY VALUE`` pairs into a dict; a repeated key keeps its last value.

    Keys may be written ``step-size`` or ``step_size``; both become ``step_size``.
    """
    result: dict[str, str] = {}
    for key, value in pairs:
        name = key.strip().replace("-", "_")
        if not name:
            raise UsageError(f"empty option name in -o {key!r} {value!r}")
        result.pop(name, None)  # so the dict order follows the last occurrence
        result[name] = value
    return result


def _format_loc(loc: Sequence[Any]) -> str:
    """``('steps', 1, 'optoins')`` -> ``steps[1].optoins``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def _model_at(schema: type[BaseModel] | None, loc: Sequence[Any]) -> type[BaseModel] | None:
    """The pydantic model that holds the item at ``loc`` (walking fields, lists and dicts)."""
    current: Any = schema
    for part in loc:
        current = _strip_annotated(current)
        members = _union_args(current)
        if members is not None:
            models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
            containers = [m for m in members if typing.get_origin(m) in (list, dict, tuple)]
            current = (models or containers or [None])[0]
        if isinstance(current, type) and issubclass(current, BaseModel) and isinstance(part, str):
            field = current.model_fields.get(part)
            if field is None:
                return None
            current = field.annotation
        elif typing.get_origin(current) in (list, tuple) and isinstance(part, int):
            current = typing.get_args(current)[0]
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        else:
            return None
    current = _strip_annotated(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current
    return None


def _reason(error: Mapping[str, Any]) -> str:
    """A short, person-readable reason for one pydantic error."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    fixed = {
        "int_parsing": "expected an integer",
        "int_type": "expected an integer",
        "int_from_float": "expected an integer",
        "float_parsing": "expected a number (e.g. 0.5 or 4/255)",
        "float_type": "expected a number (e.g. 0.5 or 4/255)",
        "bool_parsing": "expected true or false",
        "bool_type": "expected true or false",
        "string_type": "expected a string",
        "list_type": "expected a list",
        "tuple_type": "expected a list",
        "dict_type": "expected a mapping",
        "model_type": "expected a mapping",
        "model_attributes_type": "expected a mapping",
        "finite_number": "expected a finite number",
    }
    if kind in fixed:
        return fixed[kind]
    bounds = {
        "greater_than": ">",
        "greater_than_equal": ">=",
        "less_than": "<",
        "less_than_equal": "<=",
    }
    if kind in bounds:
        bound = next(iter(ctx.values()), "?")
        return f"must be {bounds[kind]} {bound}"
    if kind in ("literal_error", "enum"):
        return f"expected {ctx.get('expected', 'one of the allowed values')}"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')}"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} item(s)"
    if kind == "too_long":
        return f"takes at most {ctx.get('max_length')} item(s)"
    message = str(error.get("msg", kind))
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
    if message[:1].isupper() and not message[1:2].isupper():
        message = message[0].lower() + message[1:]
    return message


def _shows_input(error: Mapping[str, Any]) -> bool:
    """Whether quoting the offending value helps (not for missing keys or whole mappings)."""
    value = error.get("input", PydanticUndefined)
    if value is PydanticUndefined or isinstance(value, (Mapping, BaseModel)):
        return False
    if error["type"] in ("missing", "extra_forbidden"):
        return False
    return not (error.get("ctx") or {}).get("field")


def _unknown_message(
    name: str, path: str, known: Sequence[str] | None, noun: str, bare: bool
) -> str:
    text = f'unknown {noun} "{path}"'
    if known is None:
        return text
    if not known:
        return text + f" (it takes no {noun}s)" if bare else text + f" (no {noun}s allowed here)"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        text += f', did you mean "{close[0]}"?'
    return text + f" (known: {', '.join(known)})"


def format_validation_error(
    err: ValidationError,
    owner: str,
    *,
    noun: str = "option",
    schema: type[BaseModel] | None = None,
) -> str:
    """Render a pydantic ``ValidationError`` as one line for a person.

    ``owner`` prefixes the line (``'plugin "pgd"'``, ``"recipe.yaml"``); ``noun`` names what
    the keys are (``"option"``, ``"key"``); ``schema`` (the validated model) lets an unknown
    key be answered with the closest known name. Example::

        plugin "pgd": unknown option "epz", did you mean "eps"? (known: eps, steps);
        option "steps": expected an integer, got 'ten'

    A validator may raise ``PydanticCustomError(..., {"field": (...)})`` to point the error at
    a sub-path of its own location (used for cross-field checks in recipes).
    """
    parts: list[str] = []
    for error in err.errors(include_url=False):
        loc = tuple(error.get("loc", ()))
        ctx = error.get("ctx") or {}
        if isinstance(ctx.get("field"), (tuple, list)):
            loc = loc + tuple(ctx["field"])
        path = _format_loc(loc)
        if error["type"] == "extra_forbidden" and loc:
            holder = _model_at(schema, loc[:-1]) if schema is not None else None
            known = list(holder.model_fields) if holder is not None else None
            bare = len(loc) == 1 and holder is not None and holder is schema
            parts.append(_unknown_message(str(loc[-1]), path, known, noun, bare))
            continue
        if error["type"] == "missing":
            parts.append(f'missing required {noun} "{path}"')
            continue
        reason = _reason(error)
        if _shows_input(error):
            reason += f", got {_short_repr(error['input'])}"
        parts.append(f'{noun} "{path}": {reason}' if path else reason)
    return one_line(f"{owner}: " + "; ".join(parts))


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_options(
    schema: type[OptionsT], values: Mapping[str, Any] | OptionsT | None, *, owner: str
) -> OptionsT:
    """Validate ``values`` (CLI strings or YAML values) against a plugin's options schema.

    ``owner`` names who the options belong to and starts the error line, e.g.
    ``'plugin "pgd"'``. Returns the validated instance (defaults filled in); raises
    :class:`~mmsec.errors.UsageError` naming each offending option and why.
    """
    if isinstance(values, schema):
        return values.model_copy()
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise UsageError(f"{owner}: options must be a mapping, got {type(values).__name__}")
    bad_keys = [key for key in values if not isinstance(key, str)]
    if bad_keys:
        raise UsageError(f"{owner}: option names must be strings, got {bad_keys[0]!r}")
    try:
        return schema.model_validate(dict(values))
    except ValidationError as err:
        raise UsageError(format_validation_error(err, owner, schema=schema)) from None


def _type_name(annotation: Any) -> str:
    annotation = _strip_annotated(annotation)
    members = _union_args(annotation)
    if members is not None:
        return " | ".join(_type_name(m) for m in members)
    if annotation is type(None):
        return "none"
    if typing.get_origin(annotation) is Literal:
        return "choice"
    origin = typing.get_origin(annotation)
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation) if a is not Ellipsis)
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(annotation, "__name__", str(annotation))


def _choices(annotation: Any) -> list[Any] | None:
    annotation = _strip_annotated(annotation)
    candidates = _union_args(annotation) or (annotation,)
    for member in candidates:
        member = _strip_annotated(member)
        if typing.get_origin(member) is Literal:
            return list(typing.get_args(member))
    return None


def _constraints(metadata: Sequence[Any]) -> str:
    symbols = [
        (annotated_types.Ge, "ge", ">="),
        (annotated_types.Gt, "gt", ">"),
        (annotated_types.Le, "le", "<="),
        (annotated_types.Lt, "lt", "<"),
        (annotated_types.MinLen, "min_length", "min length"),
        (annotated_types.MaxLen, "max_length", "max length"),
    ]
    found = []
    for item in metadata:
        for kind, attribute, symbol in symbols:
            if isinstance(item, kind):
                found.append(f"{symbol} {getattr(item, attribute)}")
    return ", ".join(found)


def describe_options(schema: type[Options]) -> list[dict[str, Any]]:
    """One JSON-able dict per option, for ``mmsec plugins --json`` and the docs.

    Keys: ``name``, ``type`` (e.g. ``"float"``, ``"int | none"``, ``"choice"``), ``default``,
    ``description``, ``required``, ``choices`` (list or ``None``), ``constraints``
    (e.g. ``">= 0, <= 1"``, or ``""``).
    """
    rows = []
    for name, field in schema.model_fields.items():
        required = field.is_required()
        if required:
            default = None
        elif field.default_factory is not None:
            default = field.default_factory()  # type: ignore[call-arg]
        else:
            default = field.default
        rows.append(
            {
                "name": name,
                "type": _type_name(field.annotation),
                "default": to_jsonable_python(default, fallback=str),
                "description": field.description or "",
                "required": required,
                "choices": _choices(field.annotation),
                "constraints": _constraints(field.metadata),
            }
        )
    return rows
