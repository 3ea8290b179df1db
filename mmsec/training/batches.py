"""Batch sources of the training core: they know their length and can start mid-epoch.

``train`` asks a source for the batches of epoch ``e`` starting at batch ``b`` (a resumed run
continues mid-epoch) and for how many batches an epoch has, so a schedule in epochs is
never silently shortened. :class:`IndexBatches` draws reproducible shuffled index batches;
:class:`Batches` wraps a function of the epoch.

Under torchrun the loop asks for :meth:`BatchSource.shard`: the same global batches as one
process, each process keeping its contiguous slice of every batch (index batches are sliced
before the items are loaded; the batches of a function are built whole on every process,
random draws included, and then sliced along their first dimension), with a
:class:`~mmsec.distributed.Shard` that says which rows it holds.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from ..distributed import Shard, batch_size, shard_range, slice_batch

__all__ = ["BatchSource", "Batches", "IndexBatches", "stream_seed"]


def stream_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (``stream_seed(seed, "advclip.batches", epoch)``): named
    streams never collide the way small integer offsets do."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


class BatchSource:
    """Batches, epoch after epoch. Subclasses implement ``__len__`` (batches per epoch) and
    ``epoch(epoch, start)`` (that epoch's batches from position ``start``)."""

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:  # pragma: no cover
        raise NotImplementedError

    def map(self, fn: Callable[[Any], Any]) -> BatchSource:
        """The same batches passed through ``fn`` (e.g. indices -> images and captions)."""
        return _Mapped(self, fn)

    def shard(self, rank: int, world_size: int) -> BatchSource:
        """Process ``rank``'s part of every batch, as ``(batch, Shard)`` pairs: the rows
        ``[start, stop)`` of the batch along its first dimension (see :func:`slice_batch
        <mmsec.distributed.slice_batch>`)."""
        return _Sliced(self, rank, world_size)


class Batches(BatchSource):
    """Batches from ``fn(epoch) -> iterable``.

    ``length`` is the number of batches per epoch; it may be left out only when
    ``fn(epoch)`` returns a sized object (a list). A generator without a length is an error,
    never a guess. Starting mid-epoch skips the first batches (drawn and dropped, so a
    function that draws random numbers continues exactly where it was).
    """

    def __init__(self, fn: Callable[[int], Iterable[Any]], length: int | None = None) -> None:
        if length is None:
            probe = fn(0)
            try:
                length = len(probe)  # type: ignore[arg-type]
            except TypeError:
                raise TypeError("Batches(fn): fn(epoch) returns an iterable without a length; "
                                "give the number of batches per epoch: Batches(fn, length=N)"
                                ) from None
        if length < 1:
            raise ValueError(f"an epoch needs at least one batch, got length={length}")
        self.fn, self.length = fn, int(length)

    def __len__(self) -> int:
        return self.length

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        it = iter(self.fn(epoch))
        for _ in range(start):  # now, not lazily: the caller may restore RNG states around it
            next(it, None)
        return itertools.islice(it, self.length - start)


class IndexBatches(BatchSource):
    """Index batches ``LongTensor [B]`` over ``n`` items, reshuffled every epoch from ``seed``.

    ``drop_last`` leaves out a short last batch (contrastive losses want full batches).
    ``rank``/``world_size`` keep process ``rank``'s contiguous slice of every batch: the
    processes together see the batches of one process.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, shuffle: bool = True,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"IndexBatches needs n >= 1 and batch_size >= 1, got {n}, "
                             f"{batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        full = n // batch_size
        self.length = full if drop_last and full else -(-n // batch_size)

    def __len__(self) -> int:
        return self.length

    def order(self, epoch: int) -> torch.Tensor:
        """The item order of ``epoch`` (the same on every process)."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(stream_seed(self.seed, "epoch", epoch))
            return torch.randperm(self.n, generator=gen)
        return torch.arange(self.n)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        return (b for b, _ in self._sharded(epoch, start, self.rank, self.world_size))

    def _sharded(self, epoch: int, start: int, rank: int, world_size: int
                 ) -> Iterator[tuple[torch.Tensor, Shard]]:
        perm = self.order(epoch)
        for b in range(start, self.length):
            batch = perm[b * self.batch_size:(b + 1) * self.batch_size]
            lo, hi = shard_range(len(batch), rank, world_size)
            yield batch[lo:hi], Shard(lo, hi, len(batch))

    def shard(self, rank: int, world_size: int) -> BatchSource:
        return _IndexShards(self, rank, world_size)


class _IndexShards(BatchSource):
    def __init__(self, source: IndexBatches, rank: int, world_size: int) -> None:
        self.source, self.rank, self.world_size = source, rank, world_size

    def __len__(self) -> int:
        return len(self.source)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, Shard]]:
        return self.source._sharded(epoch, start, self.rank, self.world_size)


class _Sliced(BatchSource):
    """Whole batches of any source, sliced along their first dimension."""

    def __init__(self, source: BatchSource, rank: int, world_size: int) -> None:
        self.source, self.rank, self.world_size = source, rank, world_size

    def __len__(self) -> int:
        return len(self.source)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Any, Shard]]:
        for batch in self.source.epoch(epoch, start):
            total = batch_size(batch)
            if total is None:
                raise TypeError("a batch without tensors cannot be split between processes: "
                                "give tensors with the items along the first dimension")
            lo, hi = shard_range(total, self.rank, self.world_size)
            yield slice_batch(batch, lo, hi, total), Shard(lo, hi, total)


class _Mapped(BatchSource):
    def __init__(self, source: BatchSource, fn: Callable[[Any], Any]) -> None:
        self.source, self.fn = source, fn

    def __len__(self) -> int:
        return len(self.source)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        return (self.fn(b) for b in self.source.epoch(epoch, start))

    def shard(self, rank: int, world_size: int) -> BatchSource:
        # shard the inner batches (indices) before ``fn`` loads them: each process loads
        # only its own items
        return _MappedShards(self.source.shard(rank, world_size), self.fn)


class _MappedShards(BatchSource):
    def __init__(self, source: BatchSource, fn: Callable[[Any], Any]) -> None:
        self.source, self.fn = source, fn

    def __len__(self) -> int:
        return len(self.source)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Any, Shard]]:
        return ((self.fn(b), s) for b, s in self.source.epoch(epoch, start))
