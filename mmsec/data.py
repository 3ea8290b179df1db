"""Datasets: one small interface every source implements, and a registry of sources.

An item is ``(image, label)``: ``image`` a float tensor ``[3, H, W]`` with pixels
in [0, 1] (never normalised: ClipModel does that), ``label`` an int class
index, or -1 when the source has no labels. Each dataset also gives its class
names and prompt templates (for zero-shot), captions per item (real ones when
the source has them, else made from the templates) and a content key per item
(a hash of the image bytes) that the embedding cache uses.

Sources are registered through the ``register_datasets`` hook; ``-d SPEC`` on
the CLI is ``NAME`` or ``NAME:ARGUMENT`` (e.g. ``imagefolder:/data/pets``); a
bare existing path is routed to the matching file source.

Built-in sources: ``procedural`` (the default), ``imagefolder:PATH``, ``captions:FILE``
(CSV/JSONL image-caption pairs), ``fashion-mnist[:DIR]`` (idx files) and, through
torchvision with ``download=False``, ``cifar10``/``cifar100``/``stl10``/``mnist:ROOT``. File
sources decode every image once when built and leave corrupt ones out (``skipped``; with
``strict=True`` the first one raises).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import procedural
from .errors import MmsecError, UsageError

log = logging.getLogger("mmsec.data")

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
    skipped: int = 0

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


# --------------------------------------------------------------------------- procedural
PROCEDURAL_SIZES = {"train": 20000, "test": 2000, "val": 2000}


def procedural_shapes(
    arg: str | None = None, *, split: str = "test", seed: int = 0, size: int = 32,
    n: int | None = None, **_: object,
) -> TensorDataset:
    """The built-in procedural shapes set (10 classes, captions, deterministic from ``seed``)."""
    if split not in PROCEDURAL_SIZES:
        raise UsageError(f"dataset procedural: unknown split {split!r} (train, test, val)")
    n = n or PROCEDURAL_SIZES[split]
    arr = _procedural_array(seed, split, n, size)
    attrs = [procedural.attributes(seed, split, i) for i in range(n)]
    return TensorDataset(
        torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(),
        torch.tensor([a["label"] for a in attrs]),
        name="procedural", split=split, classnames=list(procedural.SHAPES),
        templates=procedural.TEMPLATES, captions=[procedural.captions(a) for a in attrs],
    )


def _procedural_array(seed: int, split: str, n: int, size: int) -> np.ndarray:
    """Rendered uint8 images ``[n, size, size, 3]``, memoised on disk in the cache dir."""
    from .cache import default_cache_dir
    from .runs import write_atomic

    path = default_cache_dir() / "procedural" / f"v1-s{seed}-{split}-{n}-{size}px.npy"
    if path.exists():
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.shape == (n, size, size, 3) and arr.dtype == np.uint8:
                return arr
        except (OSError, ValueError):
            log.warning("ignoring unreadable procedural cache file %s", path)
    from tqdm.auto import tqdm

    from .runs import progress_enabled

    arr = np.stack([
        procedural.render(seed, split, i, size)[0]
        for i in tqdm(range(n), desc=f"rendering procedural[{split}]", disable=n < 5000 or not progress_enabled(),
                      mininterval=1.0)
    ])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        import io

        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        write_atomic(path, buf.getvalue())
    except OSError as exc:  # a read-only cache only costs time
        log.warning("could not memoise procedural data at %s: %s", path, exc)
    return arr


# --------------------------------------------------------------------------- image files
IMAGE_EXTENSIONS = frozenset({
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
})
_SPLIT_ALIASES = {"test": ("test", "val"), "val": ("val", "test"), "train": ("train",)}
_TRAIN_PERCENT = 80  # hashed split of a flat image folder: 80 % train, 20 % test (and val)


@dataclass(frozen=True)
class _FileInfo:
    """What one scan of an image file found: its byte hash and size, or why it is unusable."""

    sha1: str = ""
    size: tuple[int, int] = (0, 0)
    error: str = ""


# Scan results, per (absolute path, byte size, mtime): building the other split of a folder,
# or the same dataset again, decodes nothing twice in one process.
_SCAN_MEMO: dict[tuple[str, int, int], _FileInfo] = {}


def _scan_file(path: Path) -> _FileInfo:
    """Read and fully decode ``path`` once (``Image.load``, not just ``verify``)."""
    from PIL import Image

    try:
        st = path.stat()
    except OSError as exc:
        return _FileInfo(error=f"cannot read: {exc.strerror or exc}")
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo_key in _SCAN_MEMO:
        return _SCAN_MEMO[memo_key]
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decodes everything: truncated files and bad chunks fail here
            info = _FileInfo(sha1=hashlib.sha1(data).hexdigest(), size=im.size)
    except Exception as exc:  # any decoder failure means "corrupt"
        info = _FileInfo(error=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    _SCAN_MEMO[memo_key] = info
    return info


def _scan_files(paths: Sequence[Path], source: str, strict: bool) -> list[_FileInfo]:
    """Scan ``paths`` (in a thread pool: Pillow decodes outside the GIL); report corrupt ones.

    With ``strict`` the first corrupt file raises; otherwise a warning gives the count and the
    first few paths, and callers leave those items out (counted in ``dataset.skipped``).
    """
    from concurrent.futures import ThreadPoolExecutor

    if len(paths) > 16:
        workers = min(16, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:
            infos = list(pool.map(_scan_file, paths, chunksize=32))
    else:
        infos = [_scan_file(p) for p in paths]
    bad = [(p, info.error) for p, info in zip(paths, infos, strict=True) if info.error]
    if bad and strict:
        path, why = bad[0]
        raise MmsecError(f"{source}: cannot decode image {path}: {why}")
    if bad:
        shown = ", ".join(str(p) for p, _ in bad[:3]) + (", ..." if len(bad) > 3 else "")
        log.warning("%s: skipped %d unreadable image(s): %s", source, len(bad), shown)
    return infos


def _decode_image(data: bytes) -> np.ndarray:
    """Decode image bytes to uint8 RGB ``[H, W, 3]`` (EXIF-rotated; transparency over white)."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im.alpha_composite(rgba)
        return np.array(im.convert("RGB"), dtype=np.uint8)


