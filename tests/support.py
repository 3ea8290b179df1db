"""Helpers for tests that install packages and run the ``mmsec`` console script.

A package is pip-installed (no deps, no build isolation, no index) into its own temporary
target folder and made visible to ``mmsec`` through ``PYTHONPATH`` only, so nothing is
installed into the test environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MMSEC = Path(sys.executable).parent / "mmsec"
ZOO_WEIGHTS = ROOT / "mmsec" / "zoo" / "shapes.safetensors"


def pip_install(source: Path, workdir: Path) -> Path:
    """Install the package at ``source`` into ``workdir/target``; returns the target folder.

    Built from a copy, so the in-tree build (build/, *.egg-info) never touches the source.
    """
    pytest.importorskip("setuptools", reason="--no-build-isolation needs setuptools")
    copy, target = workdir / "src", workdir / "target"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "--quiet", "--target", str(target),
         str(copy)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip install {source.name} failed:\n{proc.stdout}{proc.stderr}"
    return target


def mmsec_env(cache_dir: Path, *targets: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MMSEC_LOAD_PLUGINS", "MMSEC_DEBUG", "PYTHONPATH")}
    path = [str(t) for t in targets]
    if os.environ.get("PYTHONPATH"):
        path.append(os.environ["PYTHONPATH"])
    env.update(PYTHONPATH=os.pathsep.join(path), MMSEC_CACHE_DIR=str(cache_dir),
               MMSEC_PROGRESS="0", OMP_NUM_THREADS="1", **extra)
    return env


def run_mmsec(args: list[str], env: dict[str, str], cwd: Path,
              timeout: int = 600) -> subprocess.CompletedProcess[str]:
    assert MMSEC.is_file(), f"no mmsec console script next to {sys.executable}"
    return subprocess.run([str(MMSEC), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (f"exit {proc.returncode}\n--- stdout\n{proc.stdout}"
                                  f"\n--- stderr\n{proc.stderr}")
    return proc.stdout


def plugins_json(env: dict[str, str], cwd: Path) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads(ok(run_mmsec(["plugins", "--json"], env, cwd)))}
