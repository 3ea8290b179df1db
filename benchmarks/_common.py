"""What the benchmark scripts share: arguments, the clock, ceilings, timed loops and the JSON.

Every script measures one path of mmsec through the real code (a plugin's ``fit``, the
evaluation, the cache, the CLI) and a ceiling measured in the same process on the same model
and batch, and prints one JSON object (:func:`emit`)::

    {"benchmark": ..., "device": ..., "model": ..., "clock": ..., "figure": ...,
     "ceiling": ..., "unit": ..., "ratio": figure / ceiling, "ceiling_kind": ...,
     "details": {...}}

Clock: on the CPU, process CPU seconds (``time.process_time``), best of ``--repeat``: a
ratio of two CPU times taken in one process does not move with the load of a shared
machine (wall time does). On CUDA, wall seconds after ``torch.cuda.synchronize()``.

Sizes: each script gives its ``--device cpu`` defaults (small: one thread, seconds to a
couple of minutes, the embedded zoo model) and its ``--device cuda`` defaults (full: an
open_clip ViT-B/32 with random weights, 224 px, bf16 ceilings too); any size can be set on
the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: keys every benchmark's JSON has (tests/test_benchmarks.py checks them)
SCHEMA = {"benchmark": str, "device": str, "model": str, "threads": int, "clock": str,
          "figure": float, "ceiling": float, "unit": str, "ratio": float,
          "ceiling_kind": str, "details": dict}


def parser(doc: str, sizes: Mapping[str, Mapping[str, Any]]) -> argparse.ArgumentParser:
    """An argument parser with the shared options and one ``--NAME`` per size.

    ``sizes`` is ``{"cpu": {name: default}, "cuda": {name: default}}``; a size left unset
    takes the default of the chosen ``--device``.
    """
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Sizes (cpu / cuda): " + ", ".join(
                                     f"{k} {sizes['cpu'].get(k)} / {sizes['cuda'].get(k)}"
                                     for k in sizes["cpu"]))
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    ap.add_argument("--repeat", type=int, default=None, help="best of N (cpu 3 / cuda 3)")
    ap.add_argument("--seed", type=int, default=0)
    for name, default in sizes["cpu"].items():
        if name == "repeat":
            continue
        other = sizes["cuda"].get(name)
        kind = type(default) if default is not None else \
            type(other) if other is not None else str
        if kind is bool:
            ap.add_argument(f"--{name.replace('_', '-')}", type=_bool, default=None)
        else:
            ap.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None)
    ap.set_defaults(_sizes=sizes)
    return ap


def _bool(text: str) -> bool:
    return text.lower() in ("1", "true", "yes", "on")


def parse(ap: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv`` and fill unset sizes from the device's defaults."""
    args = ap.parse_args(argv)
    table = args._sizes["cuda" if args.device == "cuda" else "cpu"]
    for name, default in table.items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)
    if args.repeat is None:
        args.repeat = table.get("repeat", 3)
    del args._sizes
    return args


def setup(args: argparse.Namespace):
    """Threads, quiet progress and a private embedding cache; returns the torch device."""
    os.environ.setdefault("MMSEC_PROGRESS", "0")
    os.environ.setdefault("MMSEC_CACHE_DIR", tempfile.mkdtemp(prefix="mmsec-bench-cache-"))
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    return torch.device(args.device)


# ---------------------------------------------------------------------- clock
def now(device) -> float:
    """CPU seconds on the CPU; wall seconds after a synchronize on CUDA."""
    if getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def clock_name(device) -> str:
    return "cuda wall s" if getattr(device, "type", device) == "cuda" else "process CPU s"