def _resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 ``[H, W, 3]`` to ``size`` = (W, H), bicubic (Pillow antialiases downscales)."""
    if (arr.shape[1], arr.shape[0]) == size:
        return arr
    from PIL import Image

    return np.array(Image.fromarray(arr).resize(size, Image.Resampling.BICUBIC), dtype=np.uint8)


class FileImageDataset(ImageDataset):
    """Images read lazily from files, with labels and optional real captions.

    Every file is read and fully decoded once when the dataset is built (in a thread pool,
    memoised per path/size/mtime for the process), so corrupt or truncated images are left out
    before ``len()`` is fixed; ``load(i)`` reads and decodes the file again, so memory stays
    small. Images come out at ``image_size`` (square) when given, else at the size of the first
    image so that batches collate. ``key(i)`` is the SHA-1 of the file bytes (mixed with the
    output size when the image is resized, as resizing changes the pixels).
    """

    def __init__(
        self,
        files: Sequence[Path],
        labels: Sequence[int],
        *,
        name: str,
        split: str,
        classnames: list[str] | None,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        captions: Sequence[list[str]] | None = None,
        image_size: int | None = None,
        strict: bool = False,
        source: str | None = None,
    ) -> None:
        source = source or name
        infos = _scan_files(files, source, strict)
        keep = [i for i, info in enumerate(infos) if not info.error]
        self.skipped = len(files) - len(keep)
        if not keep:
            raise MmsecError(
                f"{source}: no usable images ({len(files)} found, {self.skipped} unreadable)"
            )
        self.files = [Path(files[i]) for i in keep]
        self._infos = [infos[i] for i in keep]
        self._labels = torch.tensor([int(labels[i]) for i in keep], dtype=torch.long)
        self._captions = [list(captions[i]) for i in keep] if captions is not None else None
        self.has_captions = captions is not None
        self.name, self.split, self.classnames, self.templates = name, split, classnames, templates
        self.source = source
        if image_size:
            self.size: tuple[int, int] = (int(image_size), int(image_size))
        else:
            self.size = self._infos[0].size
        self._keys: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.files[i]
        try:
            arr = _decode_image(path.read_bytes())
        except Exception as exc:  # the file changed since the scan
            raise MmsecError(f"{self.source}: cannot decode image {path}: {exc}") from exc
        arr = _resize(arr, self.size)
        img = torch.from_numpy(arr).permute(2, 0, 1).float().div_(255)
        return img, int(self._labels[i])

    def labels(self) -> torch.Tensor:
        return self._labels.clone()

    def captions(self, i: int) -> list[str]:
        if self._captions is not None and self._captions[i]:
            return list(self._captions[i])
        label = int(self._labels[i])
        if self.classnames is None or label < 0:
            return []
        return [self.templates[0].format(self.classnames[label])]

    def key(self, i: int) -> str:
        if i not in self._keys:
            info = self._infos[i]
            if info.size == self.size:
                self._keys[i] = info.sha1
            else:
                resized = f"{info.sha1}:{self.size[0]}x{self.size[1]}".encode()
                self._keys[i] = hashlib.sha1(resized).hexdigest()
        return self._keys[i]


def _check_split(source: str, split: str, known: Sequence[str] = ("train", "test", "val")) -> None:
    if split not in known:
        raise UsageError(f"dataset {source}: unknown split {split!r} ({', '.join(known)})")


def _existing_path(source: str, arg: str | None, what: str) -> Path:
    if not arg:
        raise UsageError(f"dataset {source!r} needs an argument: -d {source}:PATH")
    path = Path(arg).expanduser()
    if not path.exists():
        raise MmsecError(f"{source}: {what} not found: {path}")
    return path


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted; hidden files and folders left out)."""
    out = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(
            Path(root, n) for n in sorted(names)
            if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_EXTENSIONS
        )
    return out


