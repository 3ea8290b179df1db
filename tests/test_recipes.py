"""YAML recipes: safe loading, a strict schema, and errors that name the file, line and path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mmsec.errors import UsageError
from mmsec.recipes import Recipe, load_recipe

CHAIN = """\
name: backdoor-then-defend
description: implant a backdoor, remove it, measure both
defaults:
  model: zoo:shapes
  precision: bf16
  seed: 3
steps:
  - id: implant
    kind: attack
    plugin: backdoor
    options: {poison_rate: 0.1, eps: 4/255}
  - id: repair
    kind: defend
    plugin: invertune
    model_from: implant
    seed: 7
  - id: check
    kind: eval
    trigger_from: implant
    model: null
    split: val
"""


def _write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def _error(tmp_path: Path, text: str) -> str:
    path = _write(tmp_path, text)
    with pytest.raises(UsageError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert info.value.exit_code == 2
    return message


def test_valid_chain_resolves_defaults(tmp_path: Path) -> None:
    recipe = load_recipe(_write(tmp_path, CHAIN))
    assert isinstance(recipe, Recipe) and recipe.name == "backdoor-then-defend"
    implant, repair, check = recipe.resolved_steps()
    assert implant.model == "zoo:shapes" and implant.precision == "bf16" and implant.seed == 3
    assert implant.options == {"poison_rate": 0.1, "eps": "4/255"}  # validated later
    assert implant.device == "auto" and implant.split == "test"
    assert repair.seed == 7 and repair.model_from == "implant"
    assert check.model is None  # an explicit null overrides the default
    assert check.model_from is None
    assert check.split == "val" and check.trigger_from == "implant" and check.plugin is None
    assert check.label == 'steps[2] "check"'


def test_unknown_key_names_its_path_line_and_suggestion(tmp_path: Path) -> None:
    message = _error(
        tmp_path,
        """\
        steps:
          - id: a
            kind: attack
            plugin: pgd
            optoins: {eps: 0.1}
        """,
    )
    assert 'unknown key "steps[0].optoins"' in message
    assert 'did you mean "options"' in message
    assert message.startswith(f"{tmp_path / 'recipe.yaml'}:5:")


def test_unknown_top_level_and_defaults_keys(tmp_path: Path) -> None:
    message = _error(tmp_path, "stepz: []\n")
    assert 'unknown key "stepz", did you mean "steps"?' in message
    assert 'missing required key "steps"' in message
    message = _error(tmp_path, "defaults: {precison: bf16}\nsteps: [{id: a, kind: eval}]\n")
    assert 'unknown key "defaults.precison", did you mean "precision"?' in message


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        (
            "[{id: e, kind: eval, model_from: a}, {id: a, kind: attack, plugin: pgd}]",
            'key "steps[0].model_from": step "a" comes later',
        ),
        ("[{id: e, kind: eval, artifact_from: nowhere}]", 'unknown step "nowhere"'),
        ("[{id: e, kind: eval, trigger_from: e}]", "cannot refer to itself"),
        (
            "[{id: a, kind: attack, plugin: p}, {id: b, kind: eval, artifact_from: a},"
            " {id: c, kind: eval, model_from: b}]",
            'key "steps[2].model_from": model_from must name an attack or defend step',
        ),
    ],
)
def test_references_must_name_earlier_suitable_steps(
    tmp_path: Path, steps: str, expected: str
) -> None:
    assert expected in _error(tmp_path, f"steps: {steps}\n")


def test_model_from_excludes_model(tmp_path: Path) -> None:
    message = _error(
        tmp_path,
        "steps: [{id: a, kind: attack, plugin: p}, {id: b, kind: eval, model_from: a, model: x}]\n",
    )
    assert 'key "steps[1].model_from": model_from replaces model/pretrained' in message


def test_step_ids_unique_and_well_formed(tmp_path: Path) -> None:
    message = _error(tmp_path, "steps: [{id: a, kind: eval}, {id: a, kind: eval}]\n")
    assert 'key "steps[1].id": duplicate step id "a"' in message
    assert 'key "steps[0].id": must match' in _error(tmp_path, "steps: [{id: A b, kind: eval}]\n")


def test_plugin_required_for_attack_and_forbidden_for_eval(tmp_path: Path) -> None:
    message = _error(tmp_path, "steps: [{id: a, kind: attack}, {id: b, kind: eval, plugin: x}]\n")
    assert 'key "steps[0].plugin": attack steps need a plugin' in message
    assert 'key "steps[1].plugin": an eval step takes no plugin' in message
    message = _error(tmp_path, "steps: [{id: a, kind: train}]\n")
    assert "key \"steps[0].kind\": expected 'attack', 'defend' or 'eval', got 'train'" in message


def test_robust_belongs_to_eval_steps_and_configures_with_options(tmp_path: Path) -> None:
    ok = _write(tmp_path, "steps: [{id: r, kind: eval, robust: apgd, options: {eps: 2/255}}]\n")
    (step,) = load_recipe(ok).resolved_steps()
    assert step.robust == "apgd" and step.options == {"eps": "2/255"}
    message = _error(tmp_path, "steps: [{id: a, kind: attack, plugin: pgd, robust: pgd}]\n")
    assert 'key "steps[0].robust": robust belongs to eval steps' in message
    message = _error(tmp_path, "steps: [{id: a, kind: eval, options: {eps: 1}}]\n")
    assert "options of an eval step configure its robust attack" in message
    message = _error(tmp_path, "steps: [{id: a, kind: attack, plugin: pgd}, "
                               "{id: b, kind: eval, robust: pgd, artifact_from: a}]\n")
    assert "give one of robust, artifact_from and trigger_from" in message


def test_yaml_syntax_error_gives_file_and_line(tmp_path: Path) -> None:
    message = _error(tmp_path, "steps:\n  - id: a\n    kind: [attack\n  - id: b\n")
    path = tmp_path / "recipe.yaml"
    assert message.startswith(f"{path}:4: YAML error")


def test_python_tags_are_rejected(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    message = _error(
        tmp_path, f'steps: !!python/object/apply:os.system ["touch {marker}"]\nname: x\n'
    )
    assert "unsupported YAML tag" in message and ":1:" in message
    assert not marker.exists()


def test_duplicate_yaml_keys_are_errors(tmp_path: Path) -> None:
    assert "duplicate key 'steps'" in _error(tmp_path, "steps: []\nsteps: []\n")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", "empty recipe"), ("- a\n- b\n", "top level must be a mapping, got list")],
)
def test_empty_or_non_mapping_recipes(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in _error(tmp_path, text)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="nope.yaml: no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")
