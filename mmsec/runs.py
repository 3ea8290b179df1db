"""Run folders: one per command, with results, report, artifacts, checkpoints and resume.

A run folder holds::

    results.json              flat, greppable: kind, plugin, model, options, metrics, rows ...
    report.md                 the human report (settings, metrics, images, extra sections)
    config.yaml               the resolved configuration
    run.log                   everything logged through ``run.log``
    scalars.jsonl             training scalars (``mmsec.scalars``; TensorBoard/W&B besides)
    figures/curves.png        the training curves drawn from them (report.md shows it)
    checkpoints/<slot>.safetensors   the latest checkpoint of each stage (for ``--resume``)
    artifacts/                patches, UAPs, models, images

Every file is written atomically (``mmsec.io``), so an interrupted run never leaves a
half-written result or checkpoint behind. ``results.json`` is written with
``"status": "running"`` as soon as the run starts, so a crashed run is still recognisable.
"""

from __future__ import annotations

import contextlib
import functools
import io
import itertools
import json
import logging
import math
import os
import platform
import random
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mmsec import __version__
from mmsec.errors import MmsecError, UsageError

from .io import (
    TMP_SUFFIX,
    jsonable,
    load_tensors,
    safetensors_bytes,
    write_atomic,
    write_json_atomic,
    write_safetensors_atomic,
)
from .plots import write_curves
from .progress import progress
from .report import read_results, render_report
from .scalars import ScalarLogger, check_backends, default_backends

if TYPE_CHECKING:
    import torch
    from tqdm import tqdm

__all__ = ["CHECKPOINTS_DIR", "DEFAULT_ROOT", "RESULTS_FILE", "Run", "capture_rng_state",
           "environment", "restore_rng_state"]

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
CONFIG_FILE = "config.yaml"
LOG_FILE = "run.log"
CHECKPOINTS_DIR = "checkpoints"
ARTIFACTS_DIR = "artifacts"
DEFAULT_ROOT = Path("mmsec-runs")

_CHECKPOINT_META_KEY = "mmsec_checkpoint"
_CHECKPOINT_CONFIG_KEY = "mmsec_config"
#: settings a resumed run may change: the device (it moves the run, not what it computes)
#: and the length of the schedule (a finished loop continues to the new number of epochs)
RESUME_SAFE_KEYS = frozenset({"device", "options.epochs", "epochs", "steps", "min_steps"})
_RNG_PREFIX = "__rng__."
_T = TypeVar("_T")


