"""Batch sources of the training core: they know their length and can start mid-epoch.

``train`` asks a source for the batches of epoch ``e`` starting at batch ``b`` (a resumed run
continues mid-epoch) and for how many batches an epoch has, so a schedule in epochs is
never silently shortened. :class:`IndexBatches` draws reproducible shuffled index batches
and can shard them by rank (one shard per process under torchrun); :class:`Batches` wraps
a function of the epoch.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

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
    ``rank``/``world_size`` give each process its own shard of every epoch's permutation.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, shuffle: bool = True,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"IndexBatches needs n >= 1 and batch_size >= 1, got {n}, "
                             f"{batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        per_rank = n // world_size if world_size > 1 else n
        self.per_rank = per_rank
        full = per_rank // batch_size
        self.length = full if drop_last and full else -(-per_rank // batch_size)

    def __len__(self) -> int:
        return self.length

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's item order for ``epoch``."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(stream_seed(self.seed, "epoch", epoch))
            perm = torch.randperm(self.n, generator=gen)
        else:
            perm = torch.arange(self.n)
        if self.world_size > 1:
            perm = perm[: self.per_rank * self.world_size][self.rank::self.world_size]
        return perm

    def epoch(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        perm = self.order(epoch)
        for b in range(start, self.length):
            yield perm[b * self.batch_size:(b + 1) * self.batch_size]


class _Mapped(BatchSource):
    def __init__(self, source: BatchSource, fn: Callable[[Any], Any]) -> None:
        self.source, self.fn = source, fn

    def __len__(self) -> int:
        return len(self.source)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        return (self.fn(b) for b in self.source.epoch(epoch, start))
