"""The one training loop: every method that updates weights, patches or triggers runs here.

``train(step, batches, optimizers, ...)`` runs ``step(batch, ctx)`` over a
:class:`~mmsec.training.batches.BatchSource` and updates one or several named optimisers
(:class:`~mmsec.training.optim.Optim`), with warm-up + cosine schedules, gradient clipping,
gradient accumulation, autocast (bf16/fp16, fp32 master weights) with a GradScaler for fp16,
progress with ETA, and a checkpoint slot of its own: with ``--resume`` it continues from the
last checkpoint, also mid-epoch, and a stage that had finished is not run again.

A step returns a dict: the entry named after an optimiser (``"loss"`` when there is only
one) is that optimiser's loss; every other number is logged. Each loss back-propagates into
its own optimiser's parameters only (``backward(inputs=...)``): a frozen victim needs no
``requires_grad`` juggling, and its weights get no gradients. A step that must update one
optimiser before computing the next loss (a GAN's discriminator, then its generator) calls
``ctx.update(name, loss)`` itself.

The loop leaves module modes alone except for ``train_modules``, which are put in train mode
while training (eval mode during ``on_epoch_end``) and restored afterwards.

Under torchrun (:mod:`mmsec.distributed`) the same call is data-parallel: the parameters
start from rank 0's values, each process runs the step on its slice of every global batch
(:meth:`BatchSource.shard`), its loss is weighted by its share of the batch, and the
gradients of each optimiser are averaged over processes before clipping and the step (one
all-reduce per optimiser step, after accumulation). A per-item mean loss then gives the
gradient of the global batch's mean, and an in-batch contrastive loss computed on the
gathered batch (:func:`mmsec.distributed.gather`) its exact gradient; batch norms in train
mode normalise with the global batch's statistics; so N processes
follow one process's trajectory up to float reduction order. Logged numbers are the
share-weighted means over processes; only the main process checkpoints and logs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..errors import MmsecError
from ..runs import capture_rng_state, restore_rng_state
from .batches import Batches, BatchSource
from .optim import Optim, build_optimizer, lr_factor
from .stopping import Plateau, flat_since

__all__ = ["StepContext", "TrainResult", "train"]

_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: optimiser steps between two read-backs of the per-step numbers (also read back at every
#: checkpoint and epoch end): on a GPU each read-back waits for the queued kernels, so
#: reading every step would stall the device once per step.
READ_EVERY = 25


class _Deferred:
    """The numbers of recent steps, kept where the step computed them and read back to the
    host in one transfer per device by :meth:`read` (a ``float(tensor)`` per number and
    step would be a host-device sync each).

    Each logged tensor is copied when recorded (a later in-place update of, say, a
    parameter that a step logs does not change what is logged), as float64 (float32 on
    MPS, which has no float64): ``float()`` of the copy is ``float()`` of the original.
    Deferred loss checks (``check``) raise at read-back, naming the first non-finite loss.
    """

    def __init__(self) -> None:
        # (step, epoch, {key: float | (index in the row tensor,)}, row tensor, extra floats,
        # weight under torchrun)
        self.rows: list[tuple[int, int, dict[str, Any], torch.Tensor | None,
                              dict[str, float], float]] = []
        self.checks: list[tuple[str, int, torch.Tensor]] = []  # (optimiser, step, loss)

    @staticmethod
    def _dtype(t: torch.Tensor) -> torch.dtype:
        return torch.float32 if t.device.type == "mps" else torch.float64

    def log(self, step: int, epoch: int, logs: Mapping[str, Any],
            extra: Mapping[str, float], weight: float = 1.0) -> None:
        tensors = [v for v in logs.values() if isinstance(v, torch.Tensor)]
        row = None
        if tensors:
            dev, dt = tensors[0].device, self._dtype(tensors[0])
            row = torch.stack([t.detach().reshape(()).to(device=dev, dtype=dt)
                               for t in tensors])
        values: dict[str, Any] = {}
        i = 0
        for k, v in logs.items():
            if isinstance(v, torch.Tensor):
                values[k], i = (i,), i + 1
            else:
                values[k] = v
        self.rows.append((step, epoch, values, row, dict(extra), weight))

    def check(self, name: str, step: int, loss: torch.Tensor) -> None:
        loss = loss.detach()
        self.checks.append((name, step, loss.to(self._dtype(loss)).sum()))

    def read(self) -> tuple[list[tuple[int, int, dict[str, float], dict[str, float], float]],
                            MmsecError | None]:
        """The recorded rows as ``(step, epoch, numbers, extra, weight)``, oldest first, and
        emptied; with the error of the first non-finite checked loss, if any (then only the
        rows of the steps before it)."""
        rows, checks = self.rows, self.checks
        self.rows, self.checks = [], []
        parts = [r[3] for r in rows if r[3] is not None] + [c[2].reshape(1) for c in checks]
        host: list[list[float]] = [[] for _ in parts]
        by_device: dict[torch.device, list[int]] = {}
        for i, t in enumerate(parts):
            by_device.setdefault(t.device, []).append(i)
        for idx in by_device.values():  # one transfer (one sync) per device
            flat = torch.cat([parts[i] for i in idx]).tolist()
            at = 0
            for i in idx:
                host[i], at = flat[at:at + parts[i].numel()], at + parts[i].numel()
        out, j = [], 0
        for step, epoch, values, row, extra, weight in rows:
            got = host[j] if row is not None else []
            j += row is not None
            out.append((step, epoch, {k: got[v[0]] if isinstance(v, tuple) else v
                                      for k, v in values.items()}, extra, weight))
        for n, (name, step, _) in enumerate(checks):
            value = host[j + n][0]
            if not math.isfinite(value):
                return [r for r in out if r[0] < step], _diverged(name, step, value)
        return out, None


def _diverged(name: str, step: int, value: float) -> MmsecError:
    return MmsecError(f"the loss of optimiser {name!r} is {value:g} at step {step}: training "
                      "diverged (lower the learning rate, set grad_clip, or check the data); "
                      "the last checkpoint is kept")


@dataclass
class TrainResult:
    """What a loop did: per-epoch means of every logged number, optimiser steps taken, and
    whether it resumed (``resumed_at`` step) or found its stage already done."""

    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    resumed_at: int | None = None
    already_done: bool = False
    #: why the loop ended before its planned steps (``stop``), else None
    stopped_early: str | None = None
    #: the steps planned (``steps``, or ``epochs`` x batches, at least ``min_steps``)
    planned: int = 0


class StepContext:
    """What a step function sees: ``step`` (global optimiser step), ``epoch``, ``total``
    steps, and :meth:`update` to update one optimiser now."""

    def __init__(self, loop: _Loop) -> None:
        self._loop = loop
        self.step = 0
        self.epoch = 0
        self.total = loop.total
        self.updated: set[str] = set()

    def update(self, name: str, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` into optimiser ``name``'s parameters; the optimiser steps
        when its accumulation is complete (at once without accumulation)."""
        self._loop.update(name, loss)
        self.updated.add(name)


