"""Embeddings of a dataset's images and captions, through the embedding cache.

Clean embeddings are keyed by the model's fingerprint and each item's content hash, so
evaluating the same model on the same data twice encodes nothing the second time. Captions
are keyed by their text, so perturbed captions are cached as well.

Under torchrun the items the cache lacks are encoded in shards, one per process, and
gathered; rank 0 alone reads and writes the cache, and every process gets the same
``[N, D]`` result (so the metrics computed from it are the same everywhere). Each process
streams its block through loader workers too (its machine's CPUs shared between its
processes), but there an image that fails to load raises at once: the gathered rows are
placed by position.

In one process, images are streamed (:mod:`mmsec.data.stream`): only the items the cache
lacks are loaded at all, by ``workers`` processes while the model encodes the previous
batch, and a shard is written every ``flush_every`` items or ``flush_seconds``, so a killed
run loses at most that much. An image that no longer decodes (corrupted after the dataset
was scanned) is skipped with a warning and counted: :func:`fill_cache` (``mmsec cache
encode``) finishes with everything else cached; :func:`encode_images`, which owes a row for
every item, then raises, naming the file, once everything else is cached; the next build of
the dataset scans that file again and leaves it out, as it does any corrupt file.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .. import distributed
from ..cache import EmbeddingCache, content_hash
from ..data import ImageDataset, TensorDataset, load_images
from ..data.stream import (
    MAX_DEFAULT_WORKERS,
    base_dataset,
    default_workers,
    item_path,
    stream_batches,
    usable_cpus,
)
from ..errors import MmsecError

__all__ = ["EncodeReport", "caption_table", "encode_images", "encode_texts", "fill_cache"]

DEFAULT_BATCH = 256
#: a shard is written at least this often while streaming (and every ``flush_every`` items)
FLUSH_SECONDS = 120.0
FLUSH_EVERY = 16384
log = logging.getLogger("mmsec.evaluation")


@dataclass
class EncodeReport:
    """What one streaming encode did: ``items`` in the dataset, ``cached`` (found in the
    cache), ``encoded`` now, ``skipped`` (``(file or item, reason)`` of images that failed
    to load), ``seconds`` of wall time and ``workers`` used."""

    items: int = 0
    cached: int = 0
    encoded: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    workers: int = 0

    @property
    def rate(self) -> float:
        """Images encoded per second (0 when none were)."""
        return self.encoded / self.seconds if self.seconds > 0 and self.encoded else 0.0

    def line(self) -> str:
        """The one-line summary ``mmsec cache encode`` prints."""
        return (f"{self.items} items: {self.encoded} encoded now, {self.cached} already "
                f"cached, {len(self.skipped)} skipped (corrupt), {self.rate:.1f} img/s "
                f"({self.seconds:.1f} s, {self.workers} worker(s))")


def encode_images(model, ds: ImageDataset, cache: EmbeddingCache, *,
                  batch_size: int = DEFAULT_BATCH, progress: bool = True,
                  workers: int | None = None) -> torch.Tensor:
    """Normalised image embeddings ``[N, D]`` (CPU float32) of all of ``ds``, through the cache.

    Missing items are streamed through ``workers`` loader processes (None: see
    :func:`mmsec.data.stream.default_workers`; 0 loads in this process). An image that fails
    to load raises :class:`MmsecError` once every other item is cached (see the module doc).

    A model whose fingerprint does not cover what it computes (a wrapper that declares no
    ``fingerprint_extra``) is never cached: its images are encoded every time.
    """
    keys = [ds.key(i) for i in range(len(ds))]

    def encode(idx: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_image(load_images(ds, idx)[0]).cpu()

    if not getattr(model, "cacheable", True):
        _warn_uncached(model)
        if distributed.world_size() > 1:
            return _sharded(encode, list(range(len(keys))), batch_size)
        return cache.encode_uncached("image", len(keys), encode, batch_size, progress,
                                     desc=f"encoding {ds.describe()}")
    if distributed.world_size() > 1:
        block = None
        workers = _rank_workers(ds) if workers is None else workers
        if workers or not _in_memory(ds):
            block = functools.partial(_encode_block, model, ds, workers=workers,
                                      batch_size=batch_size)
        return _sharded_cached(cache, model.fingerprint, "image", keys, encode, batch_size,
                               block=block)
    workers = default_workers(ds) if workers is None else workers
    if workers == 0 and _in_memory(ds):  # nothing to decode and nothing that can fail
        return cache.encode(model.fingerprint, "image", keys, encode, batch_size, progress,
                            desc=f"encoding {ds.describe()}")
    out, report = _stream(model, ds, cache, keys, batch_size, progress, workers)
    if report.skipped:
        raise _failed(ds, report)
    return out


def _failed(ds: ImageDataset, report: EncodeReport) -> MmsecError:
    files = getattr(base_dataset(ds), "source", None) is not None
    return MmsecError(
        f"{len(report.skipped)} image(s) of {ds.describe()} failed to load after the dataset "
        f"was built (first: {report.skipped[0][1]}); every other item is cached"
        + ("; run again and the new scan leaves them out" if files else ""))


def fill_cache(model, ds: ImageDataset, cache: EmbeddingCache, *,
               batch_size: int = DEFAULT_BATCH, workers: int | None = None,
               progress: bool = True, flush_every: int = FLUSH_EVERY,
               flush_seconds: float | None = FLUSH_SECONDS, strict: bool = False
               ) -> EncodeReport:
    """Encode every image of ``ds`` the cache lacks (streamed, as :func:`encode_images`) and
    say what was done; images that fail to load are skipped with a warning and counted
    (``strict``: then raise :class:`MmsecError`, once everything else is cached).

    Cached items are only looked up by key (their vectors are not read, so a shard damaged
    after it was written is found by the next read, not here) and nothing ``[N, D]`` is
    kept: a 10^6-item folder costs the keys, not 2 GB of floats."""
    if not getattr(model, "cacheable", True):
        raise MmsecError(f"{type(model).__name__} declares no fingerprint_extra(): its "
                         "embeddings cannot be cached")
    keys = [ds.key(i) for i in range(len(ds))]
    workers = default_workers(ds) if workers is None else workers
    report = _stream(model, ds, cache, keys, batch_size, progress, workers,
                     flush_every=flush_every, flush_seconds=flush_seconds, collect=False)[1]
    if strict and report.skipped:
        raise _failed(ds, report)
    return report


def _in_memory(ds: ImageDataset) -> bool:
    return isinstance(base_dataset(ds), TensorDataset)


def _stream(model, ds: ImageDataset, cache: EmbeddingCache, keys: list[str], batch_size: int,
            progress: bool, workers: int, *, flush_every: int = FLUSH_EVERY,
            flush_seconds: float | None = FLUSH_SECONDS, collect: bool = True
            ) -> tuple[torch.Tensor, EncodeReport]:
    """``cache.encode`` of ``ds``'s images fed by :func:`stream_batches`: ``[N, D]`` (NaN rows
    for skipped items) and the report."""
    report = EncodeReport(items=len(keys), workers=workers)
    device = torch.device(getattr(model, "device", "cpu"))
    started, hits, encoded = time.perf_counter(), cache.stats.hits, cache.stats.encoded

    def stream(batches: list[list[int]]):
        loaded = stream_batches(ds, batches, workers=workers,
                                pin_memory=device.type == "cuda")
        for batch in loaded:
            for i, why in batch.failed:
                report.skipped.append((item_path(ds, i) or f"item {i}", why))
                if len(report.skipped) <= 3:
                    log.warning("skipped an image that failed to load: %s", why)
            if not batch.positions:
                yield batch.planned, [], None
                continue
            with torch.no_grad():
                vecs = model.encode_image(batch.pixels(device)).cpu()
            yield batch.planned, batch.positions, vecs

    try:
        out = cache.encode(model.fingerprint, "image", keys, None, batch_size, progress,
                           desc=f"encoding {ds.describe()}", flush_every=flush_every,
                           flush_seconds=flush_seconds, stream=stream, collect=collect)
    finally:
        report.seconds = time.perf_counter() - started
        report.cached = cache.stats.hits - hits
        report.encoded = cache.stats.encoded - encoded
        if report.skipped:
            log.warning("%s: skipped %d image(s) that failed to load (first: %s)",
                        ds.describe(), len(report.skipped), report.skipped[0][0])
            _forget(ds, [p for p, _ in report.skipped])
    return out, report


def _forget(ds: ImageDataset, paths: list[str]) -> None:
    """Files that failed to load leave the scan memos: the next scan looks at them again."""
    from ..data.files import forget_scans

    source = getattr(base_dataset(ds), "source", None)
    if source:
        forget_scans(source, paths)


def encode_texts(model, texts: Sequence[str], cache: EmbeddingCache, *,
                 batch_size: int = 1024) -> torch.Tensor:
    """Normalised text embeddings ``[M, D]`` (CPU float32), through the cache."""
    keys = [content_hash(t) for t in texts]

    def encode(idx: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_text([texts[i] for i in idx]).cpu()

    if not getattr(model, "cacheable", True):
        if distributed.world_size() > 1:
            return _sharded(encode, list(range(len(keys))), batch_size)
        return cache.encode_uncached("text", len(keys), encode, batch_size, progress=False)
    if distributed.world_size() > 1:
        return _sharded_cached(cache, model.fingerprint, "text", keys, encode, batch_size)
    return cache.encode(model.fingerprint, "text", keys, encode, batch_size, progress=False)


def _rank_workers(ds: ImageDataset) -> int:
    """Default loader workers of one torchrun process: the machine's share, less one."""
    if _in_memory(ds):
        return 0
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(MAX_DEFAULT_WORKERS, usable_cpus() // local - 1))


def _encode_block(model, ds: ImageDataset, positions: list[int], *, workers: int,
                  batch_size: int) -> list[torch.Tensor]:
    """One torchrun process's block of images, streamed: every item must load (the ranks'
    rows are gathered by position), so a failure raises."""
    device = torch.device(getattr(model, "device", "cpu"))
    batches = [positions[s:s + batch_size] for s in range(0, len(positions), batch_size)]
    parts = []
    for batch in stream_batches(ds, batches, workers=workers, pin_memory=device.type == "cuda"):
        if batch.failed:
            raise MmsecError(f"{ds.describe()}: {batch.failed[0][1]}")
        with torch.no_grad():
            parts.append(model.encode_image(batch.pixels(device)).cpu().float())
    return parts


def _sharded(encode, todo: list[int], batch_size: int, block=None) -> torch.Tensor:
    """``encode`` over ``todo`` (positions), each process a contiguous block, gathered in
    order on every process: ``[len(todo), D]`` float32. ``block(positions)``, when given,
    encodes the whole block at once (a list of ``[b, D]`` parts), streamed."""
    lo, hi = distributed.shard_range(len(todo))
    mine = todo[lo:hi]
    if block is not None:
        parts = block(mine) if mine else []
    else:
        parts = [encode(mine[s:s + batch_size]).float()
                 for s in range(0, len(mine), batch_size)]
    dims = [d for d in distributed.all_objects(int(parts[0].shape[1]) if parts else None)
            if d is not None]
    local = torch.cat(parts) if parts else torch.zeros(0, dims[0] if dims else 0)
    return distributed.gather_rows(local)


def _sharded_cached(cache: EmbeddingCache, fingerprint: str, kind: str, keys: list[str],
                    encode, batch_size: int, block=None) -> torch.Tensor:
    """``cache.encode`` split between processes: rank 0 looks the keys up, every process
    encodes its block of the missing ones, rank 0 stores them; all get ``[N, D]``."""
    todo: list[int] = []
    if distributed.is_main():
        cached, found = cache.get(fingerprint, kind, keys)
        first: dict[str, int] = {}
        for i, (k, f) in enumerate(zip(keys, found, strict=True)):
            if not f and k not in first:
                first[k] = i
                todo.append(i)
    todo = distributed.broadcast_object(todo)
    new = _sharded(encode, todo, batch_size, block) if todo else None
    out = None
    if distributed.is_main():
        if new is not None:
            cache.put(fingerprint, kind, [keys[i] for i in todo], new.numpy())
            cache.stats.encoded += len(todo)
            cache.stats.encoded_by_kind[kind] = cache.stats.encoded_by_kind.get(kind, 0) \
                + len(todo)
        dim = new.shape[1] if new is not None else cached.shape[1]
        out = torch.empty(len(keys), dim, dtype=torch.float32)
        if cached is not None:
            out[torch.tensor(found, dtype=torch.bool)] = cached
        if new is not None:
            out[torch.tensor(todo, dtype=torch.long)] = new
        index = {k: i for i, k in reversed(list(enumerate(keys)))}
        for i, k in enumerate(keys):  # repeated keys: the row of their first occurrence
            if index[k] != i:
                out[i] = out[index[k]]
    shape = distributed.broadcast_object(tuple(out.shape) if out is not None else None)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    distributed.broadcast_tensors([out])
    return out


_WARNED: set[str] = set()


def _warn_uncached(model) -> None:
    cls = f"{type(model).__module__}.{type(model).__qualname__}"
    if cls not in _WARNED:
        _WARNED.add(cls)
        log.warning("%s does not declare fingerprint_extra(): its embeddings are not cached",
                    cls)


def caption_table(ds: ImageDataset) -> tuple[list[str], torch.Tensor]:
    """All captions of ``ds`` and the index of each caption's image (retrieval's ground truth)."""
    texts, owner = [], []
    for i in range(len(ds)):
        for c in ds.captions(i):
            texts.append(c)
            owner.append(i)
    return texts, torch.tensor(owner, dtype=torch.long)
