"""Plugins use only mmsec's public API: the names ``mmsec`` exports and its public modules.

The built-in plugins and the example third-party package are read as source (ast), so a
deep import (``from mmsec.evaluate import load_batch``, ``mmsec.zoo.train._caption_table``)
fails here before it breaks a stranger's plugin after a refactor.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import mmsec

REPO = Path(__file__).resolve().parents[1]
PUBLIC_MODULES = {"mmsec", "mmsec.losses", "mmsec.metrics", "mmsec.fields", "mmsec.avqi",
                  "mmsec.distributed"}
PLUGIN_SOURCES = sorted([*(REPO / "plugins").rglob("*.py"),
                         *(REPO / "docs" / "example-plugin" / "mmsec_example").rglob("*.py")])


def _mmsec_imports(path: Path) -> list[tuple[str, list[str], int]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "mmsec":
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mmsec":
                    found.append((alias.name, [], node.lineno))
    return found


@pytest.mark.parametrize("path", PLUGIN_SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_plugins_import_only_the_public_api(path):
    for module, names, line in _mmsec_imports(path):
        where = f"{path.relative_to(REPO)}:{line}"
        assert module in PUBLIC_MODULES, f"{where} imports {module}, not a public module"
        if module == "mmsec":
            for name in names:
                public = name in mmsec.__all__ or f"mmsec.{name}" in PUBLIC_MODULES
                assert public, f"{where} imports mmsec.{name}, which mmsec does not export"


def test_every_exported_name_resolves():
    for name in mmsec.__all__:
        assert getattr(mmsec, name) is not None, name
    for module in PUBLIC_MODULES:
        importlib.import_module(module)
