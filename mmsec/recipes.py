"""YAML recipes: a chain of attack / defend / eval steps, loaded safely and validated strictly.

Example::

    name: backdoor-then-defend
    defaults: {precision: bf16, seed: 1}
    steps:
      - {id: implant, kind: attack, plugin: backdoor, options: {poison_rate: 0.1}}
      - {id: repair, kind: defend, plugin: invertune, model_from: implant}
      - {id: check, kind: eval, model_from: repair, trigger_from: implant}

Only the schema lives here: unknown keys anywhere are errors naming their path
(``steps[1].optoins``), step ids are unique, and ``*_from`` names an earlier step. Plugin
options are validated later, against each plugin's own schema
(:func:`mmsec.options.validate_options`). Running the steps is the API's job.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from mmsec.errors import UsageError
from mmsec.options import format_validation_error

__all__ = ["Defaults", "Recipe", "ResolvedStep", "Step", "load_recipe", "parse_recipe"]

StepKind = Literal["attack", "defend", "eval"]
Precision = Literal["fp32", "bf16", "fp16"]
SETTINGS: tuple[str, ...] = ("model", "pretrained", "data", "device", "precision", "seed", "split",
                             "limit", "clean_items", "knn_bank", "image_size", "compile",
                             "channels_last")
_DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Defaults(_Strict):
    """Settings applied to every step unless the step overrides them."""

    model: str | None = Field(
        None, description='open_clip architecture or "zoo:<name>"; null = embedded default'
    )
    pretrained: str | None = Field(None, description="pretrained tag or checkpoint file")
    data: str | None = Field(None, description="dataset spec; null = embedded default data")
    device: str = Field("auto", pattern=_DEVICE_PATTERN, description="auto, cpu, cuda[:N], mps")
    precision: Precision = Field("fp32", description="fp32, bf16 or fp16")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="random seed")
    split: str = Field("test", description="dataset split")
    limit: int | None = Field(None, ge=1, description="evaluate on N items only")
    clean_items: int = Field(1000, ge=1, description="defend steps: clean train items the "
                                                     "defense may use")
    knn_bank: int = Field(2000, ge=0, description="attack/eval steps: train items of the kNN "
                                                  "bank (0: no kNN metrics)")
    image_size: int | None = Field(None, ge=8, le=4096, description="load file-backed images "
                                                                    "at N x N pixels")
    compile: bool = Field(False, description="run the image tower through torch.compile")
    channels_last: bool = Field(False, description="the image tower in channels-last "
                                                   "memory format")


class Step(_Strict):
    """One step. Settings left out inherit from ``defaults``; ``null`` sets them to null."""

    id: str = Field(pattern=r"^[a-z0-9_-]+$", max_length=64, description="unique step id")
    kind: StepKind = Field(description="attack, defend or eval")
    plugin: str | None = Field(None, description="plugin name (attack/defend only)")
    options: dict[str, Any] = Field(default_factory=dict, description="the plugin's options")
    model: str | None = None
    pretrained: str | None = None
    data: str | None = None
    device: str | None = Field(None, pattern=_DEVICE_PATTERN)
    precision: Precision | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    split: str | None = None
    limit: int | None = Field(None, ge=1)
    clean_items: int | None = Field(None, ge=1)
    knn_bank: int | None = Field(None, ge=0)
    image_size: int | None = Field(None, ge=8, le=4096)
    compile: bool | None = None
    channels_last: bool | None = None
    model_from: str | None = Field(None, description="use the model an earlier step wrote")
    artifact_from: str | None = Field(None, description="apply an earlier attack's artifact")
    trigger_from: str | None = Field(None, description="measure ASR with an earlier trigger")
    robust: str | None = Field(None, description="eval steps: robust accuracy under this "
                                                 "per-image attack (pgd, apgd, autoattack), "
                                                 "configured by options")

    @field_validator("options", mode="before")
    @classmethod
    def _empty_options(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def _check_plugin(self) -> Step:
        if self.kind in ("attack", "defend") and not self.plugin:
            raise PydanticCustomError(
                "recipe_plugin",
                "{kind} steps need a plugin",
                {"kind": self.kind, "field": ("plugin",)},
            )
        if self.kind == "eval" and self.plugin:
            raise PydanticCustomError(
                "recipe_plugin",
                "an eval step takes no plugin (use artifact_from/trigger_from, or robust)",
                {"field": ("plugin",)},
            )
        if self.robust and self.kind != "eval":
            raise PydanticCustomError(
                "recipe_plugin", "robust belongs to eval steps", {"field": ("robust",)})
        if self.robust and (self.artifact_from or self.trigger_from):
            raise PydanticCustomError(
                "recipe_conflict",
                "give one of robust, artifact_from and trigger_from",
                {"field": ("robust",)},
            )
        if self.kind == "eval" and self.options and not self.robust:
            raise PydanticCustomError(
                "recipe_plugin",
                "options of an eval step configure its robust attack: set robust",
                {"field": ("options",)},
            )
        if self.artifact_from and self.trigger_from:
            raise PydanticCustomError(
                "recipe_conflict",
                "give either artifact_from or trigger_from, not both",
                {"field": ("trigger_from",)},
            )
        if self.model_from and {"model", "pretrained"} & self.model_fields_set:
            raise PydanticCustomError(
                "recipe_conflict",
                "model_from replaces model/pretrained; set one or the other",
                {"field": ("model_from",)},
            )
        return self


_COUNTS = ("clean_items", "knn_bank")

# What each reference may point at: models come from attacks (backdoors) and defenses,
# artifacts and triggers from attacks.
_REFERENCES: dict[str, tuple[str, ...]] = {
    "model_from": ("attack", "defend"),
    "artifact_from": ("attack",),
    "trigger_from": ("attack",),
}


class Recipe(_Strict):
    """A validated recipe. Use :meth:`resolved_steps` to get steps with defaults merged."""

    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64,
        description="the recipe's name (the default folder name): letters, digits, _ . -",
    )
    description: str | None = None
    defaults: Defaults = Field(default_factory=Defaults)
    steps: list[Step] = Field(min_length=1)

    @field_validator("defaults", mode="before")
    @classmethod
    def _empty_defaults(cls, value: Any) -> Any:
        return {} if value is None else value

    @model_validator(mode="after")
    def _check_references(self) -> Recipe:
        seen: dict[str, int] = {}
        for index, step in enumerate(self.steps):
            if step.id in seen:
                raise PydanticCustomError(
                    "recipe_duplicate",
                    'duplicate step id "{id}" (first used by steps[{first}])',
                    {"id": step.id, "first": seen[step.id], "field": ("steps", index, "id")},
                )
            for key, allowed in _REFERENCES.items():
                target = getattr(step, key)
                if target is None:
                    continue
                where = ("steps", index, key)
                if target == step.id:
                    message = 'step "{target}" cannot refer to itself'
                elif target not in seen:
                    later = any(s.id == target for s in self.steps[index + 1 :])
                    message = (
                        'step "{target}" comes later; {key} must name an earlier step'
                        if later
                        else 'unknown step "{target}"; {key} must name an earlier step'
                    )
                elif self.steps[seen[target]].kind not in allowed:
                    message = (
                        "{key} must name an "
                        + " or ".join(allowed)
                        + ' step; "{target}" is kind {kind}'
                    )
                else:
                    continue
                context = {"target": target, "key": key, "field": where}
                context["kind"] = self.steps[seen[target]].kind if target in seen else ""
                raise PydanticCustomError("recipe_reference", message, context)
            seen[step.id] = index
        return self

    def _setting(self, step: Step, key: str) -> Any:
        """A step's own setting (even ``null``), else the default; a count left ``null``
        (``clean_items``, ``knn_bank``) takes the default."""
        value = getattr(step, key)
        if key not in step.model_fields_set or (value is None and key in _COUNTS):
            return getattr(self.defaults, key)
        return value

    def resolved_steps(self) -> Iterator[ResolvedStep]:
        """Each step with the defaults merged in (a step's own setting wins, even ``null``)."""
        for index, step in enumerate(self.steps):
            settings = {key: self._setting(step, key) for key in SETTINGS}
            yield ResolvedStep(
                index=index,
                id=step.id,
                kind=step.kind,
                plugin=step.plugin,
                options=dict(step.options),
                model_from=step.model_from,
                artifact_from=step.artifact_from,
                trigger_from=step.trigger_from,
                robust=step.robust,
                **settings,
            )


@dataclass(frozen=True)
class ResolvedStep:
    """A step with every setting concrete; ``options`` are still unvalidated plugin options."""

    index: int
    id: str
    kind: StepKind
    plugin: str | None
    model: str | None
    pretrained: str | None
    data: str | None
    device: str
    precision: Precision
    seed: int
    split: str
    limit: int | None
    clean_items: int
    knn_bank: int
    image_size: int | None = None
    compile: bool = False
    channels_last: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    model_from: str | None = None
    artifact_from: str | None = None
    trigger_from: str | None = None
    robust: str | None = None

    @property
    def label(self) -> str:
        """How errors name this step: ``steps[1] "implant"``."""
        return f'steps[{self.index}] "{self.id}"'


#: a recipe is a few hundred nodes; anchors and aliases may share a block between steps,
#: but what they expand to is bounded ("billion laughs": a 1 KB file of nested aliases
#: expands to gigabytes in any walk of the document)
MAX_NODES = 100_000
MAX_DEPTH = 64


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key repeated in one mapping (YAML keeps the last)
    and documents nested deeper than :data:`MAX_DEPTH`."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self._depth >= MAX_DEPTH:
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found a {type(key).__name__} as a key (keys are names)",
                    key_node.start_mark)
            if key in keys:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r}",
                    key_node.start_mark,
                )
            keys.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many nodes ``node`` stands for once aliases are expanded (memoised per node, so
    this is linear in the file; a node that contains itself counts as unbounded)."""
    key = id(node)
    if key in sizes:
        if sizes[key] < 0:  # still being counted: a recursive alias
            return MAX_NODES + 1
        return sizes[key]
    sizes[key] = -1
    total = 1
    if isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    elif isinstance(node, yaml.SequenceNode):
        children = list(node.value)
    else:
        children = []
    for child in children:
        total += _expanded_size(child, sizes)
        if total > MAX_NODES:
            break
    sizes[key] = total
    return total


def _key_lines(node: yaml.Node | None, prefix: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], int]:
    """Map each path in the document to the 1-based line of its key (or list item)."""
    lines: dict[tuple[Any, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, key_node.value)
            lines[path] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            path = (*prefix, index)
            lines[path] = item.start_mark.line + 1
            lines.update(_key_lines(item, path))
    return lines


def _error_line(err: ValidationError, lines: dict[tuple[Any, ...], int]) -> int | None:
    """The line of the first error's deepest located path."""
    for error in err.errors(include_url=False):
        loc = tuple(error.get("loc", ()))
        extra = (error.get("ctx") or {}).get("field")
        if isinstance(extra, (tuple, list)):
            loc += tuple(extra)
        for end in range(len(loc), 0, -1):
            if loc[:end] in lines:
                return lines[loc[:end]]
    return None


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    """Validate recipe YAML ``text``; ``source`` names it in errors (see :func:`load_recipe`)."""
    try:  # the reader checks the characters as soon as the loader is made
        loader = _UniqueKeyLoader(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{source}: YAML error: {str(exc).splitlines()[0]}") from None
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_NODES:
            raise UsageError(f"{source}: YAML error: the document expands to more than "
                             f"{MAX_NODES:,} nodes (nested anchors and aliases)")
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = exc.problem or exc.context or "invalid YAML"
        if "could not determine a constructor" in problem:
            problem = "unsupported YAML tag " + problem.split("for the tag", 1)[-1].strip()
        raise UsageError(f"{where}: YAML error: {problem}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{source}: YAML error: {str(exc).splitlines()[0]}") from None
    finally:
        loader.dispose()
    if data is None:
        raise UsageError(f"{source}: empty recipe (expected a mapping with 'steps')")
    if not isinstance(data, dict):
        raise UsageError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        line = _error_line(err, _key_lines(node))
        owner = f"{source}:{line}" if line else source
        raise UsageError(format_validation_error(err, owner, noun="key", schema=Recipe)) from None


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Load and validate a recipe file with ``yaml.safe_load`` semantics (no Python tags).

    Every problem raises :class:`~mmsec.errors.UsageError` whose message starts with the file
    name (and line, when known) and names the offending path, e.g.
    ``recipe.yaml:7: unknown key "steps[1].optoins", did you mean "options"? (known: ...)``.
    """
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{source}: no such recipe file") from None
    except IsADirectoryError:
        raise UsageError(f"{source}: is a folder, not a recipe file") from None
    except UnicodeDecodeError:
        raise UsageError(f"{source}: not a UTF-8 text file") from None
    except OSError as exc:
        raise UsageError(f"{source}: cannot read ({exc.strerror})") from None
    return parse_recipe(text, str(source))
