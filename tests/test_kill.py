"""A real kill -9 (and a Ctrl-C) in the middle of `mmsec attack -p uap`, then `--resume`: the
artifact and every metric equal an uninterrupted run's, bit for bit on the CPU (issue 18).

The other training plugins are resumed after a simulated interruption in their own tests
(test_advclip.py, test_backdoor.py, test_cpgc.py, test_invertune.py); this one kills a whole
`mmsec` process with SIGKILL right after a chosen checkpoint is on disk, so nothing in the
process (no ``finally``, no ``atexit``) runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmsec.testing import invoke

# The child: the train split made small (as the tests do in-process), then the CLI, with
# Run.save_checkpoint sending the process `MMSEC_TEST_SIGNAL` after its N-th save.
CHILD = """
import os, signal, sys
# Ctrl-C as in a terminal: a background CI job inherits SIGINT ignored, and Python then
# installs no KeyboardInterrupt handler (the signal would be dropped, not tested)
signal.signal(signal.SIGINT, signal.default_int_handler)
from mmsec import runs
from mmsec.data import procedural
procedural.PROCEDURAL_SIZES["train"] = 512
at, sig = int(os.environ["MMSEC_TEST_KILL_AT"]), getattr(signal, os.environ["MMSEC_TEST_SIGNAL"])
saves, save = [0], runs.Run.save_checkpoint
def killing_save(self, *args, **kwargs):
    path = save(self, *args, **kwargs)
    saves[0] += 1
    if saves[0] == at:
        os.kill(os.getpid(), sig)
    return path
runs.Run.save_checkpoint = killing_save
from mmsec.cli import main
main(sys.argv[1:], prog_name="mmsec")
"""

ARGS = ["attack", "-p", "uap", "-o", "train_items", "128", "-o", "epochs", "4", "-o",
        "batch_size", "32", "--limit", "64", "--knn-bank", "0", "--device", "cpu", "--seed", "3",
        "-q"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted run (in-process), with the same small train split."""
    from mmsec.data import procedural

    before = procedural.PROCEDURAL_SIZES["train"]
    procedural.PROCEDURAL_SIZES["train"] = 512
    try:
        out = tmp_path_factory.mktemp("kill") / "straight"
        result = invoke(*ARGS, "--out", out)
        assert result.exit_code == 0, result.output
    finally:
        procedural.PROCEDURAL_SIZES["train"] = before
    return out


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


@pytest.mark.parametrize(("sig", "at"), [("SIGKILL", 1), ("SIGKILL", 3), ("SIGINT", 2)])
def test_killed_run_resumes_to_the_uninterrupted_result(straight: Path, tmp_path: Path,
                                                         sig: str, at: int, monkeypatch):
    run = tmp_path / "killed"
    env = {**os.environ, "MMSEC_TEST_KILL_AT": str(at), "MMSEC_TEST_SIGNAL": sig,
           "OMP_NUM_THREADS": "1", "MMSEC_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-c", CHILD, *ARGS, "--out", str(run)], env=env,
                          capture_output=True, text=True, timeout=300)
    if sig == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert _results(run)["status"] == "running"  # as the kill left it
    else:  # Ctrl-C: one clean line, exit 130, the run recorded as interrupted
        assert proc.returncode == 130, proc.stderr
        assert proc.stderr.strip().splitlines() == ["Interrupted."]
        assert _results(run)["status"] == "interrupted"
    assert not (run / "artifacts" / "uap.safetensors").exists()

    from mmsec.data import procedural

    monkeypatch.setitem(procedural.PROCEDURAL_SIZES, "train", 512)
    result = invoke(*ARGS, "--out", run, "--resume")
    assert result.exit_code == 0, result.output
    assert "uap: resumed at epoch" in (run / "run.log").read_text()
    done, ref = _results(run), _results(straight)
    assert done["status"] == "completed" and done["resumed"] is True
    assert done["metrics"] == ref["metrics"]
    resumed = load_file(str(run / "artifacts" / "uap.safetensors"))
    expected = load_file(str(straight / "artifacts" / "uap.safetensors"))
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)

    # and a resume that changes a setting is refused, naming it, leaving the run alone
    changed = invoke(*ARGS[:-1], "--seed", "4", "-q", "--out", run, "--resume")
    assert changed.exit_code == 2 and "seed 3 -> 4" in changed.stderr, changed.output
    assert _results(run)["status"] == "completed"
