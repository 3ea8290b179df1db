"""`mmsec plugin new`: every kind of generated package installs, passes its own tests as
generated, and works from the ``mmsec`` command (what a new plugin author does first)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support import mmsec_env, ok, pip_install, plugins_json, run_mmsec

from mmsec.errors import UsageError
from mmsec.scaffold import KINDS, new_plugin
from mmsec.testing import invoke


def test_names_and_folders_are_checked(tmp_path):
    with pytest.raises(UsageError, match="lower-case"):
        new_plugin("My_Attack", "attack", tmp_path / "a")
    with pytest.raises(UsageError, match="unknown plugin kind"):
        new_plugin("x", "sampler", tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        new_plugin("x", "attack", tmp_path / "c")
    r = invoke("plugin", "new", "fgsm-u", "--kind", "attack", "--dir", tmp_path / "d")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "d" / "mmsec_fgsm_u" / "__init__.py").is_file()
    assert "pip install -e" in r.output


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_generated_package_installs_and_passes_its_own_tests(kind, tmp_path):
    name = f"demo-{kind}"
    source = new_plugin(name, kind, tmp_path / "src")
    target = pip_install(source, tmp_path / "install")
    env = mmsec_env(tmp_path / "cache", target)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--rootdir", str(source), str(source / "tests")],
                          env=env, cwd=source, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = plugins_json(env, tmp_path)[name]
    assert row["error"] is None and row["distribution"] == f"mmsec-{name}"
    assert row["version"] == "0.1.0" and not row["builtin"]
    if kind == "attack":  # the first command an author runs
        run = tmp_path / "run"
        out = json.loads(ok(run_mmsec(["attack", "--plugin", name, "--limit", "200",
                                       "--knn-bank", "0", "--out", str(run), "--json"],
                                      env, tmp_path)))
        assert out["status"] == "completed" and out["metrics"]["fooling_rate"] > \
            out["metrics"]["control_fooling_rate"]
        used = {(p["name"], p["distribution"]) for p in out["plugins"]}
        assert (name, f"mmsec-{name}") in used