def _class_dirs(folder: Path) -> list[str]:
    return sorted(
        p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
    )


def _hash_split(relpath: str) -> str:
    """``"train"`` or ``"test"`` for a file, from a hash of its relative path (stable as files
    are added or removed)."""
    h = int.from_bytes(hashlib.sha1(relpath.encode("utf-8")).digest()[:8], "big")
    return "train" if h % 100 < _TRAIN_PERCENT else "test"


def imagefolder(
    arg: str | None, *, split: str = "test", seed: int = 0, image_size: int | None = None,
    strict: bool = False, **_: object,
) -> FileImageDataset:
    """``imagefolder:PATH``: one sub-folder per class (names sorted; ``_`` -> space in prompts).

    With ``PATH/train`` and ``PATH/test`` (or ``PATH/val``) those are the splits (classes are
    the union over the splits, so labels agree). Otherwise each file goes to train (80 %) or
    test (20 %; ``val`` is the same part) by a hash of its path relative to ``PATH``.
    Images directly in a folder without class sub-folders are unlabelled (label -1).
    """
    source = "imagefolder"
    _check_split(source, split)
    root = _existing_path(source, arg, "directory")
    if not root.is_dir():
        raise MmsecError(f"{source}: not a directory: {root}")
    split_dirs = {s: root / s for s in ("train", "test", "val") if (root / s).is_dir()}
    if "train" in split_dirs and ("test" in split_dirs or "val" in split_dirs):
        folder = next(split_dirs[s] for s in _SPLIT_ALIASES[split] if s in split_dirs)
        classes = sorted({c for d in split_dirs.values() for c in _class_dirs(d)})
        hashed = False
    else:
        folder, classes, hashed = root, _class_dirs(root), True
    files: list[Path] = []
    labels: list[int] = []
    if classes:
        for label, cls in enumerate(classes):
            found = _image_files(folder / cls) if (folder / cls).is_dir() else []
            files += found
            labels += [label] * len(found)
    else:
        files = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS
                 and p.is_file() and not p.name.startswith(".")]
        labels = [-1] * len(files)
    if hashed:
        want = "train" if split == "train" else "test"
        chosen = [i for i, f in enumerate(files)
                  if _hash_split(f.relative_to(root).as_posix()) == want]
        files, labels = [files[i] for i in chosen], [labels[i] for i in chosen]
    if not files:
        raise MmsecError(f"{source}: no image files for split {split!r} in {folder}")
    return FileImageDataset(
        files, labels, name=f"imagefolder:{root.name}", split=split,
        classnames=[c.replace("_", " ") for c in classes] or None,
        image_size=image_size, strict=strict, source=f"{source} {root}",
    )