def best_of(fn: Callable[[], Any], repeat: int, device) -> float:
    """The least seconds of ``repeat`` calls of ``fn`` (after one untimed warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(max(1, repeat)):
        t0 = now(device)
        fn()
        best = min(best, now(device) - t0)
    return best


# ---------------------------------------------------------------------- ceilings
def _amp(device, dtype):
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def fwd_bwd_rate(model, x, *, to: str = "pixels", iters: int = 2, repeat: int = 3,
                 dtype=None, text=None) -> float:
    """Images per second of ``encode_image`` forward + backward, the most a loop over this
    model and batch can reach.

    ``to``: ``pixels`` (the gradient to the input only, as attacks take it), ``weights``
    (to the image tower's weights, as fine-tuning takes it) or ``both`` (the weights of both
    towers, with ``text`` tokens ``[B, L]`` through the text tower: contrastive training).
    ``dtype``: autocast dtype (``torch.bfloat16``) or None for fp32.
    """
    import torch

    device = model.device
    params = model.tower_parameters("all" if to == "both" else "image")

    def once() -> None:
        for _ in range(iters):
            px = x.detach().requires_grad_(to == "pixels")
            with _amp(device, dtype):
                emb = model.encode_image(px)
                if to == "both" and text is not None:
                    emb = torch.cat([emb, model.encode_text(text)])
            loss = emb.float().square().sum()
            if to == "pixels":
                torch.autograd.grad(loss, px)
            else:
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                del grads

    return iters * x.shape[0] / best_of(once, repeat, device)


def fwd_rate(model, x, *, iters: int = 2, repeat: int = 3, dtype=None) -> float:
    """Images per second of ``encode_image`` forward only (no autograd): the encode ceiling."""
    import torch

    def once() -> None:
        with torch.no_grad(), _amp(model.device, dtype):
            for _ in range(iters):
                model.encode_image(x)

    return iters * x.shape[0] / best_of(once, repeat, model.device)


def ceilings(model, x, *, to: str = "pixels", iters: int = 2, repeat: int = 3,
             forward: bool = False, text=None) -> dict[str, float]:
    """The ceiling in fp32, and on CUDA in bf16 too: ``{"fp32": rate, "bf16": rate}``."""
    import torch

    fn = (lambda d: fwd_rate(model, x, iters=iters, repeat=repeat, dtype=d)) if forward else \
        (lambda d: fwd_bwd_rate(model, x, to=to, iters=iters, repeat=repeat, dtype=d,
                                text=text))
    out = {"fp32": fn(None)}
    if model.device.type == "cuda":
        out["bf16"] = fn(torch.bfloat16)
    return out


# ---------------------------------------------------------------------- the real loops
@dataclass
class LoopTimes:
    """What :func:`timed_train` saw: per ``train`` call, seconds in the loop (without
    ``on_epoch_end``), seconds in ``on_epoch_end``, and the steps taken."""

    loop_s: list[float] = field(default_factory=list)
    epoch_end_s: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(self.loop_s)

    @property
    def total_steps(self) -> int:
        return sum(self.steps)


@contextlib.contextmanager
def timed_train(module, device, name: str = "train") -> Iterator[LoopTimes]:
    """Time every call of ``module.<name>`` (the plugin's own name for ``mmsec.train``), so
    the real plugin code runs and only its training loop is on the clock. The time spent
    in ``on_epoch_end`` (held-out checks) is kept apart."""
    real = getattr(module, name)
    times = LoopTimes()

    def wrapper(*args, **kwargs):
        inner = kwargs.get("on_epoch_end")
        spent = [0.0]
        if inner is not None:
            def on_epoch_end(*a, **k):
                t = now(device)
                try:
                    return inner(*a, **k)
                finally:
                    spent[0] += now(device) - t
            kwargs["on_epoch_end"] = on_epoch_end
        t0 = now(device)
        out = real(*args, **kwargs)
        total = now(device) - t0
        times.loop_s.append(total - spent[0])
        times.epoch_end_s.append(spent[0])
        times.steps.append(int(out.steps))
        return out

    setattr(module, name, wrapper)
    try:
        yield times
    finally:
        setattr(module, name, real)


@contextlib.contextmanager
def run_context(device, *, precision: str = "fp32", seed: int = 0, plugin: str = "bench",
                kind: str = "attack") -> Iterator[Any]:
    """A run context on ``device`` in a temporary run folder (the built-in plugins loaded)."""
    from mmsec.context import RunContext
    from mmsec.runs import Run
    from mmsec.testing import make_registry

    with tempfile.TemporaryDirectory(prefix="mmsec-bench-run-") as tmp, \
            Run.create(os.path.join(tmp, "run"), kind, plugin, quiet=True) as run:
        yield RunContext(run, device=device, precision=precision, seed=seed,
                         registry=make_registry())


def best_loop(fit: Callable[[], LoopTimes], repeat: int) -> tuple[LoopTimes, list[float]]:
    """Call ``fit`` (one whole plugin run returning its :class:`LoopTimes`) ``repeat`` times;
    the run whose loop was fastest per step, and every run's loop seconds."""
    runs = [fit() for _ in range(max(1, repeat))]
    best = min(runs, key=lambda t: t.seconds / max(1, t.total_steps))
    return best, [round(t.seconds, 4) for t in runs]


def load_model(args, device):
    """``args.model`` (None: the embedded zoo model) on ``device``, in eval mode."""
    from mmsec import load_model as load

    model = load(args.model, device=str(device))
    model.eval()
    return model


def shapes(split: str, n: int, size: int | None):
    """``n`` procedural shapes of ``split`` at ``size`` px (None: 32, as rendered).

    Larger sizes are rendered at 32 px and upsampled (bilinear): rendering at 224 px costs
    ~37 ms of CPU an image, a GPU run's whole budget for a few thousand images. Throughput
    depends on the size, not on the detail."""
    import torch
    import torch.nn.functional as F

    from mmsec.data import TensorDataset, procedural_shapes

    ds = procedural_shapes(split=split, n=n, image_size=32)
    if not size or size == 32:
        return ds
    big = torch.cat([
        F.interpolate(ds.images[s:s + 512].float(), size=(size, size), mode="bilinear",
                      align_corners=False).round().clamp(0, 255).to(torch.uint8)
        for s in range(0, len(ds), 512)])
    return TensorDataset(big, ds.labels(), name=f"procedural{size}", split=split,
                         classnames=ds.classnames, templates=ds.templates,
                         captions=[ds.captions(i) for i in range(len(ds))])


# ---------------------------------------------------------------------- output
def emit(name: str, args, model_name: str, *, figure: float, ceiling: float, unit: str,
         ceiling_kind: str, ceilings_: Mapping[str, float] | None = None,
         clock: str | None = None, **details: Any) -> dict[str, Any]:
    """Print and return the benchmark's JSON object (schema: :data:`SCHEMA`).

    ``ceilings_``: every ceiling measured (fp32, and bf16 on CUDA); the figure's ratio to
    each goes into ``details`` too (``ratio_to_bf16``...).
    """
    import torch

    device = "cuda" if args.device == "cuda" else "cpu"
    extra: dict[str, Any] = {}
    for kind, value in (ceilings_ or {}).items():
        extra[f"ceiling_{kind}"] = round(value, 4)
        extra[f"ratio_to_{kind}"] = round(figure / value, 4) if value else None
    out = {
        "benchmark": name, "device": device if device == "cpu" else
        f"cuda ({torch.cuda.get_device_name()})", "model": str(model_name),
        "threads": int(torch.get_num_threads()), "clock": clock or clock_name(device),
        "figure": round(float(figure), 4), "ceiling": round(float(ceiling), 4), "unit": unit,
        "ratio": round(float(figure) / float(ceiling), 4) if ceiling else 0.0,
        "ceiling_kind": ceiling_kind, "details": {**extra, **details},
    }
    print(json.dumps(out, indent=2), flush=True)
    return out


def per_model(args, measure: Callable[[str, Any, Any], dict], device) -> list[dict]:
    """``measure(name, args, device)`` for each name of ``--models`` (comma-separated),
    each row printed as it comes; the rows in order."""
    rows = []
    for name in args.models.split(","):
        rows.append(measure(name.strip(), args, device))
        print(rows[-1], flush=True)
    return rows
