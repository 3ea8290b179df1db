"""Image files: ``imagefolder:DIR`` and ``captions:FILE`` (CSV/JSONL image-caption pairs).

Every file is read and fully decoded once when a dataset is built (in a thread pool), so
corrupt or truncated images are left out (``skipped``, each one with its reason in
``skipped_items``) before ``len()`` is fixed; with ``strict=True`` the first one raises.

What a scan found is kept on disk too, per data source, under
``<cache dir>/scan/<hash of the source>.jsonl`` (one line per file: resolved path, byte size,
``mtime_ns`` -> SHA-1, pixel size, format, error), so building a dataset of a big folder
again (a run resumed after a kill) stats the files instead of decoding them all. The memo is
written atomically; it is used only when its checksum holds, and only for files whose size
and ``mtime_ns`` are unchanged; a few of its hits are hashed again each time, and one that
differs discards the whole memo (with a warning). Files modified in the last
:data:`MEMO_SETTLE_S` seconds are not written to it: a file rewritten within the clock's
granularity could otherwise keep its size and mtime. ``MMSEC_SCAN_MEMO=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..errors import MmsecError, UsageError
from .base import DEFAULT_TEMPLATES, ImageDataset

log = logging.getLogger("mmsec.data")

__all__ = ["IMAGE_EXTENSIONS", "FileImageDataset", "captions_file", "imagefolder"]

IMAGE_EXTENSIONS = frozenset({
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
})
_SPLIT_ALIASES = {"test": ("test", "val"), "val": ("val", "test"), "train": ("train",)}
_TRAIN_PERCENT = 80  # hashed split of a flat image folder: 80 % train, 20 % test (and val)


#: images with more pixels than this are left out (counted, or refused under --strict)
#: before they are decoded: a 95 KB PNG can hold 10,000 x 10,000 pixels (Pillow's own guard
#: only warns below 2 x its MAX_IMAGE_PIXELS, ~179 M)
MAX_PIXELS = 40_000_000
#: without an explicit image size, images come out at their most common size, scaled to at
#: most this side (a folder of phone photos stays small in a batch)
MAX_DEFAULT_SIDE = 512


class _FileInfo(NamedTuple):
    """What one scan of an image file found: its byte hash and size, or why it is unusable.
    (A named tuple: 10^6 of them, a big folder's memo, build faster than frozen dataclasses.)"""

    sha1: str = ""
    size: tuple[int, int] = (0, 0)
    error: str = ""
    format: str = ""


# Scan results, per (absolute path, byte size, mtime): building the other split of a folder,
# or the same dataset again, decodes nothing twice in one process.
_SCAN_MEMO: dict[tuple[str, int, int], _FileInfo] = {}


def _scan_file(path: Path) -> _FileInfo:
    """Read and fully decode ``path`` once (``Image.load``, not just ``verify``)."""
    from PIL import Image

    try:
        st = path.stat()
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        return _FileInfo(error=f"cannot read: {getattr(exc, 'strerror', None) or exc}")
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo_key in _SCAN_MEMO:
        return _SCAN_MEMO[memo_key]
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            pixels = im.size[0] * im.size[1]
            if pixels > MAX_PIXELS or min(im.size) < 1:
                info = _FileInfo(error=f"image too large to decode: {im.size[0]} x "
                                       f"{im.size[1]} pixels (limit {MAX_PIXELS:,})"
                                 if pixels else "image has no pixels")
            else:
                size, fmt = im.size, im.format or ""
                if fmt == "JPEG":  # every block still decoded, at 1/8 the pixels
                    im.draft(None, (max(1, size[0] // 8), max(1, size[1] // 8)))
                im.load()  # decodes everything: truncated files and bad chunks fail here
                info = _FileInfo(sha1=hashlib.sha1(data).hexdigest(), size=size, format=fmt)
    except Exception as exc:  # any decoder failure means "corrupt"
        info = _FileInfo(error=_reason(exc))
    _SCAN_MEMO[memo_key] = info
    return info


MEMO_FORMAT = "mmsec-scan-memo-v1"
_HEX40 = re.compile(r"[0-9a-f]{40}")
#: files modified less than this many seconds ago are not memoised on disk (see module doc)
MEMO_SETTLE_S = 2.0
#: memo hits hashed again on every use: one that differs discards the memo
MEMO_SPOT_CHECKS = 4


def _memo_path(source: str) -> Path | None:
    """Where the on-disk scan memo of ``source`` lives (None: turned off)."""
    if os.environ.get("MMSEC_SCAN_MEMO", "1").strip() in ("0", "off", "false", "no"):
        return None
    from ..cache import default_cache_dir

    name = hashlib.sha1(source.encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return default_cache_dir() / "scan" / f"{name}.jsonl"


def _memo_load(path: Path | None) -> dict[tuple[str, int, int], _FileInfo]:
    """The on-disk memo at ``path``: {} when there is none or it does not check out (a
    warning then says why; the files are simply scanned again)."""
    import json

    if path is None or not path.is_file():
        return {}
    try:
        data = path.read_bytes()
        head, _, body = data.partition(b"\n")
        header = json.loads(head)
        if not isinstance(header, dict) or header.get("format") != MEMO_FORMAT:
            raise ValueError("not an mmsec scan memo")
        if hashlib.sha256(body).hexdigest() != header.get("sha256"):
            raise ValueError("checksum mismatch")
        # one JSON array (lines hold no raw newline): ~3x faster than a loads() per line
        rows = json.loads(b"[" + body.rstrip(b"\n").replace(b"\n", b",") + b"]")
        out = {}
        for row in rows:
            key, sha1, width, height, fmt, error = _memo_row(row)
            out[key] = _FileInfo(sha1=sha1, size=(width, height), error=error, format=fmt)
        if len(out) != header.get("count"):
            raise ValueError("entry count does not match its header")
        return out
    except (OSError, ValueError, TypeError, RecursionError) as exc:
        log.warning("ignoring the scan memo %s (%s): scanning the files again", path,
                    _reason(exc))
        return {}


def _memo_row(row: object) -> tuple[tuple[str, int, int], str, int, int, str, str]:
    """One memo line, type-checked: ((path, size, mtime_ns), sha1, width, height, format,
    error); ``ValueError`` when it is not one."""
    if not isinstance(row, list) or len(row) != 8:
        raise ValueError("malformed entry")
    path, size, mtime, sha1, width, height, fmt, error = row
    if type(path) is not str or type(size) is not int or type(mtime) is not int \
            or type(width) is not int or type(height) is not int or type(sha1) is not str \
            or type(fmt) is not str or type(error) is not str \
            or not (error or (len(sha1) == 40 and _HEX40.fullmatch(sha1))):
        raise ValueError("malformed entry")
    return (path, size, mtime), sha1, width, height, fmt, error


def _memo_save(path: Path, memo: dict[tuple[str, int, int], _FileInfo]) -> None:
    """Write ``memo`` to ``path`` atomically (header line: format, count, sha256 of the
    rest). A failure to write only costs the next run a scan."""
    import json

    from ..io import write_atomic

    body = "".join(json.dumps([k[0], k[1], k[2], v.sha1, v.size[0], v.size[1], v.format,
                               v.error], ensure_ascii=False) + "\n"
                   for k, v in memo.items()).encode("utf-8", "surrogateescape")
    header = {"format": MEMO_FORMAT, "count": len(memo),
              "sha256": hashlib.sha256(body).hexdigest()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(header).encode() + b"\n" + body)
    except OSError as exc:
        log.warning("could not write the scan memo %s: %s", path, _reason(exc))


def _memo_trusted(memo: dict[tuple[str, int, int], _FileInfo],
                  hits: Sequence[tuple[str, int, int]], path: Path | None) -> bool:
    """Hash a few of the memo's hits again: False (with a warning) when one differs, i.e. the
    memo does not describe these files (copied from elsewhere, or edited)."""
    import random

    good = [k for k in hits if not memo[k].error]
    for key in random.sample(good, min(MEMO_SPOT_CHECKS, len(good))):
        try:
            sha1 = hashlib.sha1(Path(key[0]).read_bytes()).hexdigest()
        except OSError:
            continue  # gone since the stat: the dataset's load() reports it
        if sha1 != memo[key].sha1:
            log.warning("ignoring the scan memo %s: %s does not have the hash it records; "
                        "scanning the files again", path, key[0])
            return False
    return True


def forget_scans(source: str, paths: Sequence[str]) -> None:
    """Drop ``paths`` from the scan memos (this process's, and ``source``'s on disk): files
    that failed to load after their scan are scanned again by the next build."""
    gone = {str(Path(p).resolve()) for p in paths}
    for key in [k for k in _SCAN_MEMO if k[0] in gone]:
        _SCAN_MEMO.pop(key, None)
    memo_path = _memo_path(source)
    memo = _memo_load(memo_path)
    kept = {k: v for k, v in memo.items() if k[0] not in gone}
    if memo_path is not None and len(kept) != len(memo):
        _memo_save(memo_path, kept)


def _memo_key(path: Path, real_dirs: dict[str, str]) -> tuple[str, int, int] | None:
    """(resolved path, byte size, mtime_ns) of ``path``, as :func:`_scan_file` keys it;
    ``real_dirs`` memoises resolved folders (``Path.resolve`` per file was most of the cost
    of a scan served from the memo)."""
    import stat

    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            real = os.path.realpath(path)
            st = os.stat(real)
        else:
            parent, name = os.path.split(os.path.abspath(path))
            if parent not in real_dirs:
                real_dirs[parent] = os.path.realpath(parent)
            real = os.path.join(real_dirs[parent], name)
        return real, st.st_size, st.st_mtime_ns
    except (OSError, ValueError):
        return None


def _reason(exc: BaseException) -> str:
    """``Type: message``, or the type alone (``MemoryError`` has no message)."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _scan_files(paths: Sequence[Path], source: str, strict: bool) -> list[_FileInfo]:
    """Scan ``paths`` (in a thread pool: Pillow decodes outside the GIL); report corrupt ones.

    With ``strict`` the first corrupt file raises; otherwise a warning gives the count and the
    first few paths, and callers leave those items out (counted in ``dataset.skipped``).
    """
    from concurrent.futures import ThreadPoolExecutor

    memo_path = _memo_path(source)
    real_dirs: dict[str, str] = {}
    keys = [_memo_key(Path(p), real_dirs) for p in paths] if memo_path \
        else [None] * len(paths)
    if memo_path is not None and all(k is not None and k in _SCAN_MEMO for k in keys):
        # all seen by this process already (the other split, the kNN bank): no disk memo
        memo_path, memo = None, {k: _SCAN_MEMO[k] for k in keys}
    else:
        memo = _memo_load(memo_path)
    hits = [k for k in keys if k is not None and k in memo]
    if memo_path is not None and hits and not _memo_trusted(memo, hits, memo_path):
        memo, hits = {}, []
    for k in hits:
        _SCAN_MEMO.setdefault(k, memo[k])
    todo = [p for p, k in zip(paths, keys, strict=True) if k is None or k not in memo]
    if len(todo) > 16:
        workers = min(16, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:
            scanned = list(pool.map(_scan_file, todo, chunksize=32))
    else:
        scanned = [_scan_file(p) for p in todo]
    found = iter(scanned)
    infos = [memo[k] if k is not None and k in memo else next(found) for k in keys]
    if memo_path is not None:
        settled = time.time_ns() - int(MEMO_SETTLE_S * 1e9)
        new = {k: info for k, info in zip(keys, infos, strict=True)
               if k is not None and k not in memo and k[2] < settled
               and not info.error.startswith("cannot read")}
        if new:
            current = {k[0]: k for k in keys if k is not None}
            kept = {k: v for k, v in memo.items() if current.get(k[0], k) == k}  # not stale
            _memo_save(memo_path, {**kept, **new})
    bad = [(p, info.error) for p, info in zip(paths, infos, strict=True) if info.error]
    if bad and strict:
        path, why = bad[0]
        raise MmsecError(f"{source}: cannot decode image {path}: {why}")
    if bad:
        shown = ", ".join(str(p) for p, _ in bad[:3]) + (", ..." if len(bad) > 3 else "")
        log.warning("%s: skipped %d unreadable image(s): %s", source, len(bad), shown)
    return infos


def _decode_image(data: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode image bytes to uint8 RGB ``[H, W, 3]`` (EXIF-rotated; transparency over white).

    With ``size`` (W, H), the size the image is resized to next, a JPEG is decoded at the
    smallest of 1/8, 1/4, 1/2 or full scale that is still at least that large (Pillow's
    ``draft``): a 4000 x 3000 photo for a 224-pixel model takes 1/64 of the memory.
    """
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        if size is not None and im.format == "JPEG":
            width, height = size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # turned by 90 degrees below
                width, height = height, width
            im.draft(None, (width, height))
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I", "F") or im.mode.startswith("I;16"):
            return _wide_to_rgb(im)
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im.alpha_composite(rgba)
        return np.array(im.convert("RGB"), dtype=np.uint8)


def _wide_to_rgb(im) -> np.ndarray:
    """16-bit (``I;16*``, ``I``) and float (``F``) single-channel images scaled to uint8 RGB:
    Pillow's ``convert("RGB")`` clips them at 255, which turns a 16-bit photo white."""
    values = np.asarray(im, dtype=np.float64)
    if im.mode == "F":
        top = 1.0 if values.size and float(np.nanmax(values)) <= 1.0 else 255.0
    else:  # 16-bit data (Pillow opens 16-bit grey PNGs as I;16 or I)
        top = 65535.0
    grey = np.clip(np.nan_to_num(values) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def _resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 ``[H, W, 3]`` to ``size`` = (W, H), bicubic (Pillow antialiases downscales)."""
    if (arr.shape[1], arr.shape[0]) == size:
        return arr
    from PIL import Image

    return np.array(Image.fromarray(arr).resize(size, Image.Resampling.BICUBIC), dtype=np.uint8)


def _common_size(sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The most common (W, H), scaled down to :data:`MAX_DEFAULT_SIDE`: one odd file (a 1x1
    icon, a 10,000-pixel scan) sorted first no longer sets the size of every image."""
    from collections import Counter

    (width, height), _ = Counter(sizes).most_common(1)[0]
    scale = min(1.0, MAX_DEFAULT_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


class FileImageDataset(ImageDataset):
    """Images read lazily from files, with labels and optional real captions.

    Every file is read and fully decoded once when the dataset is built (in a thread pool,
    memoised per path/size/mtime for the process), so corrupt or truncated images are left out
    before ``len()`` is fixed; ``load(i)`` reads and decodes the file again, so memory stays
    small. Images come out at ``image_size`` (square) when given, else at the most common size
    (at most ``MAX_DEFAULT_SIDE`` a side) so that batches collate; each is resized on its own. ``key(i)`` is the SHA-1 of the file bytes (mixed with the
    output size when the image is resized, as resizing changes the pixels).
    """

    #: True when every split holds the same items (a captions file without a split column):
    #: whatever is fitted on "train" is then measured on the items it saw
    shared_splits: bool = False

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
        self.skipped_items = [(str(files[i]), info.error) for i, info in enumerate(infos)
                              if info.error]
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
            self.size = _common_size([info.size for info in self._infos])
        self._keys: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.files[i]
        try:
            arr = _decode_image(path.read_bytes(), self.size)
        except Exception as exc:  # the file changed since the scan, or memory ran out
            raise MmsecError(f"{self.source}: cannot decode image {path}: "
                             f"{_reason(exc)}") from exc
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
            else:  # resized pixels; a JPEG's are decoded at a reduced scale first
                draft = ":draft" if info.format == "JPEG" else ""
                resized = f"{info.sha1}:{self.size[0]}x{self.size[1]}{draft}".encode()
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


def _loops_back(link: str, root: str) -> bool:
    """A symlinked folder that points at ``root``, above it or inside it: following it would
    walk files twice (a loop, or the same class twice under another label)."""
    real = os.path.realpath(link)
    return real == root or root.startswith(real.rstrip(os.sep) + os.sep) \
        or real.startswith(root + os.sep)


def _image_files(folder: Path, top: Path | None = None) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted; hidden files and folders left out).

    Symlinked folders are followed when they lead outside ``top`` (default ``folder``), and
    never into a folder already walked."""
    real_root = os.path.realpath(top or folder)
    out = []
    seen: set[tuple[int, int]] = set()  # (device, inode) of every folder walked
    for root, dirs, names in os.walk(folder, followlinks=True):
        try:
            st = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop, or a second link to one folder
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (
            os.path.islink(os.path.join(root, d))
            and _loops_back(os.path.join(root, d), real_root)))
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
    # surrogateescape: a file name that is not UTF-8 hashes as its own bytes
    h = int.from_bytes(hashlib.sha1(relpath.encode("utf-8", "surrogateescape")).digest()[:8],
                       "big")
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
            found = _image_files(folder / cls, root) if (folder / cls).is_dir() else []
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
        try:
            fields = [f.strip() for f in reader.fieldnames or []]
        except csv.Error as exc:
            raise UsageError(f"captions: {path}:{reader.line_num}: bad CSV: {exc}") from None
        if "image" not in fields:
            raise MmsecError(f"captions: {path} has no 'image' column (columns: {fields})")
        rows = []
        for row in _csv_rows(reader, path):
            if None in row:  # more fields than the header: an unquoted comma in a caption?
                raise UsageError(f"captions: {path}:{reader.line_num}: {len(fields)} columns "
                                 f"in the header, more in this row (quote a caption that "
                                 "holds commas)")
            rows.append({(k or "").strip(): v for k, v in row.items()})
        return rows
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise MmsecError(f"captions: {path}: invalid JSON: {exc}") from None
        except RecursionError:
            raise MmsecError(f"captions: {path}: invalid JSON: nested too deeply") from None
        if not isinstance(rows, list):
            raise MmsecError(f"captions: {path}: expected a JSON list of objects")
        lines = list(enumerate(rows, 1))
    else:
        lines = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    lines.append((n, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise MmsecError(f"captions: {path}:{n}: invalid JSON: {exc.msg}") from None
                except RecursionError:
                    raise MmsecError(f"captions: {path}:{n}: invalid JSON: nested too "
                                     "deeply") from None
    for n, row in lines:
        if not isinstance(row, dict) or "image" not in row:
            raise MmsecError(f"captions: {path}:{n}: expected an object with an 'image' field")
    return [row for _, row in lines]


def _csv_rows(reader, path: Path):
    """The reader's rows; a CSV syntax error (a NUL byte, a field over the csv module's
    size limit) is one error naming the line."""
    import csv

    try:
        yield from reader
    except csv.Error as exc:
        raise UsageError(f"captions: {path}:{reader.line_num}: bad CSV: {exc}") from None


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


def _confined(folder: Path, image: object, where: str) -> Path:
    """``folder / image`` for a relative path that stays inside ``folder``: a captions file
    from elsewhere must not make mmsec open ``/etc/...`` or ``../../secret``."""
    text = str(image if image is not None else "").strip()
    relative = Path(text)
    if not text or relative.is_absolute() or ".." in relative.parts or text.startswith("~") \
            or "\x00" in text:
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise MmsecError(f"{where}: image path {shown!r} must be relative to the file's "
                         "folder, without '..'")
    return folder / relative


def captions_file(
    arg: str | None, *, split: str = "test", seed: int = 0, image_size: int | None = None,
    strict: bool = False, **_: object,
) -> FileImageDataset:
    """``captions:FILE``: image-caption pairs for retrieval, from CSV or JSONL.

    CSV columns: ``image``, ``caption`` (or ``captions``, several separated by ``|``),
    optional ``label`` and ``split``. JSONL: one object a line with ``image``, ``captions``
    (list) or ``caption`` (str), optional ``label`` (int or class name) and ``split``.
    Image paths are relative to the file's folder and must stay inside it (absolute paths
    and ``..`` are refused). A CSV row with more fields than the header is refused. String labels become class names (sorted
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
    files = [_confined(folder, rows[i]["image"], f"{source}: {path}") for i in chosen]
    caps = [_row_captions(rows[i]) for i in chosen]
    if not any(caps) and all(labels[i] < 0 for i in chosen):
        raise MmsecError(f"{source}: {path} has neither captions nor labels (every "
                         "'caption' is empty): nothing to measure")
    ds = FileImageDataset(
        files, [labels[i] for i in chosen], name=f"captions:{path.name}", split=split,
        classnames=classnames, captions=caps,
        image_size=image_size, strict=strict, source=f"{source} {path}",
    )
    ds.shared_splits = not any(splits)
    ds.path = path  # the captions file (a data defense reads its other columns)
    return ds

