"""Scalars of a run (losses, learning rates, validation numbers) through one logger.

Every training loop logs through :meth:`mmsec.runs.Run.log_scalars`, which lands here:

- ``scalars.jsonl`` in the run folder, always: one JSON object a line,
  ``{"tag": "advclip", "scope": "step" | "epoch", "step": 120, "epoch": 3,
  "values": {"loss_G": 0.41, ...}}`` (the HTML report draws its curves from it);
- TensorBoard (``tensorboard/`` in the run folder) when the ``tensorboard`` package is
  installed, unless ``--log`` names other back-ends;
- Weights & Biases when ``wandb`` is installed and asked for (``--log wandb``).

The JSONL file is appended to (a resumed run continues it; :func:`read_scalars` keeps the
last value of a repeated step), and flushed at every epoch.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import UsageError

__all__ = ["BACKENDS", "SCALARS_FILE", "ScalarLogger", "default_backends", "read_scalars"]

SCALARS_FILE = "scalars.jsonl"
#: back-ends ``--log`` may name (the JSONL file is always written)
BACKENDS = ("tensorboard", "wandb")
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb"}
_EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def _installed(backend: str) -> bool:
    return importlib.util.find_spec(_MODULES[backend]) is not None


def default_backends() -> tuple[str, ...]:
    """TensorBoard when it is installed (``MMSEC_LOG=none`` turns it off), else nothing."""
    env = os.environ.get("MMSEC_LOG")
    if env is not None:
        return check_backends([b for b in env.replace(",", " ").split() if b != "none"])
    return ("tensorboard",) if _installed("tensorboard") else ()


def check_backends(backends: Iterable[str]) -> tuple[str, ...]:
    """Validate ``--log`` back-ends: known names, installed packages (one-line errors)."""
    out: list[str] = []
    for backend in backends:
        if backend not in BACKENDS:
            raise UsageError(f"--log {backend}: unknown logger (choose from "
                             f"{', '.join(BACKENDS)})")
        if not _installed(backend):
            raise UsageError(f"--log {backend}: the {_MODULES[backend]} package is not "
                             f"installed (pip install 'mmsec[{_EXTRAS[backend]}]')")
        if backend not in out:
            out.append(backend)
    return tuple(out)


class ScalarLogger:
    """Writes scalars to ``<directory>/scalars.jsonl`` and the chosen back-ends.

    Args:
        directory: the run folder.
        backends: names from :data:`BACKENDS` (already checked with :func:`check_backends`).
        name: the run's name for W&B (default: the folder name).
        config: the run's settings for W&B (or a function that returns them when W&B
            starts, at the first scalar: by then the run knows its model and options).
    """

    def __init__(self, directory: str | os.PathLike[str], backends: Sequence[str] = (), *,
                 name: str | None = None,
                 config: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None
                 ) -> None:
        self.path = Path(directory) / SCALARS_FILE
        self.backends = tuple(backends)
        self._file = None
        self._tb = None
        self._wandb = None
        self._wandb_steps: set[str] = set()
        self._directory = Path(directory)
        self._name = name or self._directory.name
        self._config = config

    # ------------------------------------------------------------------ back-ends
    def _jsonl(self):
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
            # a killed process may have left half a line: end it, or the first line this
            # (resumed) run appends would be glued to it and lost
            with contextlib.suppress(OSError), open(self.path, "rb") as tail:
                size = tail.seek(0, os.SEEK_END)
                if size and tail.seek(size - 1) is not None and tail.read(1) != b"\n":
                    self._file.write("\n")
        return self._file

    def _tensorboard(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self._directory / "tensorboard"))
        return self._tb

    def _wandb_run(self):
        if self._wandb is None:
            import wandb

            config = self._config() if callable(self._config) else self._config
            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "mmsec"),
                                     name=self._name, dir=str(self._directory),
                                     config=dict(config or {}), reinit=True)
        return self._wandb

    # ------------------------------------------------------------------ logging
    def log(self, tag: str, step: int, values: Mapping[str, float], *,
            epoch: int | None = None, scope: str = "step") -> None:
        """Record ``values`` (finite numbers; others are dropped) of loop ``tag`` at
        ``step`` (``scope`` "step": one optimiser step; "epoch": an epoch's means)."""
        clean = {str(k): float(v) for k, v in values.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)
                 and math.isfinite(float(v))}
        if not clean:
            return
        record = {"tag": tag, "scope": scope, "step": int(step), "epoch": epoch,
                  "values": clean}
        self._jsonl().write(json.dumps(record, separators=(",", ":")) + "\n")
        prefix = f"{tag}/" if scope == "step" else f"{tag}/epoch/"
        if "tensorboard" in self.backends:
            writer = self._tensorboard()
            for k, v in clean.items():
                writer.add_scalar(prefix + k, v, int(step))
        if "wandb" in self.backends:
            wb = self._wandb_run()
            step_key = f"{prefix}step"
            if step_key not in self._wandb_steps:  # every loop has its own step axis
                wb.define_metric(step_key)
                wb.define_metric(f"{prefix}*", step_metric=step_key)
                self._wandb_steps.add(step_key)
            wb.log({step_key: int(step), **{prefix + k: v for k, v in clean.items()}})

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close every back-end (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_scalars(run_dir: str | os.PathLike[str]
                 ) -> dict[tuple[str, str], dict[str, list[tuple[int, float]]]]:
    """The curves of a run folder: ``{(tag, scope): {name: [(step, value), ...]}}``, steps
    ascending, the last value of a step logged twice (a resumed run). Empty when the run
    logged nothing; unreadable lines (a killed write) are skipped."""
    path = Path(run_dir) / SCALARS_FILE
    if not path.is_file():
        return {}
    points: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                rec = json.loads(line)
                key = (str(rec["tag"]), str(rec.get("scope", "step")))
                step = int(rec["step"])
                values = rec["values"]
            except (ValueError, KeyError, TypeError):
                continue
            curves = points.setdefault(key, {})
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    curves.setdefault(name, {})[step] = float(value)
    return {key: {name: sorted(steps.items()) for name, steps in curves.items()}
            for key, curves in points.items()}