def capture_rng_state() -> dict[str, torch.Tensor]:
    """The torch (CPU and CUDA), NumPy and Python global RNG states, as tensors."""
    import numpy as np
    import torch

    states = {_RNG_PREFIX + "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            states[f"{_RNG_PREFIX}cuda.{index}"] = state
    version, internal, gauss = random.getstate()
    states[_RNG_PREFIX + "python"] = torch.tensor(
        [version, -1 if gauss is None else 1, *internal], dtype=torch.int64
    )
    if gauss is not None:
        states[_RNG_PREFIX + "python_gauss"] = torch.tensor([gauss], dtype=torch.float64)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    if kind == "MT19937":
        states[_RNG_PREFIX + "numpy"] = torch.tensor([pos, has_gauss, *keys.tolist()],
                                                     dtype=torch.int64)
        states[_RNG_PREFIX + "numpy_gauss"] = torch.tensor([cached], dtype=torch.float64)
    return states


def restore_rng_state(states: Mapping[str, torch.Tensor]) -> None:
    """Restore what :func:`capture_rng_state` captured (missing parts are left alone)."""
    import numpy as np
    import torch

    if _RNG_PREFIX + "torch" in states:
        torch.set_rng_state(states[_RNG_PREFIX + "torch"].to(torch.uint8))
    cuda = sorted(k for k in states if k.startswith(_RNG_PREFIX + "cuda."))
    if cuda and torch.cuda.is_available() and len(cuda) <= torch.cuda.device_count():
        for key in cuda:
            index = int(key.rsplit(".", 1)[1])
            torch.cuda.set_rng_state(states[key].to(torch.uint8), device=index)
    if _RNG_PREFIX + "python" in states:
        values = [int(v) for v in states[_RNG_PREFIX + "python"].tolist()]
        gauss_tensor = states.get(_RNG_PREFIX + "python_gauss")
        gauss = float(gauss_tensor.item()) if values[1] > 0 and gauss_tensor is not None else None
        random.setstate((values[0], tuple(values[2:]), gauss))
    if _RNG_PREFIX + "numpy" in states:
        values = states[_RNG_PREFIX + "numpy"].tolist()
        cached = float(states[_RNG_PREFIX + "numpy_gauss"].item())
        np.random.set_state(("MT19937", np.array(values[2:], dtype=np.uint32), int(values[0]),
                             int(values[1]), cached))


# ----------------------------------------------------------------------------- environment


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return None


@functools.lru_cache(maxsize=1)
def _package_versions() -> tuple[tuple[str, Any], ...]:
    faiss_dists = ("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-gpu", "faiss")
    faiss_dist = next((d for d in faiss_dists if _dist_version(d)), None)
    return (
        ("python", platform.python_version()),
        ("platform", platform.platform()),
        ("mmsec", __version__),
        ("torch", _dist_version("torch")),
        ("open_clip", _dist_version("open_clip_torch", "open-clip-torch")),
        ("faiss", f"{_dist_version(faiss_dist)} ({faiss_dist})" if faiss_dist else None),
        ("numpy", _dist_version("numpy")),
    )


def environment() -> dict[str, Any]:
    """Versions and platform for ``results.json`` (missing packages are ``None``)."""
    env: dict[str, Any] = dict(_package_versions())
    torch = sys.modules.get("torch")  # only describe CUDA when torch is already in use
    if torch is not None:
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    return env


# ----------------------------------------------------------------------------- logging


class _StderrFormatter(logging.Formatter):
    """Plain messages for INFO, ``warning: ...`` / ``error: ...`` above it."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


_run_counter = itertools.count(1)


class _QuietFileHandler(logging.FileHandler):
    """run.log is best effort: a record that cannot be written (a full disk) is dropped,
    where logging would print a traceback to stderr for each one."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        pass


def _make_logger(log_file: Path, quiet: bool) -> logging.Logger:
    logger = logging.getLogger(f"mmsec.run.{next(_run_counter)}")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    file_handler = _QuietFileHandler(log_file, mode="a", encoding="utf-8",
                                     errors="backslashreplace")
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    stream_handler = logging.StreamHandler(sys.stderr)
    stream_handler.setLevel(logging.WARNING if quiet else logging.INFO)
    # Records logged with extra={"file_only": True} stay out of the terminal: the CLI prints
    # the run folder at the end and a failure as its one error line.
    stream_handler.addFilter(lambda record: not getattr(record, "file_only", False))
    stream_handler.setFormatter(_StderrFormatter("%(message)s"))
    logger.addHandler(file_handler)
    logger.addHandler(stream_handler)
    return logger


# ----------------------------------------------------------------------------- the run


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _has_checkpoints(directory: Path) -> bool:
    folder = directory / CHECKPOINTS_DIR
    return folder.is_dir() and any(folder.rglob("*.safetensors"))


def _relative_name(name: str, suffix: str) -> Path:
    """A safe path inside ``artifacts/``: relative, no ``..``, with ``suffix``."""
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ValueError(f"artifact name must be a relative path inside the run: {name!r}")
    return relative if relative.suffix == suffix else relative.with_name(relative.name + suffix)


def _flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float | None]:
    """Nested metric dicts become ``a.b`` keys; values become floats (non-finite -> None)."""
    flat: dict[str, float | None] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_metrics(value, prefix=f"{name}."))
            continue
        if hasattr(value, "item"):  # 0-d tensor or numpy scalar
            value = value.item()
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"metric {name!r} is not a number: {value!r}") from None
        flat[name] = number if math.isfinite(number) else None
    return flat