class _Loop:
    def __init__(self, optimizers: Mapping[str, Optim], total: int, accumulate: int,
                 precision: str, device: torch.device) -> None:
        self.specs = dict(optimizers)
        self.opts = {n: build_optimizer(s) for n, s in self.specs.items()}
        self.params = {n: [p for g in self.opts[n].param_groups for p in g["params"]]
                       for n in self.specs}
        self.base_lr = {n: [g["lr"] for g in self.opts[n].param_groups] for n in self.specs}
        self.total, self.accumulate = total, accumulate
        self.micro = 0
        self.device = device
        amp = _AMP.get(precision)
        cpu_amp = device.type == "cpu" and os.environ.get("MMSEC_CPU_AUTOCAST") == "1"
        self.amp_dtype = amp if amp is not None and (device.type == "cuda" or cpu_amp) else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=(
            self.amp_dtype is torch.float16 and device.type == "cuda"))
        self.pending: set[str] = set()
        self.gstep = 0
        # a non-finite loss stops training before the optimiser steps (the weights stay as
        # they were) when checked at once; on an accelerator that check is a host-device
        # sync per loss, so there it is deferred to the next read-back of the step numbers
        # (before any checkpoint: the last checkpoint is still a good one, but the weights
        # in memory may have taken the bad steps). MMSEC_DEFER_CHECKS=1/0 forces either.
        env = os.environ.get("MMSEC_DEFER_CHECKS")
        self.defer_checks = device.type != "cpu" if env not in ("0", "1") else env == "1"
        self.deferred = _Deferred()
        #: this process's loss weight: world size x its share of the global batch (1 alone)
        self.weight = 1.0
        self.world = distributed.world_size()
        if self.world > 1:  # every process starts from rank 0's parameters
            for params in self.params.values():
                distributed.broadcast_tensors(params)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def set_lr(self, step: int) -> None:
        self.gstep = step
        for name, spec in self.specs.items():
            factor = lr_factor(step, self.total, spec.warmup_steps, spec.schedule)
            for group, base in zip(self.opts[name].param_groups, self.base_lr[name], strict=True):
                group["lr"] = base * factor

    def lrs(self) -> dict[str, float]:
        """The learning rate of each optimiser's first group: ``lr`` (one) or ``lr_<name>``."""
        if len(self.opts) == 1:
            return {"lr": float(next(iter(self.opts.values())).param_groups[0]["lr"])}
        return {f"lr_{n}": float(o.param_groups[0]["lr"]) for n, o in self.opts.items()}

    def update(self, name: str, loss: torch.Tensor) -> None:
        if name not in self.opts:
            raise KeyError(f"no optimiser named {name!r} (have: {', '.join(self.opts)})")
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            raise MmsecError(f"the loss of optimiser {name!r} does not depend on its "
                             "parameters (no gradient)")
        if self.scaler.is_enabled():
            pass  # fp16 with a grad scaler skips such steps itself
        elif self.defer_checks:
            self.deferred.check(name, self.gstep + 1, loss)
        elif not bool(torch.isfinite(loss.detach()).all()):
            raise _diverged(name, self.gstep + 1, float(loss.detach()))
        scaled = self.scaler.scale(loss.float() * (self.weight / self.accumulate))
        with torch.autocast(self.device.type, enabled=False):  # backward outside autocast
            scaled.backward(inputs=self.params[name])
        self.pending.add(name)
        if self.micro == self.accumulate - 1:
            self._step(name)

    def skip(self, name: str) -> None:
        """This process has no loss for optimiser ``name`` in this batch (its rows had none
        of what that loss needs): under several processes it still joins the gradient
        average at the step's end, where the others may have one (nothing alone)."""
        if self.world > 1 and self.micro == self.accumulate - 1:
            self._step(name)

    def _step(self, name: str) -> None:
        opt, spec = self.opts[name], self.specs[name]
        if self.world > 1:
            _average_grads(self.params[name])
        if spec.grad_clip:
            self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(self.params[name], spec.grad_clip)
        self.scaler.step(opt)
        opt.zero_grad(set_to_none=True)
        self.pending.discard(name)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"scaler": _jsonable_state(self.scaler.state_dict())}
        for name, opt in self.opts.items():
            sd = opt.state_dict()
            scalars = {}
            for idx, st in sd["state"].items():
                for k, v in st.items():
                    if isinstance(v, torch.Tensor):
                        tensors[f"optim.{name}.{idx}.{k}"] = v.detach().cpu().contiguous()
                    else:
                        scalars[f"{idx}.{k}"] = v
            meta[f"optim.{name}"] = {"param_groups": sd["param_groups"], "scalars": scalars}
        return tensors, meta

    def load(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
        for name, opt in self.opts.items():
            om = meta.get(f"optim.{name}")
            if om is None:
                raise MmsecError(f"the checkpoint has no state for optimiser {name!r}")
            state: dict[int, dict[str, Any]] = {}
            prefix = f"optim.{name}."
            for k, v in tensors.items():
                if k.startswith(prefix):
                    idx, key = k[len(prefix):].split(".", 1)
                    state.setdefault(int(idx), {})[key] = v
            for k, v in om.get("scalars", {}).items():
                idx, key = k.split(".", 1)
                state.setdefault(int(idx), {})[key] = v
            opt.load_state_dict({"state": state, "param_groups": om["param_groups"]})
        if meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])


