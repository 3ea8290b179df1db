"""torchvision datasets read from a local root with ``download=False`` (cifar10, ...)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import MmsecError
from .base import DEFAULT_TEMPLATES, TensorDataset
from .files import _check_split, _existing_path

__all__ = ["TORCHVISION_SETS", "torchvision_factory"]

def _spaced(name: str) -> str:
    return name.replace("_", " ")


def _mnist_name(name: str) -> str:
    return name.split(" - ")[-1]  # "3 - three" -> "three"


@dataclass(frozen=True)
class _TorchvisionSet:
    """How to open one torchvision dataset: its class and the kwargs that pick a split."""

    cls: str
    splits: dict[str, dict]
    description: str
    templates: Sequence[str] = DEFAULT_TEMPLATES
    classname: Callable[[str], str] = _spaced


_TRAIN_FLAG = {"train": {"train": True}, "test": {"train": False}}
TORCHVISION_SETS: dict[str, _TorchvisionSet] = {
    "cifar10": _TorchvisionSet("CIFAR10", _TRAIN_FLAG, "CIFAR-10 (torchvision files under ROOT)"),
    "cifar100": _TorchvisionSet("CIFAR100", _TRAIN_FLAG,
                                "CIFAR-100 (torchvision files under ROOT)"),
    "stl10": _TorchvisionSet(
        "STL10", {"train": {"split": "train"}, "test": {"split": "test"},
                  "unlabeled": {"split": "unlabeled"}},
        "STL-10, 96 px (torchvision files under ROOT)"),
    "mnist": _TorchvisionSet(
        "MNIST", _TRAIN_FLAG, "MNIST digits (torchvision files under ROOT)",
        templates=('a photo of the number: "{}".', 'a photo of the number "{}".',
                   "a drawing of the digit {}.", "the number {}."),
        classname=_mnist_name),
}


def _torchvision_arrays(ds: object) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``[N, 3, H, W]`` and labels from a torchvision dataset's arrays."""
    data = getattr(ds, "data", None)
    targets = getattr(ds, "targets", None)
    if targets is None:
        targets = getattr(ds, "labels", None)
    if data is None or targets is None:  # unknown layout: go through the items
        items = [ds[i] for i in range(len(ds))]  # type: ignore[arg-type]
        arr = np.stack([np.array(img.convert("RGB"), dtype=np.uint8) for img, _ in items])
        data, targets = arr, [t for _, t in items]
    x = torch.as_tensor(np.asarray(data)).to(torch.uint8)
    if x.ndim == 3:  # grey [N, H, W]
        x = x[:, None].expand(-1, 3, -1, -1)
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):  # [N, H, W, C]
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous(), torch.as_tensor(np.asarray(targets), dtype=torch.long)


def torchvision_factory(name: str) -> Callable[..., TensorDataset]:
    spec = TORCHVISION_SETS[name]

    def factory(
        arg: str | None, *, split: str = "test", seed: int = 0, image_size: int | None = None,
        strict: bool = False, **_: object,
    ) -> TensorDataset:
        _check_split(name, split, tuple(spec.splits))
        root = _existing_path(name, arg, "root directory")
        import torchvision.datasets as tvd

        cls = getattr(tvd, spec.cls, None)
        if cls is None:
            raise MmsecError(f"{name}: this torchvision has no datasets.{spec.cls}")
        try:
            ds = cls(str(root), download=False, **spec.splits[split])
        except (RuntimeError, OSError, ValueError, EOFError) as exc:
            raise MmsecError(
                f"{name}: {spec.cls} {split} files not found under {root} ({exc}); download it "
                f"with torchvision on a machine with network: "
                f"torchvision.datasets.{spec.cls}({str(root)!r}, download=True)"
            ) from exc
        images, labels = _torchvision_arrays(ds)
        classes = list(getattr(ds, "classes", []) or [])
        return TensorDataset(
            images, labels, name=name, split=split,
            classnames=[spec.classname(c) for c in classes] or None, templates=spec.templates,
        )

    factory.__name__ = factory.__qualname__ = f"torchvision_{name}"
    factory.__doc__ = f"``{name}:ROOT``: {spec.description}; loaded with download=False."
    return factory

