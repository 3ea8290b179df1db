"""Embeddings of a dataset's images and captions, through the embedding cache.

Clean embeddings are keyed by the model's fingerprint and each item's content hash, so
evaluating the same model on the same data twice encodes nothing the second time. Captions
are keyed by their text, so perturbed captions are cached as well.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

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
        return cache.encode_uncached("image", len(keys), encode, batch_size, progress,
                                     desc=f"encoding {ds.describe()}")
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
        return cache.encode_uncached("text", len(keys), encode, batch_size, progress=False)
    return cache.encode(model.fingerprint, "text", keys, encode, batch_size, progress=False)


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
