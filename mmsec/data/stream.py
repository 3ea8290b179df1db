"""Batches of a dataset's images loaded by worker processes while the model runs.

:func:`stream_batches` takes planned batches (lists of item positions) and yields them
loaded, in order, through a torch ``DataLoader`` whose ``num_workers`` processes decode the
files; the main process meanwhile runs the model on the previous batch. An item that fails
to load (a file corrupted or removed after the dataset was scanned) is left out of its batch
and reported with its reason, so one bad file among a million costs one item, not the job.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import MmsecError
from .base import ImageDataset, Subset, TensorDataset

__all__ = ["Loaded", "base_dataset", "default_workers", "item_path", "stream_batches",
           "usable_cpus"]

#: at most this many worker processes by default
MAX_DEFAULT_WORKERS = 8


@dataclass
class Loaded:
    """One loaded batch: ``positions`` (the items that loaded, in order), their ``images``
    (``[B, 3, H, W]``, uint8 or float in [0, 1]; pinned when asked: see :meth:`pixels`),
    ``planned`` (how many items the batch asked for) and ``failed`` (``(position, reason)``
    of those that did not load)."""

    planned: int
    positions: list[int]
    images: torch.Tensor
    failed: list[tuple[int, str]]

    def pixels(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The images on ``device`` as float ``[B, 3, H, W]`` in [0, 1] (uint8 ones are
        copied as uint8 and converted there: the same floats as the dataset's ``load``)."""
        x = self.images.to(device, non_blocking=True)
        return x.float().div_(255) if x.dtype == torch.uint8 else x


def base_dataset(ds: ImageDataset) -> ImageDataset:
    """The dataset under any chain of :class:`Subset` views."""
    while isinstance(ds, Subset):
        ds = ds.base
    return ds


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers(ds: ImageDataset) -> int:
    """Worker processes for ``ds``: 0 for in-memory tensors (a gather is faster than a
    process hop), else ``min(8, CPUs - 1)`` (one CPU stays with the model)."""
    if isinstance(base_dataset(ds), TensorDataset):
        return 0
    return max(0, min(MAX_DEFAULT_WORKERS, usable_cpus() - 1))


def item_path(ds: ImageDataset, i: int) -> str | None:
    """The file item ``i`` of ``ds`` loads from, when it loads from one."""
    while isinstance(ds, Subset):
        ds, i = ds.base, ds.indices[i]
    files = getattr(ds, "files", None)
    return str(files[i]) if files is not None else None


class _Batches(torch.utils.data.Dataset):
    """Planned batch ``b`` of ``ds``, loaded item by item (what one worker does)."""

    def __init__(self, ds: ImageDataset, batches: Sequence[Sequence[int]]) -> None:
        from .files import FileImageDataset

        self.ds, self.batches = ds, batches
        # 8-bit sources cross the process boundary as uint8 (a quarter of the bytes) and
        # become exactly the same floats again in the main process; a subclass that loads
        # otherwise (augments, say) keeps its floats
        base = base_dataset(ds)
        self.as_uint8 = isinstance(base, FileImageDataset) \
            and type(base).load is FileImageDataset.load

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int):
        positions, images, failed = [], [], []
        for i in self.batches[b]:
            try:
                x, _ = self.ds.load(int(i))
            except (MmsecError, OSError) as exc:  # corrupt or gone since the scan
                failed.append((int(i), str(exc)))
                continue
            positions.append(int(i))
            images.append(x)
        x = torch.stack(images) if images else torch.zeros(0, 3, 1, 1)
        if self.as_uint8:
            x = x.mul_(255).round_().to(torch.uint8)
        return len(self.batches[b]), positions, x, failed


def _as_is(item):
    return item


def stream_batches(ds: ImageDataset, batches: Sequence[Sequence[int]], *, workers: int = 0,
                   pin_memory: bool = False, prefetch: int = 2) -> Iterator[Loaded]:
    """Load ``batches`` of ``ds`` in order: ``workers`` processes (0: in this process), each
    keeping ``prefetch`` batches ready; ``pin_memory`` for a fast copy to a CUDA device."""
    if workers < 0:
        raise ValueError("workers must be >= 0")
    source = _Batches(ds, batches)
    if workers == 0:
        items = (source[b] for b in range(len(source)))
    else:
        items = iter(torch.utils.data.DataLoader(
            source, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_as_is,
            pin_memory=pin_memory, prefetch_factor=prefetch))
    for planned, positions, x, failed in items:
        yield Loaded(planned, positions, x, failed)
