"""The example third-party plugin (docs/example-plugin), installed as a separate package.

Each package is pip-installed (no deps, no build isolation, no index) into its
own temporary target folder and made visible to the ``mmsec`` console script
through ``PYTHONPATH`` only, so nothing is installed into the test
environment. A deliberately broken package checks that a plugin failing at
import is reported by name and distribution while the rest keeps working.
Also checks that docs/plugins.md documents every hook.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import ZOO_WEIGHTS
from support import mmsec_env as _env
from support import ok as _ok
from support import pip_install as _pip_install
from support import plugins_json as _plugins
from support import run_mmsec as _mmsec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "example-plugin"
DOCS = ROOT / "docs" / "plugins.md"

BROKEN_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "mmsec-broken-plugin"
version = "0.0.1"

[project.entry-points.mmsec]
broken = "mmsec_broken"

[tool.setuptools]
packages = ["mmsec_broken"]
"""
BROKEN_MODULE = 'raise ImportError("mmsec_broken needs the module not_installed_anywhere")\n'


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("example-plugin")


@pytest.fixture(scope="module")
def cache_dir(workspace: Path) -> Path:
    """One embedding/data cache for the module: the procedural sets are rendered once."""
    return workspace / "cache"


@pytest.fixture(scope="module")
def example_target(workspace: Path) -> Path:
    return _pip_install(EXAMPLE, workspace / "example")


@pytest.fixture(scope="module")
def broken_target(workspace: Path) -> Path:
    source = workspace / "broken-src"
    (source / "mmsec_broken").mkdir(parents=True)
    (source / "pyproject.toml").write_text(BROKEN_PYPROJECT)
    (source / "mmsec_broken" / "__init__.py").write_text(BROKEN_MODULE)
    return _pip_install(source, workspace / "broken")


# ----------------------------------------------------------------------------- the example


def test_example_listed_with_its_distribution(example_target, cache_dir, tmp_path):
    plugins = _plugins(_env(cache_dir, example_target), tmp_path)
    example = plugins["example"]
    assert example["error"] is None
    assert example["distribution"] == "mmsec-example-plugin"
    assert example["version"] == "0.1.0"
    assert example["module"] == "mmsec_example"
    assert example["builtin"] is False
    assert example["items"]["attacks"] == ["example-noise-patch"]
    assert example["descriptions"]["example-noise-patch"]
    pgd = plugins["pgd"]
    assert (pgd["distribution"], pgd["builtin"], pgd["error"]) == ("mmsec", True, None)
    assert pgd["version"]


def test_example_command(example_target, cache_dir, tmp_path):
    env = _env(cache_dir, example_target)
    out = _ok(_mmsec(["example-hello", "--name", "tester"], env, tmp_path))
    assert "Hello, tester!" in out and "mmsec-example-plugin 0.1.0" in out
    assert "example-hello" in _ok(_mmsec(["--help"], env, tmp_path))


@pytest.mark.slow
def test_load_plugins_selection(example_target, cache_dir, tmp_path):
    only_pgd = _plugins(_env(cache_dir, example_target, MMSEC_LOAD_PLUGINS="pgd"), tmp_path)
    assert set(only_pgd) == {"mmsec", "pgd"}
    none = _plugins(_env(cache_dir, example_target, MMSEC_LOAD_PLUGINS=""), tmp_path)
    assert set(none) == {"mmsec"}  # mmsec's own data sources and metrics are always there
    proc = _mmsec(["attack", "-p", "example-noise-patch"],
                  _env(cache_dir, example_target, MMSEC_LOAD_PLUGINS="pgd"), tmp_path)
    assert proc.returncode == 2
    assert "unknown attack plugin 'example-noise-patch'" in proc.stderr


def test_example_bad_option_is_one_line(example_target, cache_dir, tmp_path):
    proc = _mmsec(["attack", "-p", "example-noise-patch", "-o", "stpes", "3"],
                  _env(cache_dir, example_target), tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        'Error: plugin "example-noise-patch": unknown option "stpes", did you mean "steps"? '
        "(known: area, corner, steps, batch_size, lr)"]


