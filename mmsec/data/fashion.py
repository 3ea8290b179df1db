"""Fashion-MNIST from its idx files (``fashion-mnist[:DIR]``; Debian: dataset-fashion-mnist)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import MmsecError
from .base import TensorDataset
from .files import _check_split

__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "fashion_mnist", "read_idx"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
]
FASHION_MNIST_TEMPLATES = (
    "a photo of a {}.",
    "a grey photo of a {}.",
    "a picture of a {}.",
    "a {}.",
    "a product photo of a {}.",
    "a black and white photo of a {}.",
)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Parse an idx file (gzipped or not) as used by (Fashion-)MNIST; checks magic and size."""
    import gzip

    path = Path(path)
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise MmsecError(f"cannot read idx file {path}: {exc}") from exc
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise MmsecError(f"not an idx file (bad magic number): {path}")
    dims = data[3]
    if ndim is not None and dims != ndim:
        raise MmsecError(f"idx file {path} has {dims} dimensions, expected {ndim}")
    header = 4 + 4 * dims
    if len(data) < header:
        raise MmsecError(f"idx file {path} is truncated (header)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=dims, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise MmsecError(f"idx file {path} is truncated or corrupt: {len(data) - header} data "
                         f"bytes, expected {expected} for shape {shape}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist(
    arg: str | None = None, *, split: str = "test", seed: int = 0,
    image_size: int | None = None, strict: bool = False, **_: object,
) -> TensorDataset:
    """``fashion-mnist[:DIR]``: Fashion-MNIST from idx files (train 60k / test 10k), in memory.

    28x28 grey images repeated to 3 channels; ``image_size`` is ignored (the model resizes).
    """
    _check_split("fashion-mnist", split, ("train", "test"))
    folder = Path(arg or FASHION_MNIST_DIR).expanduser()
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    found = [_find_idx(folder, s) for s in stems]
    if not folder.is_dir() or None in found:
        missing = ", ".join(f"{s}[.gz]" for s, f in zip(stems, found, strict=True) if f is None)
        where = "directory not found" if not folder.is_dir() else f"missing {missing}"
        raise MmsecError(
            f"fashion-mnist: {where}: {folder} (expected {stems[0]}[.gz] and {stems[1]}[.gz]; "
            "`apt-get install dataset-fashion-mnist` provides them in "
            f"{FASHION_MNIST_DIR})"
        )
    img_path, lbl_path = found
    images = read_idx(img_path, ndim=3)
    labels = read_idx(lbl_path, ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise MmsecError(f"fashion-mnist: expected unsigned byte idx files: {img_path}, {lbl_path}")
    if images.shape[0] != labels.shape[0]:
        raise MmsecError(f"fashion-mnist: {img_path} has {images.shape[0]} images but "
                         f"{lbl_path} has {labels.shape[0]} labels")
    if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise MmsecError(f"fashion-mnist: label {int(labels.max())} out of range in {lbl_path}")
    grey = torch.from_numpy(images.copy())
    return TensorDataset(
        grey[:, None].expand(-1, 3, -1, -1).contiguous(),
        torch.from_numpy(labels.astype(np.int64)),
        name="fashion-mnist", split=split, classnames=list(FASHION_MNIST_CLASSES),
        templates=FASHION_MNIST_TEMPLATES,
    )

