"""Plugin options: one validator for ``-o KEY VALUE`` and YAML, with errors a person can act on."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import Field, ValidationError

from mmsec.errors import UsageError
from mmsec.options import (
    FloatExpr,
    Options,
    describe_options,
    format_validation_error,
    parse_cli_pairs,
    parse_float_expr,
    validate_options,
)

OWNER = 'plugin "pgd"'


class PGDOptions(Options):
    eps: float = Field(4 / 255, ge=0, description="L-inf budget in pixel units")
    step_size: float = Field(1 / 255, gt=0, description="step per iteration")
    steps: int = Field(10, ge=1, description="iterations")
    random_start: bool = Field(True, description="start from a random point in the ball")


class RichOptions(Options):
    norm: Literal["linf", "l2"] = Field("linf", description="threat model")
    layers: list[int] = Field(default_factory=lambda: [3, 4], description="layers")
    scales: list[float] = Field(default_factory=lambda: [1.0], description="scales")
    target: int | None = Field(None, description="target class")
    gamma: float | None = Field(None, description="optional weight")


def test_defaults_are_used_when_nothing_is_given() -> None:
    options = validate_options(PGDOptions, {}, owner=OWNER)
    assert options == PGDOptions()
    assert options.steps == 10


def test_unknown_option_is_named_with_suggestion_and_known_list() -> None:
    with pytest.raises(UsageError) as info:
        validate_options(PGDOptions, {"epz": "0.1"}, owner=OWNER)
    message = str(info.value)
    assert message.startswith('plugin "pgd": unknown option "epz"')
    assert 'did you mean "eps"' in message
    assert "known: eps, step_size, steps, random_start" in message
    assert info.value.exit_code == 2


def test_ill_typed_option_message() -> None:
    with pytest.raises(UsageError) as info:
        validate_options(PGDOptions, {"steps": "ten"}, owner=OWNER)
    assert str(info.value) == 'plugin "pgd": option "steps": expected an integer, got \'ten\''


def test_every_offending_option_is_reported() -> None:
    with pytest.raises(UsageError) as info:
        validate_options(PGDOptions, {"eps": "-1", "steps": "0", "bogus": 1}, owner=OWNER)
    message = str(info.value)
    assert 'option "eps": must be >= 0' in message
    assert 'option "steps": must be >= 1' in message
    assert 'unknown option "bogus"' in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4/255", 4 / 255), (" 8 / 255 ", 8 / 255), ("1/4", 0.25), ("1e-3", 1e-3), ("0.5", 0.5)],
)
def test_float_fields_accept_fractions(text: str, expected: float) -> None:
    options = validate_options(PGDOptions, {"eps": text}, owner=OWNER)
    assert options.eps == pytest.approx(expected)
    assert parse_float_expr(text) == pytest.approx(expected)
    assert parse_float_expr("-" + text.strip()) == pytest.approx(-expected)


def test_fraction_also_works_on_assignment_and_in_plain_models() -> None:
    from pydantic import BaseModel

    options = PGDOptions()
    options.eps = "16/255"  # type: ignore[assignment]
    assert options.eps == pytest.approx(16 / 255)

    class Plain(BaseModel):
        x: FloatExpr = 0.0

    assert Plain(x="1/8").x == 0.125


@pytest.mark.parametrize("text", ["1/0", "4/", "__import__('os')", "2**8"])
def test_bad_fractions_are_rejected_not_evaluated(text: str) -> None:
    with pytest.raises(ValueError):
        parse_float_expr(text)
    with pytest.raises(UsageError, match='option "eps": expected a number'):
        validate_options(PGDOptions, {"eps": text}, owner=OWNER)


def test_cli_strings_for_bools_lists_optionals_and_choices() -> None:
    options = validate_options(PGDOptions, {"random_start": "false", "steps": "5"}, owner=OWNER)
    assert options.random_start is False and options.steps == 5
    rich = validate_options(
        RichOptions,
        {"layers": "1,2", "scales": "1/2, 1/4", "target": "none", "gamma": "1/3", "norm": "l2"},
        owner=OWNER,
    )
    assert rich.layers == [1, 2]
    assert rich.scales == pytest.approx([0.5, 0.25])
    assert rich.target is None
    assert rich.gamma == pytest.approx(1 / 3)
    assert validate_options(RichOptions, {"layers": "[5, 6]"}, owner=OWNER).layers == [5, 6]
    with pytest.raises(UsageError, match="option \"norm\": expected 'linf' or 'l2', got 'l3'"):
        validate_options(RichOptions, {"norm": "l3"}, owner=OWNER)


def test_yaml_values_validate_the_same_way() -> None:
    options = validate_options(PGDOptions, {"eps": "4/255", "steps": 20}, owner=OWNER)
    assert options.steps == 20 and options.eps == pytest.approx(4 / 255)


def test_non_mapping_values_and_optionless_plugins() -> None:
    with pytest.raises(UsageError, match="options must be a mapping"):
        validate_options(PGDOptions, ["eps"], owner=OWNER)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match='unknown option "x" \\(it takes no options\\)'):
        validate_options(Options, {"x": 1}, owner=OWNER)


def test_parse_cli_pairs_last_wins_and_dashes_become_underscores() -> None:
    pairs = [("eps", "1/255"), ("step-size", "0.1"), ("eps", "8/255")]
    assert parse_cli_pairs(pairs) == {"step_size": "0.1", "eps": "8/255"}
    with pytest.raises(UsageError):
        parse_cli_pairs([("", "1")])


def test_describe_options() -> None:
    rows = {row["name"]: row for row in describe_options(RichOptions)}
    assert list(rows) == ["norm", "layers", "scales", "target", "gamma"]
    assert rows["norm"]["choices"] == ["linf", "l2"]
    assert rows["layers"]["default"] == [3, 4]
    assert rows["target"]["type"] == "int | none"
    assert rows["gamma"]["description"] == "optional weight"
    eps = describe_options(PGDOptions)[0]
    assert eps["type"] == "float" and eps["constraints"] == ">= 0"
    assert eps["default"] == pytest.approx(4 / 255)


def test_format_validation_error_renders_nested_paths() -> None:
    from pydantic import BaseModel, ConfigDict

    class Inner(BaseModel):
        model_config = ConfigDict(extra="forbid")
        value: int = 0

    class Outer(BaseModel):
        model_config = ConfigDict(extra="forbid")
        items: list[Inner] = []

    with pytest.raises(ValidationError) as info:
        Outer.model_validate({"items": [{"value": 1}, {"valeu": 2}]})
    message = format_validation_error(info.value, "cfg.yaml", noun="key", schema=Outer)
    assert message.startswith('cfg.yaml: unknown key "items[1].valeu", did you mean "value"?')
