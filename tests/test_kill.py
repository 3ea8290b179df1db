"""A real kill -9 (and a Ctrl-C) at 28 points of `mmsec` training runs, then `--resume`: the
artifacts, every metric and every logged training curve equal an uninterrupted run's, bit
for bit on the CPU (issue 18).

Covered: the UAP, AdvCLIP's patch generator (GAN), the backdoor implant, FARE fine-tuning,
C-PGC's generators and InverTune in each stage (its simulator, a child run that identifies
the target; the trigger inversion; the tuning), each killed

- ``save:N`` right after its N-th checkpoint is on disk,
- ``write:N`` during its N-th checkpoint write (the temporary file written and synced, the
  rename not done: the previous checkpoint must still be the one used),
- ``step:N`` right after its N-th optimiser step (mid-epoch: the steps since the last
  checkpoint are lost and must be replayed, with the same batches and random numbers),
- ``done:N`` right after its N-th stage finished (between two stages),
- ``call:N:module.function`` right after the N-th call of a function (InverTune's target
  probes, which keep no checkpoint: a resumed run repeats them and must find the same).

A point may name a loop (``save:1:invert``): then only that loop's checkpoints or steps count.

Speed: every run (the reference, the killed one, the resumed one) is a fork of one warm
server process that has imported mmsec and torch and loaded the model once, so a kill point
costs its training, not Python's start-up. The killed process is a real process that gets a
real SIGKILL: nothing in it (no ``finally``, no ``atexit``) runs.
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

from mmsec.scalars import read_scalars

# The server: imports mmsec once, then for each JSON line on stdin forks a child that runs the
# CLI (with the kill hook of that line installed) and answers with the child's exit status
# (-N: killed by signal N), as subprocess does.
SERVER = r"""
import json, os, signal, sys
from mmsec import runs
from mmsec.data import procedural
procedural.PROCEDURAL_SIZES["train"] = 512  # the train split made small, as the tests do
from mmsec.cli import main
from mmsec.model import load_model
import torch
torch.set_num_threads(1)
load_model(device="cpu")  # warm: the children share it


def install(spec, sig):
    kind, *rest = spec.split(":")
    n, where, count = int(rest[0]) if rest else 0, rest[1] if len(rest) > 1 else "", [0]

    def hit():
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), sig)

    if kind in ("save", "done"):
        save = runs.Run.save_checkpoint

        def killing_save(self, state, meta, *, slot="main", rng=True):
            path = save(self, state, meta, slot=slot, rng=rng)
            if where in slot and (kind == "save" or meta.get("done")):
                hit()
            return path
        runs.Run.save_checkpoint = killing_save
    elif kind == "write":  # mmsec.io.atomic_open renames the finished temporary file
        replace = os.replace

        def killing_replace(src, dst, *args, **kwargs):
            dst_path = str(dst)
            if f"{os.sep}checkpoints{os.sep}" in dst_path and where in dst_path:
                hit()
            return replace(src, dst, *args, **kwargs)
        os.replace = killing_replace
    elif kind == "step":
        log = runs.Run.log_scalars

        def killing_log(self, tag, step, values, *, epoch=None, scope="step"):
            log(self, tag, step, values, epoch=epoch, scope=scope)
            if scope == "step" and where in tag:
                hit()
        runs.Run.log_scalars = killing_log
    elif kind == "call":  # after the N-th call of a function: call:N:package.module.function
        import importlib
        module, name = where.rsplit(".", 1)
        module = importlib.import_module(module)
        function = getattr(module, name)

        def killing_call(*args, **kwargs):
            out = function(*args, **kwargs)
            hit()
            return out
        setattr(module, name, killing_call)
    elif kind != "none":
        raise ValueError(spec)


for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            out = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, 1)
            os.dup2(out, 2)
            # Ctrl-C as in a terminal: a background CI job inherits SIGINT ignored, and
            # Python then installs no KeyboardInterrupt handler (the signal would be dropped)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            install(job["kill"], getattr(signal, job["signal"]))
            main(job["args"], prog_name="mmsec")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    print(json.dumps({"code": code}), flush=True)
