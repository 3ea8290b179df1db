"""The public API is documented: every hook, every exported name, every recipe key and
every testing fixture has its place in docs/, so nothing a plugin author relies on is
undocumented (as datasette's docs tests do)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import mmsec
from mmsec import hookspecs
from mmsec.recipes import Defaults, Recipe, Step

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _hookspecs() -> dict[str, list[str]]:
    return {name: list(inspect.signature(fn).parameters)
            for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(fn, "mmsec_spec")}


def test_every_hook_has_a_section_with_its_signature():
    text = (DOCS / "hooks.md").read_text()
    specs = _hookspecs()
    assert specs
    for name, args in specs.items():
        assert f"## {name}({', '.join(args)})" in text, f"docs/hooks.md lacks hook {name}"


@pytest.mark.parametrize("name", sorted(mmsec.__all__))
def test_every_public_name_is_documented(name):
    text = (DOCS / "api.md").read_text()
    assert re.search(rf"`{re.escape(name)}[`(]", text), f"docs/api.md lacks `{name}`"


@pytest.mark.parametrize("model", [Recipe, Defaults, Step], ids=lambda m: m.__name__)
def test_every_recipe_key_is_documented(model):
    text = (DOCS / "recipes.md").read_text()
    for key in model.model_fields:
        assert f"| `{key}` |" in text, f"docs/recipes.md lacks the key {key!r}"


def test_every_testing_fixture_is_documented():
    import mmsec.testing as testing

    text = (DOCS / "plugins.md").read_text()
    for name in ("mmsec_registry", "tiny_model", "tiny_data", "run_context", *testing.__all__):
        assert f"`{name}" in text, f"docs/plugins.md lacks mmsec.testing's {name}"


def test_the_example_plugin_uses_only_documented_hooks():
    source = (DOCS / "example-plugin" / "mmsec_example" / "__init__.py").read_text()
    used = set(re.findall(r"@hookimpl\s+def (\w+)\(", source))
    assert used and used <= set(_hookspecs())
