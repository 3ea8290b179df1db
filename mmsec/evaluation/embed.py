"""Embeddings of a dataset's images and captions, through the embedding cache.

Clean embeddings are keyed by the model's fingerprint and each item's content hash, so
evaluating the same model on the same data twice encodes nothing the second time. Captions
are keyed by their text, so perturbed captions are cached as well.

Under torchrun the items the cache lacks are encoded in shards, one per process, and
gathered; rank 0 alone reads and writes the cache, and every process gets the same
``[N, D]`` result (so the metrics computed from it are the same everywhere).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from .. import distributed
from ..cache import EmbeddingCache, content_hash
from ..data import ImageDataset, load_images

__all__ = ["caption_table", "encode_images", "encode_texts"]

DEFAULT_BATCH = 256
log = logging.getLogger("mmsec.evaluation")


def encode_images(model, ds: ImageDataset, cache: EmbeddingCache, *,
                  batch_size: int = DEFAULT_BATCH, progress: bool = True) -> torch.Tensor:
    """Normalised image embeddings ``[N, D]`` (CPU float32) of all of ``ds``, through the cache.

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
        return _sharded_cached(cache, model.fingerprint, "image", keys, encode, batch_size)
    return cache.encode(model.fingerprint, "image", keys, encode, batch_size, progress,
                        desc=f"encoding {ds.describe()}")


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


def _sharded(encode, todo: list[int], batch_size: int) -> torch.Tensor:
    """``encode`` over ``todo`` (positions), each process a contiguous block, gathered in
    order on every process: ``[len(todo), D]`` float32."""
    lo, hi = distributed.shard_range(len(todo))
    mine = todo[lo:hi]
    parts = [encode(mine[s:s + batch_size]).float() for s in range(0, len(mine), batch_size)]
    dims = [d for d in distributed.all_objects(int(parts[0].shape[1]) if parts else None)
            if d is not None]
    local = torch.cat(parts) if parts else torch.zeros(0, dims[0] if dims else 0)
    return distributed.gather_rows(local)


def _sharded_cached(cache: EmbeddingCache, fingerprint: str, kind: str, keys: list[str],
                    encode, batch_size: int) -> torch.Tensor:
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
    new = _sharded(encode, todo, batch_size) if todo else None
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