class Run:
    """One command's run folder, logger, timers, progress bars, results and checkpoints.

    Create with :meth:`Run.create`; use as a context manager so a failure is recorded::

        with Run.create(None, "attack", "pgd") as run:
            run.set("model", "ViT-B-32")
            with run.timer("fit"):
                for batch in run.progress(loader, desc="fit"):
                    ...
            run.finish({"fooling_rate": 0.93})
    """

    def __init__(
        self,
        directory: Path,
        kind: str,
        plugin: str | None,
        *,
        resume: bool = False,
        resumed: bool = False,
        quiet: bool = False,
        loggers: Sequence[str] | None = None,
    ) -> None:
        self.dir = Path(directory)
        self.kind = kind
        self.plugin = plugin
        #: ``--resume`` was asked for (long loops then call :meth:`load_checkpoint`).
        self.resume = resume or resumed
        #: an existing run folder was reopened.
        self.resumed = resumed
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        self.log = _make_logger(self.dir / LOG_FILE, quiet)
        self.fields: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}
        self.durations: dict[str, float] = {}
        #: inputs left out (corrupt images ...): ``{"item": ..., "reason": ...}``
        self.skipped_items: list[dict[str, str]] = []
        #: long-form result rows (task, model, condition, split, n_items, metric, value)
        self.rows: list[dict[str, Any]] = []
        self.report_images: list[str] = []
        self.sections: list[tuple[str, str]] = []
        #: one-line remarks for the headline (a training metric that stopped moving, ...)
        self.notes: list[str] = []
        #: training scalars: scalars.jsonl always, TensorBoard / W&B as asked (``--log``)
        self.scalars = ScalarLogger(self.dir, default_backends() if loggers is None
                                    else check_backends(loggers), config=self._config)
        self.status = "running"
        self.started = _utc_now()
        self.finished: datetime | None = None
        self._clock = time.perf_counter()
        self._closed = False
        if not resumed:
            # a reopened run keeps its results.json until this one ends: a refused --resume
            # (other settings) must not replace a completed run's results with "running"
            self._write_results()
        verb = "resuming" if resumed else "run folder"
        self.log.info("%s: %s", verb, self.dir, extra={"file_only": True})

    # -- creation ---------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        out: str | os.PathLike[str] | None,
        kind: str,
        plugin: str | None,
        *,
        resume: bool = False,
        quiet: bool = False,
        root: str | os.PathLike[str] | None = None,
        loggers: Sequence[str] | None = None,
    ) -> Run:
        """Make (or, with ``resume``, reopen) a run folder.

        ``out=None`` creates ``<root or ./mmsec-runs>/<UTC timestamp>-<kind>-<plugin>/``.
        An existing ``out`` that already holds a run is reused only with ``resume=True``;
        ``resume=True`` on a folder that does not exist yet simply starts a fresh run there.
        ``quiet`` shows only warnings on stderr (the log file gets everything).
        ``loggers`` are the scalar back-ends besides ``scalars.jsonl`` (``tensorboard``,
        ``wandb``; default: TensorBoard when installed); a missing package is a one-line
        error before anything is written.
        """
        loggers = None if loggers is None else check_backends(loggers)
        from .distributed import is_main

        if not is_main():  # under torchrun only rank 0 writes the run folder
            return _ShadowRun.make(out, kind, plugin, resume=resume)
        if out is None:
            if resume:
                raise UsageError("--resume needs --out pointing to the run folder to continue")
            return cls(
                _fresh_dir(Path(root) if root else DEFAULT_ROOT, kind, plugin),
                kind,
                plugin,
                quiet=quiet,
                loggers=loggers,
            )
        directory = Path(out)
        try:
            holds_run = cls._prepare(directory, kind, plugin, resume=resume)
        except OSError as exc:  # a 300-character name, a read-only place, a file in the way
            raise UsageError(f"{directory}: cannot use it as the run folder "
                             f"({exc.strerror or exc})") from None
        return cls(directory, kind, plugin, resume=resume, resumed=holds_run, quiet=quiet,
                   loggers=loggers)

    @staticmethod
    def _prepare(directory: Path, kind: str, plugin: str | None, *, resume: bool) -> bool:
        """Check ``--out`` and make it; True when it holds a run to continue."""
        if directory.exists() and not directory.is_dir():
            raise UsageError(f"{directory}: exists and is not a folder")
        holds_run = (directory / RESULTS_FILE).is_file() or _has_checkpoints(directory)
        if not holds_run and directory.is_dir() and any(directory.iterdir()):
            raise UsageError(
                f"{directory}: is not empty and holds no mmsec run; choose a new or empty "
                "--out (mmsec would overwrite files there)")
        if holds_run and not resume:
            raise UsageError(
                f"{directory}: already holds a run; pass --resume to continue it "
                "or choose another --out"
            )
        if holds_run:
            _check_same_run(directory, kind, plugin)
            # temporary files of writes a kill cut short (never renamed into place)
            for stale in directory.rglob(f".*{TMP_SUFFIX}"):
                with contextlib.suppress(OSError):
                    stale.unlink()
        directory.mkdir(parents=True, exist_ok=True)
        return holds_run

    # -- context manager --------------------------------------------------------------------

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            if isinstance(exc, ResumeMismatch):
                # nothing ran: leave the folder to the run it holds
                self.log.error("%s", exc, extra={"file_only": True})
            elif exc is not None and self.status == "running":
                try:
                    self.fail(exc)
                except Exception as second:  # never hide the error that ended the run
                    self.log.error("could not record the failure: %s", second)
        finally:
            self.close()

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r}, kind={self.kind!r}, plugin={self.plugin!r})"

    def close(self) -> None:
        """Detach and close the log handlers (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.scalars.close()
        for handler in list(self.log.handlers):
            self.log.removeHandler(handler)
            handler.close()

    # -- fields, timing, progress -----------------------------------------------------------

    @property
    def artifacts_dir(self) -> Path:
        """``<run>/artifacts``: everything a run produces besides its results and report."""
        return self.dir / ARTIFACTS_DIR

    def set(self, key: str, value: Any) -> None:
        """Set a top-level ``results.json`` field (``model``, ``dataset``, ``options``, ...).

        ``"config"`` is special: it is written to ``config.yaml`` instead.
        """
        if key in ("metrics", "durations", "status", "artifacts", "skipped_items"):
            raise ValueError(f"{key!r} is managed by the run itself")
        self.fields[key] = value

    def get(self, key: str, default: Any = None) -> Any:
        """A field set with :meth:`set`."""
        return self.fields.get(key, default)

    @contextlib.contextmanager
    def timer(self, name: str) -> Iterator[None]:
        """Add the block's wall time (seconds) to ``run.durations[name]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.durations[name] = self.durations.get(name, 0.0) + time.perf_counter() - start

    def progress(
        self,
        iterable: Iterable[_T] | None = None,
        *,
        desc: str | None = None,
        total: int | None = None,
        unit: str = "it",
        leave: bool = False,
    ) -> tqdm:
        """A tqdm bar with ETA on stderr; off when not a TTY or when ``MMSEC_PROGRESS=0``."""
        return progress(iterable, desc=desc, total=total, unit=unit, leave=leave)

    def add_section(self, title: str, markdown: str) -> None:
        """Append a ``## title`` section with free markdown to ``report.md``."""
        self.sections.append((title, markdown))

    def note(self, text: str) -> None:
        """A one-line remark shown under the headline (console, reports) and logged."""
        if text not in self.notes:
            self.notes.append(text)
            self.log.info("note: %s", text, extra={"file_only": True})  # the headline shows it

    def log_scalars(self, tag: str, step: int, values: Mapping[str, float], *,
                    epoch: int | None = None, scope: str = "step") -> None:
        """Log training scalars of loop ``tag`` (see :mod:`mmsec.scalars`)."""
        self.scalars.log(tag, step, values, epoch=epoch, scope=scope)

    # -- artifacts ---------------------------------------------------------------------------

    def save_tensors(
        self,
        name: str,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, Any] | None = None,
    ) -> Path:
        """Save tensors to ``artifacts/<name>.safetensors`` atomically; returns the path.

        Metadata values that are not strings are stored as JSON.
        """
        path = self.artifacts_dir / _relative_name(name, ".safetensors")
        meta = {"mmsec_version": __version__, "kind": self.kind, "plugin": self.plugin or ""}
        meta.update(metadata or {})
        return write_atomic(path, safetensors_bytes(tensors, meta))

    def save_image(
        self, name: str, image: torch.Tensor, scale: int = 1, *, report: bool = False
    ) -> Path:
        """Save a ``[3, H, W]`` (or ``[1, H, W]`` / ``[H, W]``) image in ``[0, 1]`` as a PNG.

        ``scale`` enlarges it by nearest neighbour (a 16x16 patch is unreadable at 1x);
        ``report=True`` also shows it in ``report.md``. Returns the path.
        """
        import numpy as np
        import torch
        from PIL import Image

        if scale < 1:
            raise ValueError(f"scale must be >= 1, got {scale}")
        pixels = image.detach().to("cpu", torch.float32)
        if pixels.dim() == 2:
            pixels = pixels.unsqueeze(0)
        if pixels.dim() != 3 or pixels.shape[0] not in (1, 3):
            raise ValueError(f"expected an image [3, H, W] or [1, H, W], got {tuple(image.shape)}")
        data = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        data = np.ascontiguousarray(data[:, :, 0] if data.shape[2] == 1 else data)
        picture = Image.fromarray(data)
        if scale > 1:
            picture = picture.resize(
                (picture.width * scale, picture.height * scale), Image.Resampling.NEAREST
            )
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        path = write_atomic(self.artifacts_dir / _relative_name(name, ".png"), buffer.getvalue())
        if report:
            self.report_images.append(path.relative_to(self.dir).as_posix())
        return path

    # -- checkpoints -------------------------------------------------------------------------

    def checkpoint_path(self, slot: str = "main") -> Path:
        """``<run>/checkpoints/<slot>.safetensors``; ``slot`` may hold ``/`` (child runs)."""
        return self.dir / CHECKPOINTS_DIR / _relative_name(slot, ".safetensors")

    def save_checkpoint(
        self, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any], *, slot: str = "main",
        rng: bool = True,
    ) -> Path:
        """Atomically write ``state`` and JSON-able ``meta`` (epoch, step, ...) to a slot.

        Each stage of a run (a training loop, a child plugin's loop) keeps its own slot, so a
        resumed run finds every stage's progress. With ``rng`` the torch, CUDA and Python RNG
        states are saved too and restored by :meth:`load_checkpoint`, so a resumed run draws
        the same random numbers.
        """
        try:
            meta_text = json.dumps(dict(meta), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"checkpoint meta must be JSON-able: {exc}") from None
        clash = [k for k in state if k.startswith(_RNG_PREFIX)]
        if clash:
            raise ValueError(f"checkpoint state key {clash[0]!r} uses the reserved prefix")
        tensors = dict(state)
        if rng:
            tensors.update(capture_rng_state())
        header = {
            _CHECKPOINT_META_KEY: meta_text,
            _CHECKPOINT_CONFIG_KEY: json.dumps(self._config(), sort_keys=True),
            "slot": slot,
            "kind": self.kind,
            "plugin": self.plugin or "",
            "mmsec_version": __version__,
        }
        # every step logged so far is on disk before the checkpoint that vouches for it
        # (after a kill, the resumed run logs only the steps after the checkpoint)
        self.scalars.flush()
        path = write_safetensors_atomic(self.checkpoint_path(slot), tensors, header)
        self.log.debug("checkpoint %s saved: %s", slot, json.dumps(dict(meta))[:200])
        return path

    def load_checkpoint(
        self, slot: str = "main", device: str = "cpu", *, restore_rng: bool = True
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The ``(state, meta)`` saved in ``slot``, or ``None`` when there is none.

        Loaded with safetensors only (no pickle). Restores the RNG states saved with it.
        """
        path = self.checkpoint_path(slot)
        if not path.is_file():
            if self.resume:
                self.log.info("no checkpoint %s in %s; starting fresh", slot, self.dir)
            return None
        tensors, header = load_tensors(path, device=device)
        if _CHECKPOINT_META_KEY not in header:
            raise MmsecError(f"{path}: not an mmsec checkpoint")
        try:
            meta = json.loads(header[_CHECKPOINT_META_KEY])
        except (json.JSONDecodeError, RecursionError):
            raise MmsecError(f"{path}: corrupt checkpoint metadata") from None
        if not isinstance(meta, dict):
            raise MmsecError(f"{path}: corrupt checkpoint metadata (not an object)")
        if _CHECKPOINT_CONFIG_KEY in header:
            self._check_resume_config(path, header[_CHECKPOINT_CONFIG_KEY])
        rng_states = {k: v for k, v in tensors.items() if k.startswith(_RNG_PREFIX)}
        state = {k: v for k, v in tensors.items() if not k.startswith(_RNG_PREFIX)}
        if restore_rng:
            restore_rng_state({k: v.cpu() for k, v in rng_states.items()})
        self.log.info("resumed %s from its checkpoint (%s)", slot, json.dumps(meta)[:120])
        return state, meta

    def _check_resume_config(self, path: Path, saved_text: str) -> None:
        """Refuse to continue a checkpoint made under other settings (a hybrid run whose
        results.json would record only the new ones); see :data:`RESUME_SAFE_KEYS`."""
        try:
            saved = json.loads(saved_text)
        except (json.JSONDecodeError, RecursionError):
            raise MmsecError(f"{path}: corrupt checkpoint metadata") from None
        if not isinstance(saved, dict):
            raise MmsecError(f"{path}: corrupt checkpoint metadata")
        before, now = _flat_config(saved), _flat_config(self._config())
        changed = [k for k in sorted(set(before) | set(now))
                   if k not in RESUME_SAFE_KEYS and before.get(k) != now.get(k)]
        if changed:
            shown = ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
            more = f" (+{len(changed) - 6} more)" if len(changed) > 6 else ""
            raise ResumeMismatch(
                f"{self.dir}: cannot --resume with other settings than the run was started "
                f"with: {shown}{more}; use the same settings, or another --out for a new run")

    # -- results -----------------------------------------------------------------------------

    def _artifact_list(self) -> list[str]:
        if not self.artifacts_dir.is_dir():
            return []
        return sorted(
            p.relative_to(self.dir).as_posix()
            for p in self.artifacts_dir.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )

    def results(self) -> dict[str, Any]:
        """The ``results.json`` content as it stands now."""
        fields = {k: v for k, v in self.fields.items() if k != "config"}
        results: dict[str, Any] = {
            "mmsec_version": __version__,
            "kind": self.kind,
            "plugin": self.plugin,
            "plugin_version": fields.pop("plugin_version", None),
            "model": fields.pop("model", None),
            "pretrained": fields.pop("pretrained", None),
            "dataset": fields.pop("dataset", None),
            "split": fields.pop("split", None),
            "options": jsonable(fields.pop("options", None) or {}),
            "seed": fields.pop("seed", None),
            "metrics": _flatten_metrics(self.metrics),
            "rows": jsonable(self.rows),
            "durations": {k: round(v, 6) for k, v in self.durations.items()},
            "device": jsonable(fields.pop("device", None)),
            "precision": fields.pop("precision", None),
            "environment": environment(),
            "skipped_items": list(self.skipped_items),
            "skipped_count": int(fields.pop("skipped_count", 0)) + len(self.skipped_items),
            "run_dir": str(self.dir),
            "artifacts": self._artifact_list(),
            "notes": list(self.notes),
            "status": self.status,
            "started": _iso(self.started),
            "finished": _iso(self.finished) if self.finished else None,
        }
        if self.resumed:
            results["resumed"] = True
        results.update(jsonable(fields))  # extra fields, after the standard ones
        return results

    def _write_results(self) -> dict[str, Any]:
        results = self.results()
        write_json_atomic(self.dir / RESULTS_FILE, results)
        return results

    def _config(self) -> dict[str, Any]:
        if "config" in self.fields:
            return jsonable(self.fields["config"])
        keys = ("model", "pretrained", "dataset", "split", "seed", "device", "precision")
        config = {"kind": self.kind, "plugin": self.plugin}
        config.update({k: jsonable(self.fields.get(k)) for k in keys})
        config["options"] = jsonable(self.fields.get("options") or {})
        return config

    def _write_outputs(self) -> dict[str, Any]:
        """config.yaml and report.md, then results.json: the status there ("completed") is
        only on disk once everything it vouches for is."""
        import yaml

        self.finished = _utc_now()
        self.durations.setdefault("total", time.perf_counter() - self._clock)
        self.scalars.flush()
        images = list(self.report_images)
        curves = write_curves(self.dir)
        if curves is not None:
            images.insert(0, curves.relative_to(self.dir).as_posix())
        results = self.results()
        write_atomic(
            self.dir / CONFIG_FILE,
            yaml.safe_dump(self._config(), sort_keys=False, allow_unicode=True),
        )
        write_atomic(self.dir / REPORT_FILE, render_report(results, images, self.sections))
        write_json_atomic(self.dir / RESULTS_FILE, results)
        return results

    def finish(self, metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Record ``metrics`` and write ``results.json``, ``report.md`` and ``config.yaml``.

        Nested metric dicts are flattened to ``a.b`` keys; values must be numbers.
        Returns the results dict.
        """
        self.metrics.update(metrics or {})
        _flatten_metrics(self.metrics)  # fail before writing anything
        self.status = "completed"
        try:
            results = self._write_outputs()
        except BaseException:
            self.status = "running"  # not completed: the context manager records the failure
            self.finished = None
            raise
        self.log.info("results: %s", self.dir / RESULTS_FILE)
        return results

    def fail(self, exc: BaseException) -> dict[str, Any]:
        """Record a failure (``status`` "failed", or "interrupted" on Ctrl-C) and write outputs."""
        self.status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        self.fields["error"] = f"{type(exc).__name__}: {exc}"
        if isinstance(getattr(exc, "failure", None), dict):  # a plugin's, from the host
            self.fields["failure"] = exc.failure
        try:
            _flatten_metrics(self.metrics)
        except TypeError:
            self.metrics = {}
        try:
            results = self._write_outputs()
        except OSError as write_error:  # a full disk: say "failed" where it still fits
            # the file only: the CLI's one error line says what ended the run
            self.log.error("could not write the outputs of the failed run: %s", write_error,
                           extra={"file_only": True})
            results = self.results()
            with contextlib.suppress(OSError):
                write_json_atomic(self.dir / RESULTS_FILE, results)
        self.log.error("run %s: %s", self.status, self.fields["error"], extra={"file_only": True})
        return results



class _ShadowRun(Run):
    """The run of a process other than rank 0 under torchrun: the same API, its files in a
    private temporary folder removed at close; checkpoints are read from the real run folder
    (``--resume``) and never written."""

    @classmethod
    def make(cls, out: str | os.PathLike[str] | None, kind: str, plugin: str | None, *,
             resume: bool) -> _ShadowRun:
        import tempfile

        from .distributed import rank

        source = Path(out) if out is not None else None
        holds_run = source is not None and ((source / RESULTS_FILE).is_file()
                                            or _has_checkpoints(source))
        tmp = Path(tempfile.mkdtemp(prefix=f"mmsec-rank{rank()}-"))
        run = cls(tmp, kind, plugin, resume=resume and holds_run, resumed=False, quiet=True,
                  loggers=[])
        run.source_dir = source
        return run

    source_dir: Path | None = None

    def checkpoint_path(self, slot: str = "main") -> Path:
        base = self.source_dir if self.source_dir is not None else self.dir
        return base / CHECKPOINTS_DIR / _relative_name(slot, ".safetensors")

    def save_checkpoint(self, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any], *,
                        slot: str = "main", rng: bool = True) -> Path:
        return self.checkpoint_path(slot)

    def close(self) -> None:
        import shutil

        super().close()
        shutil.rmtree(self.dir, ignore_errors=True)


class ResumeMismatch(UsageError):
    """``--resume`` with settings that differ from the checkpoint's (exit 2)."""


def _flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"options": {"lr": 1}}`` -> ``{"options.lr": 1}`` (JSON values, for comparison)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(_flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = jsonable(value)
    return flat


def _fresh_dir(root: Path, kind: str, plugin: str | None) -> Path:
    stamp = _utc_now().strftime("%Y%m%dT%H%M%SZ")
    base = "-".join(_slug(p) for p in (stamp, kind, plugin) if p)
    root.mkdir(parents=True, exist_ok=True)
    for attempt in itertools.count(1):
        candidate = root / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise AssertionError("unreachable")


def _check_same_run(directory: Path, kind: str, plugin: str | None) -> None:
    """Refuse to resume a folder that holds a different kind of run."""
    results_path = directory / RESULTS_FILE
    if not results_path.is_file():
        return
    previous = read_results(results_path)
    if previous.get("kind") != kind or (previous.get("plugin") or None) != (plugin or None):
        raise UsageError(
            f"{directory}: holds a {previous.get('kind')} run of plugin "
            f"{previous.get('plugin')!r}, cannot resume it as {kind} {plugin!r}"
        )