def _read_caption_rows(path: Path) -> list[dict]:
    """Rows of a captions file as dicts: CSV, JSONL, or a JSON list of objects."""
    import csv
    import json

    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MmsecError(f"captions: {path} is not UTF-8 text: {exc}") from exc
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        fields = [f.strip() for f in reader.fieldnames or []]
        if "image" not in fields:
            raise MmsecError(f"captions: {path} has no 'image' column (columns: {fields})")
        return [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise MmsecError(f"captions: {path}: invalid JSON: {exc}") from exc
        lines = list(enumerate(rows, 1))
    else:
        lines = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    lines.append((n, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise MmsecError(f"captions: {path}:{n}: invalid JSON: {exc.msg}") from exc
    for n, row in lines:
        if not isinstance(row, dict) or "image" not in row:
            raise MmsecError(f"captions: {path}:{n}: expected an object with an 'image' field")
    return [row for _, row in lines]


def _row_captions(row: dict) -> list[str]:
    """``captions`` (a list, or a string of several separated by ``|``) else ``caption``."""
    caps = row.get("captions")
    if caps in (None, "", []):
        caps = row.get("caption")
        caps = [] if caps is None else caps if isinstance(caps, list) else [caps]
    elif isinstance(caps, str):
        caps = caps.split("|")
    elif not isinstance(caps, list):
        caps = [caps]
    return [str(c).strip() for c in caps if str(c).strip()]


def _is_int(v: object) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    try:
        int(str(v).strip())
    except ValueError:
        return False
    return True


def captions_file(
    arg: str | None, *, split: str = "test", seed: int = 0, image_size: int | None = None,
    strict: bool = False, **_: object,
) -> FileImageDataset:
    """``captions:FILE``: image-caption pairs for retrieval, from CSV or JSONL.

    CSV columns: ``image``, ``caption`` (or ``captions``, several separated by ``|``),
    optional ``label`` and ``split``. JSONL: one object a line with ``image``, ``captions``
    (list) or ``caption`` (str), optional ``label`` (int or class name) and ``split``.
    Image paths are relative to the file's folder. String labels become class names (sorted
    over the whole file); integer labels stay as they are. With a ``split`` field only the
    matching rows are used (rows without one belong to every split); else the whole file.
    """
    source = "captions"
    _check_split(source, split)
    path = _existing_path(source, arg, "file")
    if path.is_dir():
        raise MmsecError(f"{source}: expected a CSV or JSONL file, got a directory: {path}")
    rows = _read_caption_rows(path)
    if not rows:
        raise MmsecError(f"{source}: no rows in {path}")
    raw_labels = [row.get("label") for row in rows]
    given = [v for v in raw_labels if v is not None and str(v).strip() != ""]
    classnames: list[str] | None = None
    if given and not all(_is_int(v) for v in given):
        classnames = sorted({str(v).strip() for v in given})
        index = {c: i for i, c in enumerate(classnames)}
        labels = [index[str(v).strip()] if v is not None and str(v).strip() else -1
                  for v in raw_labels]
    else:
        labels = [int(str(v).strip()) if v is not None and str(v).strip() else -1
                  for v in raw_labels]
    splits = [str(row.get("split") or "").strip() for row in rows]
    chosen = list(range(len(rows)))
    if any(splits):
        present = {s for s in splits if s}
        name = next((s for s in _SPLIT_ALIASES[split] if s in present), split)
        chosen = [i for i, s in enumerate(splits) if s in ("", name)]
        if not chosen:
            raise MmsecError(f"{source}: no rows for split {split!r} in {path} "
                             f"(splits there: {', '.join(sorted(present))})")
    folder = path.parent
    files = [folder / str(rows[i]["image"]).strip() for i in chosen]
    return FileImageDataset(
        files, [labels[i] for i in chosen], name=f"captions:{path.name}", split=split,
        classnames=classnames, captions=[_row_captions(rows[i]) for i in chosen],
        image_size=image_size, strict=strict, source=f"{source} {path}",
    )


# --------------------------------------------------------------------------- fashion-mnist
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


# --------------------------------------------------------------------------- torchvision
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


def _torchvision_factory(name: str) -> Callable[..., TensorDataset]:
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


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class DatasetSource:
    """A registered data source: ``factory(arg, split=..., seed=..., **kw) -> ImageDataset``."""

    name: str
    factory: Callable[..., ImageDataset]
    description: str = ""
    needs_arg: bool = False
    plugin: str = "mmsec"


DEFAULT_DATASET = "procedural"


def parse_spec(spec: str | None) -> tuple[str, str | None]:
    """Split ``NAME[:ARG]``; a bare existing path picks its file source."""
    if not spec:
        return DEFAULT_DATASET, None
    if os.path.exists(spec):
        p = Path(spec)
        if p.is_dir():
            return "imagefolder", spec
        if p.suffix.lower() in (".csv", ".jsonl", ".json"):
            return "captions", spec
    name, sep, arg = spec.partition(":")
    return name, (arg if sep else None)


def load_dataset(
    spec: str | None, *, split: str = "test", seed: int = 0,
    sources: dict[str, DatasetSource] | None = None, **kwargs: object,
) -> ImageDataset:
    """Build the dataset named by ``spec`` (see module doc) for ``split``."""
    if sources is None:
        from .plugins import get_registry

        sources = get_registry().datasets
    name, arg = parse_spec(spec)
    if name not in sources:
        raise UsageError(f"unknown dataset {name!r} (known: {', '.join(sorted(sources))})")
    src = sources[name]
    if src.needs_arg and not arg:
        raise UsageError(f"dataset {name!r} needs an argument: -d {name}:PATH")
    try:
        return src.factory(arg, split=split, seed=seed, **kwargs)
    except (UsageError, MmsecError):
        raise
    except FileNotFoundError as exc:
        raise MmsecError(f"dataset {name!r}: file not found: {exc.filename or exc}") from exc
    except OSError as exc:
        raise MmsecError(f"dataset {name!r}: cannot read {arg}: {exc}") from exc


def builtin_sources() -> list[DatasetSource]:
    """Sources that ship with mmsec (registered by mmsec's own default plugin)."""
    sources = [
        DatasetSource("procedural", procedural_shapes,
                      "built-in procedural shapes: 10 classes, captions, 32 px (train 20k/test 2k)"),
        DatasetSource("imagefolder", imagefolder,
                      "imagefolder:PATH - one sub-folder per class; PATH/train+test or hashed 80/20",
                      needs_arg=True),
        DatasetSource("captions", captions_file,
                      "captions:FILE - CSV/JSONL of image, caption(s), optional label and split",
                      needs_arg=True),
        DatasetSource("fashion-mnist", fashion_mnist,
                      f"fashion-mnist[:DIR] - Fashion-MNIST idx files (default {FASHION_MNIST_DIR})"),
    ]
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        sources += [
            DatasetSource(name, _torchvision_factory(name), f"{name}:ROOT - {spec.description}",
                          needs_arg=True)
            for name, spec in TORCHVISION_SETS.items()
        ]
    return sources