def _average_grads(params: Sequence[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over processes in one all-reduce; a parameter
    that got no gradient on any process keeps none (the optimiser skips it, as alone)."""
    if not params:
        return
    flat = [p.grad.reshape(-1).float() if p.grad is not None
            else torch.zeros(p.numel(), device=p.device) for p in params]
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32,
                       device=params[0].device)
    buf = distributed.all_reduce(torch.cat([*flat, has]), op="mean")
    got = buf[buf.numel() - len(params):].tolist()  # one sync, not one per parameter
    offset = 0
    for i, p in enumerate(params):
        size = p.numel()
        if got[i] > 0:
            avg = buf[offset:offset + size].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = avg.clone()
            else:
                p.grad.copy_(avg)
        offset += size


def _reduce_logs(rows: Sequence[tuple[dict[str, float], float]]) -> list[dict[str, float]]:
    """The share-weighted mean of each logged number of each ``(numbers, weight)`` row over
    processes (one all-reduce for all rows; every process runs the same steps, so the same
    names)."""
    keys = [sorted(logs) for logs, _ in rows]
    flat = [v for (logs, w), ks in zip(rows, keys, strict=True)
            for v in [logs[k] * w for k in ks] + [w]]
    vals = distributed.all_reduce(torch.tensor(flat, dtype=torch.float64))
    out, at = [], 0
    for ks in keys:
        n = len(ks)
        row = vals[at:at + n + 1]
        out.append(dict(zip(ks, (row[:n] / row[n]).tolist(), strict=True)))
        at += n + 1
    return out


def _jsonable_state(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


def _module_state(state: Mapping[str, nn.Module | Sequence[torch.Tensor]]
                  ) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, obj in state.items():
        items = obj.state_dict().items() if isinstance(obj, nn.Module) else \
            ((str(i), t) for i, t in enumerate(obj))
        for k, v in items:
            out[f"state.{name}.{k}"] = v.detach().cpu().contiguous()
    return out


def _load_module_state(state: Mapping[str, nn.Module | Sequence[torch.Tensor]],
                       tensors: Mapping[str, torch.Tensor], slot: str) -> None:
    for name, obj in state.items():
        prefix = f"state.{name}."
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            if isinstance(obj, nn.Module):
                obj.load_state_dict(sub)
            else:
                with torch.no_grad():
                    for i, t in enumerate(obj):
                        t.copy_(sub[str(i)])
        except (RuntimeError, KeyError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0][:300]
            raise MmsecError(f"checkpoint slot {slot!r} does not fit {name!r} as configured now "
                             f"(were the options changed since the run started?): {first}"
                             ) from None


def _number(v: Any) -> float | torch.Tensor | None:
    """A loggable number: a one-element tensor (read back later, see :class:`_Deferred`),
    a float, or None."""
    if isinstance(v, torch.Tensor):
        return v if v.numel() == 1 else None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


def _plateau_notes(result: TrainResult, desc: str, monitor: Sequence[str] | None,
                   stop: Plateau | None, epochs: int, rel_tol: float = 0.01) -> list[str]:
    """Notes on monitored numbers whose last ``epochs`` or more epochs stayed within
    ``rel_tol`` (say, a GAN loss flat after the first epoch: more epochs do nothing)."""
    history = result.history
    if monitor is None:
        seen = dict.fromkeys(k for h in history for k in h)
        # the losses (and what early stopping watches); held-out numbers such as a clean
        # accuracy that must stay put are watched only when a plugin names them
        monitor = [k for k in seen if k == "loss" or k.startswith("loss_")]
        if stop is not None and stop.metric not in monitor:
            monitor.append(stop.metric)
    notes = []
    for key in monitor:
        values = [h.get(key) for h in history]
        since = flat_since(values, rel_tol)
        if since is None or len(values) - since < epochs + 1:
            continue
        notes.append(f"{desc}: {key} stayed within {rel_tol:.0%} from epoch {since + 1} to "
                     f"{len(values)} (at {values[-1]:.4g}); the epochs after {since + 1} "
                     "changed little")
    return notes


def train(
    step: Callable[[Any, StepContext], Mapping[str, Any] | torch.Tensor],
    batches: BatchSource | Callable[[int], Any],
    optimizers: Optim | Mapping[str, Optim],
    *,
    steps: int | None = None,
    epochs: int = 1,
    min_steps: int = 0,
    stop: Plateau | None = None,
    run: Any = None,
    slot: str = "train",
    state: Mapping[str, nn.Module | Sequence[torch.Tensor]] | None = None,
    train_modules: Sequence[nn.Module] = (),
    accumulate: int = 1,
    precision: str = "fp32",
    device: torch.device | str | None = None,
    on_epoch_end: Callable[[int, dict], dict | None] | None = None,
    checkpoint_every: str | int = "epoch",
    desc: str | None = None,
    monitor: Sequence[str] | None = None,
    plateau_epochs: int = 3,
) -> TrainResult:
    """Train: ``epochs`` passes over ``batches`` (or exactly ``steps`` optimiser steps).

    Args:
        step: ``step(batch, ctx) -> {"loss": tensor, ...}`` (or a loss tensor); with several
            optimisers the keys are their names (one optimiser takes ``"loss"`` or its name),
            or the step calls ``ctx.update(name, loss)`` itself. A step that gives no loss
            for the only optimiser, or an optimiser that got no loss in a whole epoch, is
            an error: nothing trains silently.
        batches: a :class:`BatchSource` (a bare ``fn(epoch)`` must return a sized iterable).
        optimizers: one :class:`Optim`, or ``{name: Optim}``.
        steps: optimiser steps in all (default ``epochs`` x batches per epoch / accumulate).
        min_steps: at least this many steps when the plan comes from ``epochs`` (so a small
            dataset still gets enough updates; extra epochs are added). ``stop`` never ends
            the loop before ``min_steps`` steps.
        stop: end early when a per-epoch number plateaus (:class:`Plateau`).
        run: the run context (progress, log, checkpoints, ``--resume``); None runs silently.
        slot: this loop's checkpoint slot (one per stage of a plugin).
        state: modules (or tensors) checkpointed and restored on resume; default: each
            optimiser's ``params`` when it is a module.
        train_modules: modules put in train mode while training.
        accumulate: batches per optimiser step (gradient accumulation).
        precision: fp32 | bf16 | fp16 autocast around the step (CUDA; on the CPU only with
            ``MMSEC_CPU_AUTOCAST=1``); parameters stay fp32.
        on_epoch_end: ``fn(epoch, means) -> extra numbers`` after each epoch (eval mode).
        checkpoint_every: ``"epoch"``, a number of steps, or ``"never"``.
        desc: label of the progress bar, log lines and logged scalars (default: the slot).
        monitor: per-epoch numbers watched for a plateau (default: the losses and
            ``stop``'s metric). One that stayed within 1% for the last
            ``plateau_epochs`` epochs or more gets a note under the run's headline.
        plateau_epochs: epochs a monitored number must stay flat to be noted.

    Every optimiser step's numbers (and each optimiser's learning rate) and every epoch's
    means go to ``run.log_scalars`` (the run folder's ``scalars.jsonl``, TensorBoard or
    W&B: :mod:`mmsec.scalars`). The numbers stay where the step computed them and are read
    back together every :data:`READ_EVERY` steps, at each checkpoint and at each epoch's end
    (one host-device sync then, none per step); a non-finite loss is caught at once on the
    CPU and at the next read-back elsewhere (``MMSEC_DEFER_CHECKS``, see ``_Loop``).
    """
    specs = {"loss": optimizers} if isinstance(optimizers, Optim) else dict(optimizers)
    if not specs:
        raise ValueError("train needs at least one optimiser")
    source = batches if isinstance(batches, BatchSource) else Batches(batches)
    world = distributed.world_size()
    if world > 1:  # each process: its slice of every global batch, with a Shard
        source = source.shard(distributed.rank(), world)
    accumulate = max(1, int(accumulate))
    per_epoch = len(source) // accumulate
    if per_epoch < 1:
        raise ValueError(f"{len(source)} batches per epoch cannot make one step of "
                         f"{accumulate} accumulated batches")
    total = int(steps) if steps is not None else max(int(epochs) * per_epoch, int(min_steps))
    n_epochs = math.ceil(total / per_epoch)
    if state is None:
        state = {n: s.params for n, s in specs.items() if isinstance(s.params, nn.Module)}
    if device is None:
        first = next(iter(specs.values())).parameters()
        device = first[0].device if first else torch.device("cpu")
    loop = _Loop(specs, total, accumulate, precision, torch.device(device))
    desc = desc or slot
    single = len(specs) == 1
    fed: set[str] = set()  # optimisers that got a loss at least once
    ctx = StepContext(loop)
    result = TrainResult(planned=total)
    start_epoch, start_batch, gstep = 0, 0, 0
    sums: dict[str, float] = {}
    count = 0
    save = run is not None and checkpoint_every != "never" and distributed.is_main()
    epoch_rng: dict[str, torch.Tensor] = {}
    log_scalars = getattr(run, "log_scalars", None)

    if run is not None and getattr(run, "resume", False):
        ck = run.load_checkpoint(slot)
        if ck is not None:
            tensors, meta = ck
            _load_module_state(state, tensors, slot)
            loop.load(tensors, meta)
            result.history = list(meta.get("history", []))
            result.stopped_early = meta.get("stopped_early")
            gstep = int(meta["step"])
            result.resumed_at = gstep
            if meta.get("done") and (gstep >= total or int(meta.get("total", -1)) == total):
                result.steps, result.already_done = gstep, True
                run.log.info("%s: already done (%d steps), not run again", desc, gstep)
                return result
            if meta.get("done"):
                run.log.warning("%s: the checkpoint holds a finished run of %d steps; "
                                "continuing it to %d steps", desc, gstep, total)
            start_epoch, start_batch = int(meta["epoch"]), int(meta["batch"])
            sums, count = dict(meta.get("sums", {})), int(meta.get("count", 0))
            epoch_rng = {k[len("epoch_rng."):]: v for k, v in tensors.items()
                         if k.startswith("epoch_rng.")}
            run.log.info("%s: resumed at epoch %d, batch %d (step %d)", desc, start_epoch + 1,
                         start_batch, gstep)

    def checkpoint(epoch: int, batch: int, done: bool = False) -> None:
        tensors = _module_state(state)
        if batch:  # mid-epoch: the random state the epoch began with, to replay its batches
            tensors.update({f"epoch_rng.{k}": v for k, v in epoch_rng.items()})
        opt_tensors, opt_meta = loop.state()
        tensors.update(opt_tensors)
        run.save_checkpoint(tensors, {
            "slot": slot, "desc": desc, "epoch": epoch, "batch": batch, "step": gstep,
            "total": total, "done": done, "history": result.history, "sums": sums, "count": count,
            "stopped_early": result.stopped_early,
            "optimizers": {n: s.describe() for n, s in specs.items()}, **opt_meta,
        }, slot=slot)

    def read_back() -> None:
        """Read the numbers of the steps since the last read-back (one host-device sync),
        add them to the epoch's sums and log them; raise for a non-finite loss among them.
        Called at the same steps by every process (under torchrun it all-reduces)."""
        rows, error = loop.deferred.read()
        reduced = None
        if world > 1 and rows:  # (every process has the same rows: the same steps)
            reduced = _reduce_logs([(logs, weight) for _, _, logs, _, weight in rows])
        for i, (at, ep, logs, lrs, _) in enumerate(rows):
            logs = reduced[i] if reduced is not None else logs
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
            if log_scalars is not None:
                log_scalars(desc, at, {**logs, **lrs}, epoch=ep)
        if error is not None:
            raise error

    modes = [m.training for m in train_modules]
    for m in train_modules:
        m.train()
    synced = contextlib.ExitStack()
    if world > 1:  # batch norms in train mode: statistics of the global batch
        synced.enter_context(distributed.synced_batch_norm(
            [*train_modules, *(m for m in state.values() if isinstance(m, nn.Module)),
             *(s.params for s in specs.values() if isinstance(s.params, nn.Module))]))
    try:
        for epoch in range(start_epoch, n_epochs):
            first = start_batch if epoch == start_epoch else 0
            if epoch != start_epoch:
                sums, count = {}, 0
            if first and epoch_rng:  # replay the skipped batches from the epoch's start state
                now = capture_rng_state()
                restore_rng_state(epoch_rng)
                it = source.epoch(epoch, first)
                restore_rng_state(now)
            else:
                epoch_rng = capture_rng_state()
                it = source.epoch(epoch, first)
            if run is not None:
                it = run.progress(it, desc=f"{desc} {epoch + 1}/{n_epochs}",
                                  total=len(source) - first)
            position = first
            for batch in it:
                if gstep >= total:
                    break
                shard = None
                if world > 1:
                    batch, shard = batch
                    loop.weight = world * shard.weight
                if loop.micro == 0:
                    loop.set_lr(gstep)
                ctx.step, ctx.epoch, ctx.updated = gstep, epoch, set()
                with loop.autocast(), distributed.sharding(shard):
                    out = step(batch, ctx)
                if isinstance(out, torch.Tensor):
                    out = {"loss": out}
                logs: dict[str, float | torch.Tensor] = {}
                for name in specs:
                    key = "loss" if single and "loss" in out else name
                    loss = out.get(key)
                    if name not in ctx.updated and loss is not None:
                        loop.update(name, loss)
                    elif name not in ctx.updated:
                        loop.skip(name)
                    if name in ctx.updated or loss is not None:
                        fed.add(name)
                    elif single:
                        raise MmsecError(f"{desc}: the training step returned no loss (keys: "
                                         f"{', '.join(map(str, out)) or 'none'}); return "
                                         f"'loss' or '{name}'")
                for key, value in out.items():
                    number = _number(value)
                    if number is not None:
                        logs[f"loss_{key}" if key in specs and key != "loss" else key] = number
                position += 1
                loop.micro += 1
                if loop.micro < accumulate:
                    continue
                for name in list(loop.pending):  # optimisers whose loss came from ctx.update
                    loop._step(name)
                loop.scaler.update()
                loop.micro = 0
                gstep += 1
                count += 1
                loop.deferred.log(gstep, epoch, logs, loop.lrs(),
                                  shard.weight if shard else 0.0)
                at_checkpoint = isinstance(checkpoint_every, int) and gstep % checkpoint_every == 0
                if at_checkpoint or count % READ_EVERY == 0:
                    read_back()
                    if hasattr(it, "set_postfix") and "loss" in sums:
                        it.set_postfix(loss=f"{sums['loss'] / count:.4f}")
                if save and at_checkpoint:
                    checkpoint(epoch, position)
            read_back()
            starved = [n for n in specs if n not in fed]
            if starved and count:
                raise MmsecError(f"{desc}: no loss for optimiser(s) {', '.join(starved)} in a "
                                 "whole epoch: return them by name or call ctx.update")
            means = {k: v / max(1, count) for k, v in sums.items()}
            means["epoch"] = epoch
            if on_epoch_end is not None:
                for m in train_modules:
                    m.eval()
                means.update(on_epoch_end(epoch, means) or {})
                for m in train_modules:
                    m.train()
            result.history.append(means)
            sums, count = {}, 0
            if log_scalars is not None:
                log_scalars(desc, gstep, {k: v for k, v in means.items() if k != "epoch"},
                            epoch=epoch, scope="epoch")
            if run is not None:
                run.log.info("%s epoch %d: %s", desc, epoch + 1,
                             ", ".join(f"{k}={v:.4g}" for k, v in means.items() if k != "epoch"))
            reason = (stop.check(result.history)
                      if stop is not None and min_steps <= gstep < total else None)
            reason = distributed.broadcast_object(reason) if world > 1 else reason
            if reason:
                result.stopped_early = reason
                if run is not None:
                    run.log.info("%s: stopped early after epoch %d of %d (step %d of %d): %s",
                                 desc, epoch + 1, n_epochs, gstep, total, reason)
                break
            if run is not None:
                if save and (checkpoint_every == "epoch" or isinstance(checkpoint_every, int)) \
                        and gstep < total:
                    checkpoint(epoch + 1, 0)
            if gstep >= total:
                break
    finally:
        if world == 1 and (loop.deferred.rows or loop.deferred.checks):
            # an error (or ^C) mid-epoch: log the steps taken before it, as when every step
            # was logged at once (several processes would have to meet to reduce them)
            with contextlib.suppress(Exception):
                read_back()
        synced.close()
        for m, mode in zip(train_modules, modes, strict=True):
            m.train(mode)
    result.steps = gstep
    note = getattr(run, "note", None)
    if note is not None:
        for text in _plateau_notes(result, desc, monitor, stop, plateau_epochs):
            note(text)
    if save:
        checkpoint(n_epochs, 0, done=True)
    if run is not None:
        run.log.debug("%s: %s", desc, json.dumps({"steps": gstep}))
    return result