@pytest.mark.slow
def test_example_own_tests_pass(example_target, cache_dir, tmp_path):
    """The plugin template's smoke tests pass against the installed package."""
    tests = tmp_path / "tests"
    shutil.copytree(EXAMPLE / "tests", tests)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
         str(tmp_path), str(tests)],
        env=_env(cache_dir, example_target), cwd=tmp_path, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_example_attack_end_to_end(example_target, cache_dir, tmp_path):
    assert ZOO_WEIGHTS.is_file(), f"the embedded zoo model has no weights at {ZOO_WEIGHTS}"
    env = _env(cache_dir, example_target)
    out = tmp_path / "run"
    printed = json.loads(_ok(_mmsec(["attack", "-p", "example-noise-patch", "--json",
                                     "--limit", "300", "--out", str(out)], env, tmp_path)))
    results = json.loads((out / "results.json").read_text())
    assert printed["metrics"] == results["metrics"]
    assert results["status"] == "completed"
    assert (results["plugin"], results["plugin_version"]) == ("example-noise-patch", "0.1.0")
    assert results["options"] == {"area": 0.1, "corner": "bottom-right", "steps": 50,
                                  "batch_size": 64, "lr": 0.1}
    m = results["metrics"]
    # Measured on the shipped zoo model: clean ~0.97 -> adv ~0.2; fooling ~0.8 vs control ~0.45.
    assert m["clean_top1"] >= 0.8, m
    assert m["clean_top1"] - m["adv_top1"] >= 0.3, m
    assert m["fooling_rate"] >= m["control_fooling_rate"] + 0.15, m
    assert m["fit_true_prob_last"] < m["fit_true_prob_first"], m
    assert {"artifacts/example-noise-patch.safetensors", "artifacts/patch.png"} <= set(
        results["artifacts"])
    assert "## Patch optimisation" in (out / "report.md").read_text()

    # The saved artifact is a plain mmsec artifact: `mmsec eval` re-applies it.
    evaluated = json.loads(_ok(_mmsec(
        ["eval", "--attack-artifact", str(out / "artifacts" / "example-noise-patch.safetensors"),
         "--limit", "300", "--knn-bank", "0", "--json", "--out", str(tmp_path / "eval")],
        env, tmp_path)))
    assert evaluated["plugin"] == "example-noise-patch"
    assert evaluated["metrics"]["adv_top1"] == pytest.approx(m["adv_top1"])
    assert evaluated["metrics"]["control_fooling_rate"] == pytest.approx(
        m["control_fooling_rate"])

    # train_loop checkpointed the patch: --resume picks the finished optimisation up again.
    resumed = json.loads(_ok(_mmsec(["attack", "-p", "example-noise-patch", "--json",
                                     "--limit", "300", "--out", str(out), "--resume"],
                                    env, tmp_path)))
    assert resumed["resumed"] is True
    assert resumed["metrics"]["adv_top1"] == pytest.approx(m["adv_top1"])
    assert resumed["metrics"]["fit_true_prob_last"] == pytest.approx(m["fit_true_prob_last"])


# ----------------------------------------------------------------------------- a broken plugin


def test_broken_plugin_reported_by_name(example_target, broken_target, cache_dir, tmp_path):
    env = _env(cache_dir, example_target, broken_target)
    plugins = _plugins(env, tmp_path)
    broken = plugins["broken"]
    assert broken["distribution"] == "mmsec-broken-plugin"
    assert broken["version"] == "0.0.1"
    assert "ImportError" in broken["error"] and "not_installed_anywhere" in broken["error"]
    for name in ("mmsec", "pgd", "example"):
        assert plugins[name]["error"] is None, plugins[name]

    proc = _mmsec(["plugins"], env, tmp_path)
    lines = {ln.split()[0]: ln for ln in _ok(proc).splitlines() if ln.strip()}
    assert "mmsec-broken-plugin 0.0.1" in lines["broken"] and "FAILED" in lines["broken"]
    assert "mmsec-example-plugin 0.1.0" in lines["example"] and "FAILED" not in lines["example"]
    assert "example-noise-patch" in lines["example"]
    assert 'Error importing plugin "broken" (distribution mmsec-broken-plugin 0.0.1)' in (
        proc.stderr)
    assert "Traceback" not in proc.stderr

    proc = _mmsec(["attack", "-p", "broken"], env, tmp_path)
    assert proc.returncode == 1
    assert 'plugin "broken" (distribution mmsec-broken-plugin 0.0.1) failed to load' in (
        proc.stderr)
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_broken_plugin_does_not_stop_others(broken_target, cache_dir, tmp_path):
    assert ZOO_WEIGHTS.is_file(), f"the embedded zoo model has no weights at {ZOO_WEIGHTS}"
    proc = _mmsec(["attack", "-p", "pgd", "--limit", "50", "-o", "steps", "2", "--json",
                   "--out", str(tmp_path / "run")], _env(cache_dir, broken_target), tmp_path)
    results = json.loads(_ok(proc))
    assert results["status"] == "completed" and results["plugin"] == "pgd"
    assert results["options"]["steps"] == 2
    assert "broken" in proc.stderr  # the failure is still reported, once, by name
    # -q: load problems stay in `mmsec plugins`, not on every command
    quiet = _mmsec(["attack", "-p", "pgd", "--limit", "20", "-o", "steps", "1", "-q",
                    "--out", str(tmp_path / "quiet")], _env(cache_dir, broken_target), tmp_path)
    assert quiet.returncode == 0 and "broken" not in quiet.stderr, quiet.stderr
