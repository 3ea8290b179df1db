"""The dataset interface every source implements, and views and batches of datasets.

An item is ``(image, label)``: ``image`` a float tensor ``[3, H, W]`` with pixels in [0, 1]
(never normalised: ClipModel does that), ``label`` an int class index, or -1 when the source
has no labels. Each dataset also gives its class names and prompt templates (for
zero-shot), captions per item (real ones when the source has them, else made from the
templates) and a content key per item (a hash of the image bytes) that the embedding cache
uses.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

__all__ = ["DEFAULT_TEMPLATES", "ImageDataset", "Subset", "TensorDataset", "load_images",
           "subset"]

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a drawing of a {}.",
    "a {}.",
    "an image of a {}.",
)


class ImageDataset(Dataset):
    """Base class of every data source.

    Subclasses implement ``__len__`` and ``load(i)``; they may override
    ``captions`` (real captions), ``key`` (a cheaper content hash) and set
    ``skipped`` (corrupt items left out) and ``has_captions``.
    """

    name: str = "dataset"
    split: str = "test"
    classnames: list[str] | None = None
    templates: Sequence[str] = DEFAULT_TEMPLATES
    has_captions: bool = False
    #: items left out when the dataset was built (corrupt files), and why: ``(item, reason)``
    skipped: int = 0
    skipped_items: Sequence[tuple[str, str]] = ()

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, i: int) -> tuple[torch.Tensor, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.load(i)

    def labels(self) -> torch.Tensor:
        """All labels ``[N]`` (long; -1 where unlabelled)."""
        return torch.tensor([self.load(i)[1] for i in range(len(self))], dtype=torch.long)

    def captions(self, i: int) -> list[str]:
        """Captions of item ``i``; without real captions, the first template with its class."""
        label = self.load(i)[1]
        if self.classnames is None or label < 0:
            return []
        return [self.templates[0].format(self.classnames[label])]

    def key(self, i: int) -> str:
        """Content hash of item ``i`` (changes whenever the pixels change)."""
        img = self.load(i)[0]
        return hashlib.sha1(img.numpy().tobytes()).hexdigest()

    def describe(self) -> str:
        return f"{self.name}[{self.split}]"


class TensorDataset(ImageDataset):
    """Images held in memory as a uint8 tensor ``[N, 3, H, W]`` with integer labels."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        name: str,
        split: str,
        classnames: list[str] | None,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        captions: list[list[str]] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images, self._labels = images, labels.long()
        self.name, self.split, self.classnames, self.templates = name, split, classnames, templates
        self._captions = captions
        self.has_captions = captions is not None
        self._keys: list[str] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def load(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].float().div_(255), int(self._labels[i])

    def labels(self) -> torch.Tensor:
        return self._labels.clone()

    def captions(self, i: int) -> list[str]:
        if self._captions is not None:
            return list(self._captions[i])
        return super().captions(i)

    def key(self, i: int) -> str:
        if self._keys is None:
            self._keys = [hashlib.sha1(im.numpy().tobytes()).hexdigest() for im in self.images]
        return self._keys[i]


class Subset(ImageDataset):
    """A view of ``indices`` of another dataset (keeps its names, captions and keys)."""

    def __init__(self, base: ImageDataset, indices: Sequence[int]) -> None:
        self.base, self.indices = base, list(indices)
        self.name, self.split = base.name, base.split
        self.classnames, self.templates = base.classnames, base.templates
        self.has_captions, self.skipped = base.has_captions, base.skipped
        self.skipped_items = base.skipped_items

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, i: int) -> tuple[torch.Tensor, int]:
        return self.base.load(self.indices[i])

    def labels(self) -> torch.Tensor:
        return self.base.labels()[self.indices]

    def captions(self, i: int) -> list[str]:
        return self.base.captions(self.indices[i])

    def key(self, i: int) -> str:
        return self.base.key(self.indices[i])


def subset(ds: ImageDataset, n: int | None, seed: int = 0) -> ImageDataset:
    """A deterministic random subset of ``n`` items (the whole set when ``n`` is None or >= len)."""
    if n is None or n >= len(ds):
        return ds
    g = torch.Generator().manual_seed(seed)
    return Subset(ds, sorted(torch.randperm(len(ds), generator=g)[:n].tolist()))



def load_images(ds: ImageDataset, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor,
                                                                                  torch.Tensor]:
    """Items ``indices`` of ``ds`` stacked: ``(images [B, 3, H, W] in [0, 1], labels [B])``.

    Fast for in-memory data (one uint8 gather through any chain of subsets); other sources
    load item by item.
    """
    rows = [int(i) for i in indices]
    base, mapped = ds, rows
    while isinstance(base, Subset):
        mapped = [base.indices[i] for i in mapped]
        base = base.base
    if isinstance(base, TensorDataset):
        idx = torch.as_tensor(mapped, dtype=torch.long)
        return base.images[idx].float().div_(255), base._labels[idx].clone()
    items = [ds.load(i) for i in rows]
    if not items:
        return torch.zeros(0, 3, 1, 1), torch.zeros(0, dtype=torch.long)
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
