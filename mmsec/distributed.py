"""Several processes (torchrun): who am I, talk to the others, do nothing in one process.

Under ``torchrun --nproc_per_node N [--nnodes M ...] -m mmsec ...`` every process runs the
same command. The training core (:func:`mmsec.train`) and the evaluation pipeline use this
module so that every plugin is data-parallel without code of its own:

- each process takes its slice of every *global* batch (the batch one process would see),
  gradients are averaged before each optimiser step, and in-batch contrastive losses see
  the global batch (:func:`gather` keeps the gradient), so N processes compute what one
  process computes;
- the evaluation encodes its items in shards and gathers them;
- only the main process (rank 0) writes the run folder, the cache, logs and progress bars.

In one process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) every helper here is a no-op: the
same code runs with or without torchrun. The process group is initialised on first use
(gloo on the CPU, nccl on CUDA with device ``cuda:LOCAL_RANK``); a collective that waits
longer than ``MMSEC_DIST_TIMEOUT`` seconds (default 1800) fails with an error instead of
hanging, and torchrun stops every process as soon as one of them fails.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

__all__ = [
    "Shard", "all_objects", "all_reduce", "any_process", "barrier", "batch_size", "broadcast_object",
    "broadcast_tensors", "current_shard", "device", "gather", "gather_rows", "global_rand",
    "global_randn",
    "init", "is_main", "launched", "local_rank", "on_global_batch", "rank", "shard_range",
    "sharding",
    "slice_batch", "synced_batch_norm", "world_size",
]

_STATE: dict[str, Any] = {"init": False}


def launched() -> bool:
    """True when started by torchrun (or a launcher that sets ``WORLD_SIZE``) with N > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``; 0 in one process)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def init() -> bool:
    """Join the process group once (no-op in one process); True when distributed."""
    if not launched():
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    cuda = torch.cuda.is_available() and os.environ.get("MMSEC_DIST_BACKEND") != "gloo"
    if cuda:
        torch.cuda.set_device(local_rank())
    timeout = timedelta(seconds=float(os.environ.get("MMSEC_DIST_TIMEOUT", "1800")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout,
                            **({"device_id": torch.device("cuda", local_rank())} if cuda
                               else {}))
    _STATE["init"] = True
    atexit.register(_shutdown)
    return True


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def world_size() -> int:
    """Number of processes (1 without torchrun)."""
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def rank() -> int:
    """This process's global rank (0 without torchrun)."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def is_main() -> bool:
    """True in the process that writes (rank 0, or the only process)."""
    return rank() == 0


def device() -> torch.device:
    """The device of this process under torchrun on CUDA (``cuda:LOCAL_RANK``)."""
    return torch.device("cuda", local_rank())


def _comm_device() -> torch.device:
    """Where collectives' tensors live: CUDA for nccl, the CPU for gloo."""
    import torch.distributed as dist

    return torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def barrier() -> None:
    """Wait for every process (no-op in one process)."""
    if init():
        import torch.distributed as dist

        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``tensor`` summed (``op="sum"``), averaged (``"mean"``) or maxed (``"max"``) over
    processes, in place, and returned; unchanged in one process."""
    if not init():
        return tensor
    import torch.distributed as dist

    n = world_size()
    work = tensor.to(_comm_device())
    dist.all_reduce(work, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        work /= n
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of process ``src`` on every process (picklable objects)."""
    if not init():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with process ``src``'s values (one flat broadcast)."""
    if not init() or not tensors:
        return
    import torch.distributed as dist

    comm = _comm_device()
    with torch.no_grad():
        for dtype in {t.dtype for t in tensors}:
            group = [t for t in tensors if t.dtype == dtype]
            buf = torch.cat([t.detach().reshape(-1).to(comm) for t in group])
            dist.broadcast(buf, src=src)
            offset = 0
            for t in group:
                t.copy_(buf[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def all_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order."""
    if not init():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's ``[n_r, ...]`` rows in rank order (no gradient; the
    ``n_r`` may differ). Returns ``local`` itself in one process."""
    if not init():
        return local
    return _gather_padded(local.detach())[0]


def _gather_padded(local: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    import torch.distributed as dist

    init()
    n = world_size()
    comm = _comm_device()
    sizes = torch.tensor([local.shape[0]], dtype=torch.long, device=comm)
    all_sizes = [torch.zeros_like(sizes) for _ in range(n)]
    dist.all_gather(all_sizes, sizes)
    counts = [int(s) for s in all_sizes]
    most = max(counts)
    pad = torch.zeros((most, *local.shape[1:]), dtype=local.dtype, device=comm)
    pad[:local.shape[0]] = local.to(comm)
    parts = [torch.empty_like(pad) for _ in range(n)]
    dist.all_gather(parts, pad)
    full = torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])
    return full.to(local.device), counts


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; the backward sums the global gradient over processes and
    keeps this process's rows (every process back-propagates the loss it computed)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        full, counts = _gather_padded(local.detach())
        start = sum(counts[:rank()])
        ctx.rows = (start, start + local.shape[0])
        return full

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = all_reduce(grad.contiguous().clone())
        start, stop = ctx.rows
        return grad[start:stop]


def gather(local: torch.Tensor) -> torch.Tensor:
    """The global batch of ``local`` (``[n_r, ...]`` on each process, rank order) with the
    gradient flowing back to each process's own rows: in-batch contrastive losses call it
    so that the negatives are those of the global batch. No-op in one process and outside a
    sharded training step (:func:`sharding`)."""
    if current_shard() is None:
        return local
    if not local.requires_grad:
        return _gather_padded(local)[0]
    return _GatherWithGrad.apply(local)


@dataclass(frozen=True)
class Shard:
    """This process's rows ``[start, stop)`` of a global batch of ``total`` items."""

    start: int
    stop: int
    total: int

    @property
    def weight(self) -> float:
        """This process's share of the global batch (``(stop - start) / total``)."""
        return (self.stop - self.start) / self.total if self.total else 0.0


def shard_range(total: int, index: int | None = None, parts: int | None = None
                ) -> tuple[int, int]:
    """Rows ``[start, stop)`` of process ``index`` (default: this one) when ``total`` rows are
    split into ``parts`` (default: the world size) contiguous, near-equal blocks."""
    index = rank() if index is None else index
    parts = world_size() if parts is None else parts
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


_CURRENT: list[Shard] = []


def current_shard() -> Shard | None:
    """The shard of the training step now running under several processes, else None."""
    return _CURRENT[-1] if _CURRENT else None


@contextlib.contextmanager
def sharding(shard: Shard | None) -> Iterator[None]:
    """Mark the code inside as one process's part of a global batch (the training loop
    does this around each step)."""
    if shard is None:
        yield
        return
    _CURRENT.append(shard)
    try:
        yield
    finally:
        _CURRENT.pop()


def global_rand(shape: Sequence[int], generator: torch.Generator | None = None,
                **kwargs: Any) -> torch.Tensor:
    """``torch.rand(shape)``, but inside a sharded step with ``shape[0]`` the local batch,
    drawn for the global batch and sliced: every process draws what one process would
    have drawn for its rows (a PGD random start, per-item noise)."""
    return _global_draw(torch.rand, shape, generator, **kwargs)


def global_randn(shape: Sequence[int], generator: torch.Generator | None = None,
                 **kwargs: Any) -> torch.Tensor:
    """:func:`global_rand` for ``torch.randn`` (per-item Gaussian noise)."""
    return _global_draw(torch.randn, shape, generator, **kwargs)


def _global_draw(draw: Callable[..., torch.Tensor], shape: Sequence[int],
                 generator: torch.Generator | None, **kwargs: Any) -> torch.Tensor:
    shard = current_shard()
    shape = tuple(shape)
    if shard is None or not shape or shape[0] != shard.stop - shard.start:
        return draw(shape, generator=generator, **kwargs)
    full = draw((shard.total, *shape[1:]), generator=generator, **kwargs)
    return full[shard.start:shard.stop]


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (``flag`` itself in one process). A step
    that gathers only in some case asks this first, so every process joins the gather."""
    if current_shard() is None or not init():
        return bool(flag)
    return bool(all_reduce(torch.tensor([float(bool(flag))]), op="max") > 0)


def on_global_batch(fn: Callable[..., Any], *items: torch.Tensor) -> Any:
    """``fn(*items)`` as one process computes it: inside a sharded step, ``items`` (this
    process's rows, dim 0) are gathered into the global batch, ``fn`` runs on it (the same
    seeds on every process) and this process's rows of its result are kept
    (:func:`slice_batch`). For random per-batch draws (augmentations, sampled captions)
    that must not depend on how the batch is split. Without a shard: ``fn(*items)``."""
    shard = current_shard()
    if shard is None:
        return fn(*items)
    full = fn(*(_gather_padded(t.detach())[0] for t in items))
    return slice_batch(full, shard.start, shard.stop, shard.total)


def slice_batch(batch: Any, start: int, stop: int, total: int) -> Any:
    """Rows ``[start, stop)`` of a batch: tensors, lists and tuples whose first dimension
    is ``total`` are sliced (recursively in tuples, lists and dicts); anything else is
    passed through (a scalar, a shared table)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() and batch.shape[0] == total else batch
    if isinstance(batch, dict):
        return {k: slice_batch(v, start, stop, total) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(slice_batch(v, start, stop, total) for v in batch))
    if isinstance(batch, (list, tuple)):
        if len(batch) == total and batch and not isinstance(batch[0], (torch.Tensor, list,
                                                                          tuple, dict)):
            return batch[start:stop]  # per-item values (captions, ids)
        return type(batch)(slice_batch(v, start, stop, total) for v in batch)
    return batch


def batch_size(batch: Any) -> int | None:
    """The first dimension of a batch's first tensor (None when it holds none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for v in batch:
            n = batch_size(v)
            if n is not None:
                return n
    return None


class _AllReduceWithGrad(torch.autograd.Function):
    """Sum over processes; the backward sums the gradients over processes too."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return all_reduce(tensor.detach().clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return all_reduce(grad.contiguous().clone())


def _synced_batch_norm(module: torch.nn.modules.batchnorm._BatchNorm, original):
    """``module``'s forward with the batch statistics of the global batch in a sharded
    training step (as ``nn.SyncBatchNorm``, which runs on CUDA only); else ``original``."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not module.training or current_shard() is None or x.dim() < 2:
            return original(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        local = torch.cat([xf.sum(dims), (xf * xf).sum(dims),
                           torch.tensor([x.numel() / channels], device=x.device)])
        stats = _AllReduceWithGrad.apply(local)
        count = stats[-1]
        mean = stats[:channels] / count
        var = (stats[channels:2 * channels] / count - mean * mean).clamp(min=0)
        if module.track_running_stats and module.running_mean is not None:
            with torch.no_grad():
                module.num_batches_tracked += 1
                momentum = (1.0 / float(module.num_batches_tracked) if module.momentum is None
                            else module.momentum)
                unbiased = var.detach() * (count / (count - 1).clamp(min=1))
                module.running_mean.lerp_(mean.detach().to(module.running_mean.dtype), momentum)
                module.running_var.lerp_(unbiased.to(module.running_var.dtype), momentum)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + module.eps)
        if module.affine:
            y = y * module.weight.view(shape) + module.bias.view(shape)
        return y.to(x.dtype)

    return forward


@contextlib.contextmanager
def synced_batch_norm(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Inside, the batch-norm layers of ``modules`` normalise training batches with the
    global batch's statistics (running statistics too) under torchrun: a batch norm in
    train mode would otherwise see only its process's rows. No-op in one process."""
    if world_size() == 1:
        yield
        return
    patched = []
    seen: set[int] = set()
    for root in modules:
        for m in root.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and id(m) not in seen:
                seen.add(id(m))
                m.forward = _synced_batch_norm(m, m.forward)  # type: ignore[method-assign]
                patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