"""

COMMON = ["--device", "cpu", "--seed", "3", "-q"]
# tiny schedules: a few steps a stage, checkpoints at every epoch end
SCENARIOS = {
    "uap": ["attack", "-p", "uap", "-o", "train_items", "128", "-o", "epochs", "4",
            "-o", "batch_size", "32", "--limit", "64", "--knn-bank", "0"],
    "advclip": ["attack", "-p", "advclip", "-o", "train_items", "64", "-o", "epochs", "3",
                "-o", "batch_size", "16", "-o", "val_items", "0", "--limit", "64",
                "--knn-bank", "0"],
    "backdoor": ["attack", "-p", "backdoor", "-o", "trigger", "badnets", "-o", "train_items",
                 "128", "-o", "epochs", "2", "-o", "batch_size", "32", "-o", "eval_items", "0",
                 "-o", "min_steps", "0", "-o", "early_stop", "false", "--limit", "64"],
    "fare": ["defend", "-p", "fare", "-o", "steps", "8", "-o", "batch_size", "16",
             "-o", "attack_steps", "1", "-o", "warmup_steps", "0", "--clean-items", "64",
             "--limit", "64"],
    "cpgc": ["attack", "-p", "cpgc", "-o", "train_items", "32", "-o", "epochs", "2",
             "-o", "batch_size", "8", "--limit", "64"],
    # simulator (a UAP child run: 2 epochs of 2 steps), inversion (2 epochs of 2 steps),
    # tuning (12 steps)
    "invertune": ["defend", "-p", "invertune", "-o", "simulator", "uap",
                  "-o", "simulator_options", '{"epochs": 2, "batch_size": 32}',
                  "-o", "clean_items", "64", "-o", "invert_epochs", "2", "-o", "invert_batch",
                  "32", "-o", "invert_min_steps", "0", "-o", "tune_steps", "12",
                  "-o", "tune_batch", "16", "-o", "rounds", "1", "--clean-items", "64",
                  "--limit", "64"],
    # the target found by probes (no checkpoint: a kill there repeats them, identically)
    "invertune-probes": ["defend", "-p", "invertune", "-o", "simulator", "auto",
                         "-o", "candidates", "2", "-o", "probe_families", "patch",
                         "-o", "probe_steps", "2", "-o", "probe_batch", "8", "-o", "clean_items", "64", "-o", "invert_epochs",
                         "1", "-o", "invert_batch", "32", "-o", "invert_min_steps", "0",
                         "-o", "tune_steps", "4", "-o", "tune_batch", "16", "-o", "rounds",
                         "1", "--clean-items", "64", "--limit", "64"],
}

# (scenario, kill point, signal): 28 points
POINTS = [
    ("uap", "save:1", "SIGKILL"),
    ("uap", "save:3", "SIGKILL"),
    ("uap", "write:2", "SIGKILL"),
    ("uap", "step:6", "SIGKILL"),
    ("uap", "save:2", "SIGINT"),
    ("advclip", "save:1", "SIGKILL"),
    ("advclip", "save:2", "SIGKILL"),
    ("advclip", "write:2", "SIGKILL"),
    ("advclip", "step:5", "SIGKILL"),
    ("advclip", "step:11", "SIGKILL"),
    ("advclip", "step:6", "SIGINT"),
    ("backdoor", "save:1", "SIGKILL"),
    ("backdoor", "write:1", "SIGKILL"),
    ("backdoor", "step:2", "SIGKILL"),
    ("backdoor", "step:7", "SIGKILL"),
    ("fare", "save:1", "SIGKILL"),
    ("fare", "step:3", "SIGKILL"),
    ("fare", "write:2", "SIGKILL"),
    ("cpgc", "save:1", "SIGKILL"),
    ("cpgc", "step:6", "SIGKILL"),
    ("invertune", "save:1:simulator", "SIGKILL"),
    ("invertune", "done:1", "SIGKILL"),
    ("invertune", "step:1:invert", "SIGKILL"),
    ("invertune", "save:1:invert", "SIGKILL"),
    ("invertune", "done:2", "SIGKILL"),
    ("invertune", "step:5:tune", "SIGKILL"),
    ("invertune", "write:1:tune", "SIGKILL"),
    ("invertune-probes", "call:2:mmsec_plugins.invertune.probes.fit_probe", "SIGKILL"),
]


class Server:
    """The warm process that forks every run (see ``SERVER``)."""

    def __init__(self, logs: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "MMSEC_PROGRESS": "0"}
        self.logs, self.n = logs, 0
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def run(self, args: list, kill: str = "none", sig: str = "SIGKILL") -> tuple[int, str]:
        """Run ``mmsec ARGS`` in a fresh fork; returns (exit status, its stdout + stderr)."""
        self.n += 1
        log = self.logs / f"{self.n}.log"
        job = {"args": [str(a) for a in args], "kill": kill, "signal": sig, "log": str(log)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, f"the kill server died (exit {self.proc.poll()})"
        return json.loads(answer)["code"], log.read_text(errors="replace")

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("kill-logs"))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def straight(server, tmp_path_factory):
    """The uninterrupted run of each scenario (made once, on first use)."""
    root, done = tmp_path_factory.mktemp("straight"), {}

    def get(name: str) -> Path:
        if name not in done:
            code, output = server.run([*SCENARIOS[name], *COMMON, "--out", root / name])
            assert code == 0, output
            done[name] = root / name
        return done[name]

    return get


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def _untimed(metrics: dict) -> dict:
    """The metrics less wall-clock ones (``implant_seconds``)."""
    return {k: v for k, v in metrics.items() if not k.endswith("_seconds")}


def _tensors(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.relative_to(run).as_posix(): load_file(str(p))
            for p in sorted((run / "artifacts").rglob("*.safetensors"))}


@pytest.mark.parametrize(("name", "kill", "sig"), POINTS,
                         ids=[f"{n}-{k}-{s}" for n, k, s in POINTS])
def test_killed_run_resumes_to_the_uninterrupted_result(server, straight, tmp_path: Path,
                                                         name: str, kill: str, sig: str):
    ref = straight(name)
    run = tmp_path / "killed"
    args = [*SCENARIOS[name], *COMMON, "--out", run]
    code, output = server.run(args, kill, sig)
    if sig == "SIGKILL":
        assert code == -signal.SIGKILL, output
        assert _results(run)["status"] == "running"  # as the kill left it
    else:  # Ctrl-C: one clean line, exit 130, the run recorded as interrupted
        assert code == 130, output
        assert output.strip().splitlines() == ["Interrupted."]
        assert _results(run)["status"] == "interrupted"

    code, output = server.run([*args, "--resume"])
    assert code == 0, output
    done, expected = _results(run), _results(ref)
    assert done["status"] == "completed" and done["resumed"] is True
    assert _untimed(done["metrics"]) == _untimed(expected["metrics"])
    resumed, reference = _tensors(run), _tensors(ref)
    assert resumed.keys() == reference.keys()
    for file, tensors in reference.items():
        assert resumed[file].keys() == tensors.keys(), file
        unequal = [k for k in tensors if not torch.equal(resumed[file][k], tensors[k])]
        assert not unequal, f"{file}: {unequal[:5]}"
    assert read_scalars(run) == read_scalars(ref)  # every training curve, replayed steps too
    assert not list((run / "checkpoints").rglob("*.tmp"))  # a killed write is cleaned up

    if (name, kill) == ("uap", "save:1"):
        # a resume that changes a setting is refused, naming it, leaving the run alone
        code, output = server.run([*args[:-5], "--seed", "4", "-q", "--out", run, "--resume"])
        assert code == 2 and "seed 3 -> 4" in output, output
        assert _results(run)["status"] == "completed"
