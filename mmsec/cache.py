"""On-disk embedding cache shared by every plugin (vector search lives in ``mmsec.search``).

``EmbeddingCache``
    Stores float32 embeddings on disk, per *namespace* = (model fingerprint, kind), keyed by a
    caller-given content hash. Layout::

        <root>/embeddings/<fingerprint>/<kind>/shard-<pid>-<uuid>.safetensors
        <root>/embeddings/<fingerprint>/<kind>/.lock        (compaction lock)

    The ``embeddings/`` level keeps the namespaces apart from anything else mmsec may keep in
    its cache directory. Every ``put`` appends one new shard with a unique name, written to a
    temporary file in the same folder, fsynced and renamed into place, so concurrent writers
    never touch each other's files and readers never see half a shard. A shard holds two
    tensors, ``vectors`` (float32 [n, D]) and ``keys`` (uint8, the keys joined by newlines),
    and in its metadata the sha256 of both; a shard that fails to parse or whose checksum does
    not match is skipped with a warning, so its items are simply encoded again. Duplicate keys
    across shards are harmless (same content, same model -> same vector). ``compact`` merges a
    namespace's shards into one under an ``fcntl.flock`` lock.

    Lookups read lazily: a shard also holds ``row_sums`` (uint64 [n], a checksum of each
    vector) and, in its metadata, the sha256 of its keys alone. A process reads a shard's
    header and keys once (checking their sha256, the file size and the tensor shapes) and
    then only the vectors a lookup asks for, each checked against its row sum; so fetching
    2,000 vectors from a cache of a million reads ~70 MB of keys, not every vector. A row that
    fails its check drops its shard (with a warning) and its items are encoded again. Shards
    written before row sums existed are read whole and checked with the sha256, as before.

"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs
import torch
from safetensors.numpy import load as _st_load
from safetensors.numpy import save as _st_save

from mmsec.errors import UsageError

from .io import TMP_SUFFIX, fsync_dir, write_atomic
from .progress import progress as progress_bar
from .search import VectorIndex

__all__ = ["CacheStats", "EmbeddingCache", "content_hash", "default_cache_dir"]

logger = logging.getLogger(__name__)

FORMAT = "mmsec-embeddings-v1"
"""Format tag stored in every shard's metadata."""

_SHARD_PREFIX = "shard-"
_SHARD_SUFFIX = ".safetensors"
_LOCK_NAME = ".lock"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,199}$")
_STALE_TMP_SECONDS = 3600.0


# --------------------------------------------------------------------------------------------
# helpers


def default_cache_dir() -> Path:
    """Return the cache root: ``$MMSEC_CACHE_DIR`` when set, else the platform's user cache."""
    env = os.environ.get("MMSEC_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("mmsec"))


def content_hash(obj: torch.Tensor | np.ndarray | bytes | str) -> str:
    """Return a sha256 hex key for a piece of content, to use as an ``EmbeddingCache`` key.

    Tensors and arrays are hashed with their dtype and shape, so ``x`` and ``x.reshape(...)``
    differ. Strings are hashed as UTF-8.
    """
    h = hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().contiguous().numpy()
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        h.update(f"ndarray:{arr.dtype.str}:{arr.shape}:".encode())
        h.update(arr.tobytes())
    elif isinstance(obj, bytes):
        h.update(b"bytes:")
        h.update(obj)
    elif isinstance(obj, str):
        h.update(b"str:")
        h.update(obj.encode("utf-8"))
    else:
        raise TypeError(f"content_hash: cannot hash {type(obj).__name__}")
    return h.hexdigest()


def _check_name(what: str, value: str) -> str:
    """Validate a fingerprint or kind that becomes a path component."""
    if not isinstance(value, str) or not _SAFE_NAME.match(value):
        raise UsageError(
            f"invalid cache {what} {value!r}: use 1-200 characters from [A-Za-z0-9._+=-], "
            "starting with a letter or digit"
        )
    return value


def _check_keys(keys: Sequence[str]) -> list[str]:
    """Validate cache keys (non-empty strings without newlines or NUL); raise ``ValueError``."""
    out = list(keys)
    for key in out:
        if not isinstance(key, str) or not key or "\n" in key or "\0" in key:
            raise ValueError(
                f"invalid cache key {key!r}: use a non-empty string such as a hex hash"
            )
    return out


def _as_matrix(vectors: torch.Tensor | np.ndarray, n: int | None = None) -> np.ndarray:
    """Convert [N, D] vectors to a C-contiguous float32 numpy array on the CPU."""
    if isinstance(vectors, torch.Tensor):
        vectors = vectors.detach().to("cpu", torch.float32).contiguous().numpy()
    arr = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if arr.ndim != 2:
        raise ValueError(f"expected vectors of shape [N, D], got shape {tuple(arr.shape)}")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"expected {n} vectors, got {arr.shape[0]}")
    return arr


def _checksum(keys_blob: bytes, vectors: np.ndarray) -> str:
    """sha256 over the format tag, the shape, the key bytes and the vector bytes."""
    h = hashlib.sha256()
    h.update(f"{FORMAT}:{vectors.shape[0]}:{vectors.shape[1]}:{len(keys_blob)}:".encode())
    h.update(keys_blob)
    h.update(vectors.tobytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=8)
def _row_weights(dim: int) -> np.ndarray:
    """``dim`` odd 64-bit constants (splitmix64 of 1..dim), the weights of :func:`_row_sums`."""
    z = np.arange(1, dim + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))) | np.uint64(1)


def _row_sums(vectors: np.ndarray) -> np.ndarray:
    """A checksum per row of float32 [n, D]: uint64 [n], the bit patterns weighted by odd
    constants and summed modulo 2**64, so a change of any one value always changes it."""
    words = np.ascontiguousarray(vectors, dtype=np.float32).view(np.uint32)
    weights = _row_weights(words.shape[1])
    out = np.empty(words.shape[0], dtype=np.uint64)
    for start in range(0, words.shape[0], 4096):  # bounded temporaries
        block = words[start : start + 4096].astype(np.uint64)
        out[start : start + 4096] = (block * weights).sum(axis=1, dtype=np.uint64)
    return out


def _encode_shard(fingerprint: str, kind: str, keys: list[str], vectors: np.ndarray) -> bytes:
    """Serialise one shard (safetensors bytes) with its checksums in the metadata."""
    keys_blob = "\n".join(keys).encode("utf-8")
    meta = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "kind": kind,
        "count": str(len(keys)),
        "dim": str(vectors.shape[1]),
        "sha256": _checksum(keys_blob, vectors),
        "keys_sha256": hashlib.sha256(keys_blob).hexdigest(),
    }
    tensors = {"vectors": vectors, "keys": np.frombuffer(keys_blob, dtype=np.uint8).copy(),
               "row_sums": _row_sums(vectors)}
    return _st_save(tensors, metadata=meta)


def _read_header(data: bytes) -> dict[str, Any]:
    """Parse a safetensors header (8-byte little-endian length + JSON)."""
    if len(data) < 8:
        raise ValueError("file too short")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("header length exceeds file size")
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header


def _decode_shard(data: bytes, fingerprint: str, kind: str) -> tuple[list[str], np.ndarray]:
    """Parse and verify one shard; raise ``ValueError`` on any inconsistency.

    Returns the keys (length n) and the vectors (float32 [n, D]).
    """
    meta = _read_header(data).get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"unknown format {meta.get('format')!r}")
    if meta.get("fingerprint") != fingerprint or meta.get("kind") != kind:
        raise ValueError("shard belongs to another namespace")
    tensors = _st_load(data)
    vectors, keys_arr = tensors.get("vectors"), tensors.get("keys")
    if vectors is None or keys_arr is None or vectors.dtype != np.float32 or vectors.ndim != 2:
        raise ValueError("missing or malformed tensors")
    keys_blob = keys_arr.tobytes()
    if _checksum(keys_blob, vectors) != meta.get("sha256"):
        raise ValueError("checksum mismatch")
    keys = keys_blob.decode("utf-8").split("\n") if vectors.shape[0] else []
    if len(keys) != vectors.shape[0] or str(len(keys)) != meta.get("count"):
        raise ValueError("key count does not match vector count")
    return keys, np.ascontiguousarray(vectors)


def _new_shard_name() -> str:
    """A shard file name unique across processes and hosts."""
    return f"{_SHARD_PREFIX}{os.getpid()}-{uuid.uuid4().hex}{_SHARD_SUFFIX}"


@contextlib.contextmanager
def _flock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``fcntl.flock`` on ``path``; yields False if non-blocking and busy.

    Without ``fcntl`` (Windows) it yields True without locking.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        flags = fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(f.fileno(), flags)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# embedding cache


@dataclass
class CacheStats:
    """Counters of one ``EmbeddingCache`` object (this process only).

    ``hits``/``misses`` count keys found/not found by lookups, ``encoded`` counts items passed to
    an ``encode_fn`` by ``EmbeddingCache.encode``, ``written`` counts rows written to shards and
    ``corrupt_shards`` counts shards skipped because they failed to parse or verify.
    """

    hits: int = 0
    misses: int = 0
    encoded: int = 0
    written: int = 0
    corrupt_shards: int = 0
    #: ``encoded`` split by kind ("image", "text", ...)
    encoded_by_kind: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        """Set every counter to zero."""
        self.hits = self.misses = self.encoded = self.written = self.corrupt_shards = 0
        self.encoded_by_kind = {}

    def as_dict(self) -> dict[str, int]:
        """Return the counters as a plain dict."""
        return asdict(self)


class _KeyIndex:
    """Key -> row of one shard.

    Keys of one width (content hashes: the usual case) are kept as one uint8 matrix with a
    sorted 64-bit hash per row (no Python object per key); others in a dict.
    """

    def __init__(self, blob: bytes, n: int) -> None:
        self.n, self.width, self.table = n, 0, None
        self.mat = self.sorted = self.order = None
        if n == 0:
            return
        width = (len(blob) + 1) // n - 1
        if width > 0 and (width + 1) * n == len(blob) + 1:
            rows = np.frombuffer(blob + b"\n", dtype=np.uint8).reshape(n, width + 1)
            if bool((rows[:, width] == 10).all()):
                self.width, self.mat = width, np.ascontiguousarray(rows[:, :width])
                hashes = _key_hashes(self.mat)
                self.order = np.argsort(hashes, kind="stable")
                self.sorted = hashes[self.order]
                return
        self.table = {k: i for i, k in enumerate(blob.decode("utf-8").split("\n"))}

    @classmethod
    def of(cls, keys: list[str]) -> _KeyIndex:
        return cls("\n".join(keys).encode("utf-8"), len(keys))

    def find(self, keys: list[bytes]) -> np.ndarray:
        """Row of each key (UTF-8 bytes) in this shard, -1 where absent: int64 [len(keys)]."""
        out = np.full(len(keys), -1, dtype=np.int64)
        if self.table is not None:
            for i, k in enumerate(keys):
                out[i] = self.table.get(k.decode("utf-8"), -1)
            return out
        if self.mat is None:
            return out
        pos = np.array([i for i, k in enumerate(keys) if len(k) == self.width], dtype=np.int64)
        if not len(pos):
            return out
        query = np.frombuffer(b"".join(keys[i] for i in pos), dtype=np.uint8)
        query = query.reshape(len(pos), self.width)
        hashes = _key_hashes(query)
        at = np.minimum(np.searchsorted(self.sorted, hashes), self.n - 1)
        same = self.sorted[at] == hashes
        rows = self.order[at]
        equal = same & (self.mat[rows] == query).all(axis=1)
        out[pos[equal]] = rows[equal]
        for j in np.nonzero(same & ~equal)[0]:  # a hash collision: the next equal hashes
            k = int(at[j]) + 1
            while k < self.n and self.sorted[k] == hashes[j]:
                row = int(self.order[k])
                if np.array_equal(self.mat[row], query[j]):
                    out[pos[j]] = row
                    break
                k += 1
        return out


def _key_hashes(mat: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row of uint8 [n, L] (FNV-style over 8-byte words): uint64 [n]."""
    n, width = mat.shape
    words = -(-width // 8)
    if width != words * 8:
        padded = np.zeros((n, words * 8), dtype=np.uint8)
        padded[:, :width] = mat
        mat = padded
    cols = np.ascontiguousarray(mat).view(np.uint64)
    h = np.full(n, 0xCBF29CE484222325, dtype=np.uint64)
    for j in range(words):
        h = (h ^ cols[:, j]) * np.uint64(0x100000001B3)
        h ^= h >> np.uint64(29)
    return h


class _Shard:
    """One shard of a namespace view: its key index, and its vectors in memory (written by
    this process, a shard of the old format, or one read whole) or read row by row from its
    open file, each row checked against its row sum."""

    def __init__(self, name: str | None, index: _KeyIndex, dim: int, *,
                 vectors: np.ndarray | None = None, file: Any = None, offset: int = 0,
                 sums: np.ndarray | None = None) -> None:
        self.name, self.index, self.dim = name, index, dim
        self.vectors, self.file, self.offset, self.sums = vectors, file, offset, sums

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """The vectors of rows ``idx`` (int64 [m]): float32 [m, D]. Raises ``ValueError``
        when a row fails its check (the file was damaged after it was opened)."""
        if self.vectors is not None:
            return self.vectors[idx]
        uniq = np.unique(idx)
        if len(uniq) * 8 > self.index.n:  # most of the shard: one read, kept in memory
            block = self._read(0, self.index.n)
            if not np.array_equal(_row_sums(block), self.sums):
                raise ValueError("row checksum mismatch")
            self.vectors = block
            self.close()
            return block[idx]
        got = np.empty((len(uniq), self.dim), dtype=np.float32)
        for j, row in enumerate(uniq):
            got[j] = self._read(int(row), 1)[0]
        if not np.array_equal(_row_sums(got), self.sums[uniq]):
            raise ValueError("row checksum mismatch")
        return got[np.searchsorted(uniq, idx)]

    def _read(self, start: int, count: int) -> np.ndarray:
        size = count * self.dim * 4
        self.file.seek(self.offset + start * self.dim * 4)
        data = self.file.read(size)
        if len(data) != size:
            raise ValueError("shard is shorter than its header says")
        return np.frombuffer(bytearray(data), dtype=np.float32).reshape(count, self.dim)

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None


@dataclass
class _Namespace:
    """In-memory view of one namespace: the valid shards read so far (first one wins)."""

    dim: int | None = None
    loaded: set[str] = field(default_factory=set)
    bad: set[str] = field(default_factory=set)
    shards: list[_Shard] = field(default_factory=list)

    def add(self, shard: _Shard) -> None:
        self.shards.append(shard)
        if self.dim is None and shard.index.n:
            self.dim = shard.dim

    def drop(self, shard: _Shard) -> None:
        self.shards.remove(shard)
        shard.close()

    def find(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(shard position, row) of each key: int64 [N] twice; shard -1 where not cached."""
        which = np.full(len(keys), -1, dtype=np.int64)
        rows = np.full(len(keys), -1, dtype=np.int64)
        todo = np.arange(len(keys))
        encoded = [k.encode("utf-8") for k in keys]
        for s, shard in enumerate(self.shards):
            if not len(todo):
                break
            got = shard.index.find([encoded[i] for i in todo])
            hit = got >= 0
            which[todo[hit]] = s
            rows[todo[hit]] = got[hit]
            todo = todo[~hit]
        return which, rows


def _open_shard(path: Path, name: str, fingerprint: str, kind: str) -> _Shard:
    """Open one shard for lookups: header, keys and row sums read and checked; vectors left
    on disk. A shard without row sums is read whole and checked with its sha256. Raises
    ``FileNotFoundError``, or ``ValueError`` for anything inconsistent."""
    f = open(path, "rb")  # noqa: SIM115 (kept open by the _Shard)
    try:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("file too short")
        (n_header,) = struct.unpack("<Q", head)
        size = os.fstat(f.fileno()).st_size
        if n_header > size - 8:
            raise ValueError("header length exceeds file size")
        header = json.loads(f.read(n_header).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        meta = header.get("__metadata__") or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"unknown format {meta.get('format')!r}")
        if meta.get("fingerprint") != fingerprint or meta.get("kind") != kind:
            raise ValueError("shard belongs to another namespace")
        if "keys_sha256" not in meta or "row_sums" not in header:  # an older shard
            f.seek(0)
            keys, vectors = _decode_shard(f.read(), fingerprint, kind)
            f.close()
            return _Shard(name, _KeyIndex.of(keys), int(vectors.shape[1]), vectors=vectors)
        n, dim = int(meta["count"]), int(meta["dim"])
        spec = {"vectors": ("F32", [n, dim]), "row_sums": ("U64", [n]), "keys": ("U8", None)}
        ends = [0]
        for tensor, (dtype, shape) in spec.items():
            entry = header.get(tensor)
            if not isinstance(entry, dict) or entry.get("dtype") != dtype or (
                    shape is not None and entry.get("shape") != shape):
                raise ValueError(f"malformed tensor {tensor!r}")
            ends.append(int(entry["data_offsets"][1]))
        base = 8 + n_header
        if size != base + max(ends):
            raise ValueError("file size does not match its header")

        def read(tensor: str) -> bytes:
            begin, stop = (int(x) for x in header[tensor]["data_offsets"])
            f.seek(base + begin)
            return f.read(stop - begin)

        blob = read("keys")
        if hashlib.sha256(blob).hexdigest() != meta["keys_sha256"]:
            raise ValueError("keys checksum mismatch")
        index = _KeyIndex(blob, n)
        if index.n and (index.table is not None and len(index.table) != n):
            raise ValueError("key count does not match vector count")
        sums = np.frombuffer(read("row_sums"), dtype="<u8").astype(np.uint64)
        offset = base + int(header["vectors"]["data_offsets"][0])
        return _Shard(name, index, dim, file=f, offset=offset, sums=sums)
    except BaseException:
        f.close()
        raise


class EmbeddingCache:
    """On-disk, process-safe cache of embeddings, keyed by (fingerprint, kind, content key).

    Args:
        root: cache root; default ``default_cache_dir()``. Embeddings live in
            ``root/embeddings/<fingerprint>/<kind>/``.
        max_shards: after a ``put`` leaves more shard files than this in a namespace, the
            namespace is compacted (when no other process holds its lock); 0 disables.

    Typical use, with ``keys[i]`` the content hash of item i::

        vecs = cache.encode(model.fingerprint, "image", keys,
                            lambda idx: model.encode_image(images[idx]))   # [N, D]

    The object keeps an in-memory view per namespace and only reads shards it has not read
    yet, so repeated lookups in one process are cheap; it is safe to share between threads.
    """

    def __init__(self, root: Path | str | None = None, *, max_shards: int = 64) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"cache folder {self.root} is a file, not a folder "
                             "(set MMSEC_CACHE_DIR to a folder)")
        self.max_shards = max_shards
        self.stats = CacheStats()
        self._write_failed = False
        self._views: dict[tuple[str, str], _Namespace] = {}
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"EmbeddingCache(root={str(self.root)!r})"

    # ---- layout

    @property
    def directory(self) -> Path:
        """Folder that holds the namespaces: ``root/embeddings``."""
        return self.root / "embeddings"

    def namespace_dir(self, fingerprint: str, kind: str) -> Path:
        """Folder of one namespace: ``root/embeddings/<fingerprint>/<kind>``."""
        return self.directory / _check_name("fingerprint", fingerprint) / _check_name("kind", kind)

    @staticmethod
    def _shard_names(ns_dir: Path) -> list[str]:
        """Names of the complete shard files in a namespace folder (sorted)."""
        try:
            with os.scandir(ns_dir) as it:
                return sorted(
                    e.name
                    for e in it
                    if e.name.startswith(_SHARD_PREFIX) and e.name.endswith(_SHARD_SUFFIX)
                )
        except (FileNotFoundError, NotADirectoryError):
            return []

    # ---- reading

    def _load_shard(self, path: Path, fingerprint: str, kind: str) -> tuple[list[str], np.ndarray]:
        """Read and verify one shard; raises ``FileNotFoundError`` or ``ValueError``."""
        data = path.read_bytes()
        try:
            return _decode_shard(data, fingerprint, kind)
        except Exception as exc:
            raise ValueError(str(exc) or type(exc).__name__) from exc

    def _refresh(self, fingerprint: str, kind: str) -> _Namespace:
        """Bring the in-memory view of a namespace up to date with the shards on disk."""
        key = (fingerprint, kind)
        ns_dir = self.namespace_dir(fingerprint, kind)
        view = self._views.get(key)
        if view is not None and not ns_dir.is_dir():
            view = None  # cleared on disk (possibly by another process)
        if view is None:
            view = self._views[key] = _Namespace()
        for _attempt in range(3):
            names = self._shard_names(ns_dir)
            vanished = False
            for name in names:
                if name in view.loaded or name in view.bad:
                    continue
                try:
                    shard = _open_shard(ns_dir / name, name, fingerprint, kind)
                except FileNotFoundError:
                    vanished = True  # compacted away meanwhile: its rows are in a newer shard
                    continue
                except Exception as exc:  # any parse failure means "corrupt"
                    self._mark_bad(view, ns_dir / name, str(exc) or type(exc).__name__)
                    continue
                if view.dim is not None and shard.index.n and shard.dim != view.dim:
                    shard.close()
                    self._mark_bad(view, ns_dir / name, f"dimension {shard.dim}")
                    continue
                view.loaded.add(name)
                if shard.index.n:
                    view.add(shard)
                else:
                    shard.close()
            if not vanished:
                break
        # names compacted away need not be remembered; a shard still read from its file is
        # closed (its rows are in the newer shard), so its disk space is freed
        view.loaded.intersection_update(names)
        on_disk = set(names)
        for shard in [sh for sh in view.shards if sh.file is not None]:
            if shard.name not in on_disk:
                view.drop(shard)
        return view

    def _gather(self, fingerprint: str, kind: str, keys: list[str]
                ) -> tuple[np.ndarray | None, np.ndarray]:
        """The vectors of the cached ``keys`` (float32 [n_found, D], in key order) and a
        found mask; a shard found damaged on the way is dropped and the lookup redone."""
        while True:
            view = self._refresh(fingerprint, kind)
            which, rows = view.find(keys)
            found = which >= 0
            if not found.any():
                return None, found
            out = np.empty((int(found.sum()), view.dim or 0), dtype=np.float32)
            which, rows = which[found], rows[found]
            damaged = None
            for s in np.unique(which):
                shard = view.shards[int(s)]
                at = np.nonzero(which == s)[0]
                try:
                    out[at] = shard.rows(rows[at])
                except (ValueError, OSError) as exc:
                    damaged = (shard, str(exc) or type(exc).__name__)
                    break
            if damaged is None:
                return out, found
            shard, reason = damaged
            view.drop(shard)
            self._mark_bad(view, self.namespace_dir(fingerprint, kind) / str(shard.name),
                           reason)

    def _mark_bad(self, view: _Namespace, path: Path, reason: str) -> None:
        """Remember a corrupt shard so it is skipped (and warned about) once per process."""
        view.bad.add(path.name)
        self.stats.corrupt_shards += 1
        logger.warning("ignoring corrupt embedding cache shard %s (%s)", path, reason)

    def get(
        self, fingerprint: str, kind: str, keys: Sequence[str]
    ) -> tuple[torch.Tensor | None, list[bool]]:
        """Look keys up.

        Returns:
            ``(vectors, found)``: ``found[i]`` tells whether ``keys[i]`` is cached; ``vectors``
            is float32 CPU [n_found, D] with the found rows in the order of ``keys``, or None when
            nothing was found.
        """
        keys = _check_keys(keys)
        with self._lock:
            vectors, mask = self._gather(fingerprint, kind, keys)
            found = mask.tolist()
            n_found = int(mask.sum())
            self.stats.hits += n_found
            self.stats.misses += len(keys) - n_found
            return (torch.from_numpy(vectors) if vectors is not None else None), found

    def lookup(self, fingerprint: str, kind: str, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Return ``{key: vector [D]}`` for the keys that are cached (missing keys are absent)."""
        vectors, found = self.get(fingerprint, kind, keys)
        hits = [k for k, f in zip(keys, found, strict=True) if f]
        return {k: vectors[i] for i, k in enumerate(hits)} if vectors is not None else {}

    def contains(self, fingerprint: str, kind: str, keys: Sequence[str]) -> list[bool]:
        """Return, per key, whether it is cached (does not touch ``stats``)."""
        keys = _check_keys(keys)
        with self._lock:
            return (self._refresh(fingerprint, kind).find(keys)[0] >= 0).tolist()

    def dim(self, fingerprint: str, kind: str) -> int | None:
        """Embedding dimension of a namespace, or None when it is empty."""
        with self._lock:
            return self._refresh(fingerprint, kind).dim

    # ---- writing

    def put(
        self,
        fingerprint: str,
        kind: str,
        keys: Sequence[str],
        vectors: torch.Tensor | np.ndarray,
    ) -> Path | None:
        """Store vectors (any float [N, D], stored as float32) under ``keys`` (length N).

        Keys already cached are skipped; the rest go into one new shard, written atomically.
        Returns the shard's path, or None when there was nothing new to write.
        """
        keys = _check_keys(keys)
        arr = _as_matrix(vectors, len(keys))
        if not np.isfinite(arr).all():
            raise ValueError("refusing to cache non-finite embeddings (NaN or inf)")
        with self._lock:
            view = self._refresh(fingerprint, kind)
            if view.dim is not None and keys and arr.shape[1] != view.dim:
                raise ValueError(
                    f"vectors have dimension {arr.shape[1]} but namespace {fingerprint}/{kind} "
                    f"holds dimension {view.dim}"
                )
            cached = view.find(keys)[0] >= 0
            seen: set[str] = set()
            fresh: list[int] = []
            for i, k in enumerate(keys):
                if not cached[i] and k not in seen:
                    seen.add(k)
                    fresh.append(i)
            if not fresh:
                return None
            new_keys = [keys[i] for i in fresh]
            new_vecs = arr if len(fresh) == len(keys) else np.ascontiguousarray(arr[fresh])
            try:
                path = self._write_shard(fingerprint, kind, new_keys, new_vecs)
            except OSError as exc:  # disk full, read-only: the cache only saves time
                if not self._write_failed:
                    logger.warning("could not write to the embedding cache %s (%s); continuing "
                                "without caching", self.root, exc.strerror or exc)
                self._write_failed = True
                # still found again in this process
                view.add(_Shard(None, _KeyIndex.of(new_keys), arr.shape[1], vectors=new_vecs))
                return None
            view.loaded.add(path.name)
            view.add(_Shard(path.name, _KeyIndex.of(new_keys), arr.shape[1], vectors=new_vecs))
            self.stats.written += len(new_keys)
            if self.max_shards and len(self._shard_names(path.parent)) > self.max_shards:
                self.compact(fingerprint, kind, blocking=False)
            return path

    def _write_shard(
        self, fingerprint: str, kind: str, keys: list[str], vectors: np.ndarray
    ) -> Path:
        """Write one new shard; retries once if the folder was removed underneath us."""
        payload = _encode_shard(fingerprint, kind, keys, vectors)
        ns_dir = self.namespace_dir(fingerprint, kind)
        for attempt in range(2):
            ns_dir.mkdir(parents=True, exist_ok=True)
            try:
                return write_atomic(ns_dir / _new_shard_name(), payload)
            except FileNotFoundError:
                if attempt:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def encode(
        self,
        fingerprint: str,
        kind: str,
        keys: Sequence[str],
        encode_fn: Callable[[list[int]], torch.Tensor | np.ndarray],
        batch_size: int = 256,
        progress: bool = True,
        *,
        desc: str | None = None,
        flush_every: int = 16384,
        flush_seconds: float | None = None,
        stream: Callable[[list[list[int]]], Iterable[tuple[int, list[int], Any]]] | None = None,
        collect: bool = True,
    ) -> torch.Tensor:
        """Return the embeddings of all ``keys``, encoding only the ones not cached yet.

        Args:
            keys: content keys, length N (repeats are encoded once).
            encode_fn: called as ``encode_fn(indices)`` with up to ``batch_size`` positions into
                ``keys`` that are missing; must return [len(indices), D] (any device/float dtype).
            batch_size: items per ``encode_fn`` call.
            progress: show a tqdm bar over the items to encode.
            desc: label of the progress bar.
            flush_every: write a shard every this many new items (and at the end, also when
                ``encode_fn`` raises), so an interrupted run keeps its progress.
            flush_seconds: also write one when this many seconds have passed since the last
                (None: by count only); a killed run loses at most that much work.
            stream: instead of calling ``encode_fn`` batch by batch, hand it the planned
                batches (lists of missing positions, in order) and take what it yields:
                ``(done, positions, vectors)`` with ``positions`` the ones of a batch it
                encoded (a subset, when it had to skip items) and ``done`` how many planned
                items that step covers. It may load the next batches while one is encoded
                (a DataLoader). Items it never yields are neither cached nor counted, and
                their rows (and those of repeats of their keys) are NaN.
            collect: False to only fill the cache: cached vectors are not read (only their
                keys are looked up) and nothing is kept in memory, so a resumed encode of
                10^6 items neither reads nor holds [N, D] floats.

        Returns:
            float32 CPU tensor [N, D], row i for ``keys[i]`` ([0, D] when not ``collect``).
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        keys = _check_keys(keys)
        n = len(keys)
        if collect:
            cached, found = self.get(fingerprint, kind, keys)
        else:
            cached, found = None, self.contains(fingerprint, kind, keys)
            self.stats.hits += sum(found)
            self.stats.misses += n - sum(found)
        first: dict[str, int] = {}
        todo: list[int] = []
        for i, (k, f) in enumerate(zip(keys, found, strict=True)):
            if not f and k not in first:
                first[k] = i
                todo.append(i)

        dim = cached.shape[1] if cached is not None else None
        out: torch.Tensor | None = None
        # rows of items a stream skips stay NaN
        blank = torch.empty if stream is None else functools.partial(torch.full,
                                                                     fill_value=float("nan"))
        if cached is not None:
            out = blank((n, dim), dtype=torch.float32)
            out[torch.tensor(found, dtype=torch.bool)] = cached
        if not todo:
            return out if out is not None else torch.zeros(0, self.dim(fingerprint, kind) or 0)

        pending_keys: list[str] = []
        pending_vecs: list[np.ndarray] = []
        pending = 0

        def flush() -> None:
            nonlocal pending
            if pending:
                self.put(fingerprint, kind, pending_keys, np.concatenate(pending_vecs, axis=0))
                pending_keys.clear()
                pending_vecs.clear()
                pending = 0

        batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
        if stream is None:
            steps: Iterable[tuple[int, list[int], Any]] = (
                (len(idx), idx, encode_fn(list(idx))) for idx in batches)
        else:
            steps = stream(batches)
        bar = progress_bar(total=len(todo), desc=desc or f"encode {kind}", unit="item",
                           enabled=progress)
        last = time.monotonic()
        try:
            for done, idx, raw in steps:
                if not idx:
                    bar.update(done)
                    continue
                vecs = _as_matrix(raw, len(idx))
                if dim is None:
                    dim = vecs.shape[1]
                    out = blank((n, dim), dtype=torch.float32) if collect else \
                        torch.zeros(0, dim)
                elif vecs.shape[1] != dim:
                    raise ValueError(
                        f"encode_fn returned dimension {vecs.shape[1]}, expected {dim}"
                    )
                assert out is not None
                if collect:
                    out[torch.tensor(idx, dtype=torch.long)] = torch.from_numpy(vecs)
                self.stats.encoded += len(idx)
                self.stats.encoded_by_kind[kind] = self.stats.encoded_by_kind.get(kind, 0) + len(
                    idx
                )
                pending_keys.extend(keys[i] for i in idx)
                pending_vecs.append(vecs)
                pending += len(idx)
                if pending >= flush_every or (flush_seconds is not None
                                              and time.monotonic() - last >= flush_seconds):
                    flush()
                    last = time.monotonic()
                bar.update(done)
        finally:
            bar.close()
            close = getattr(steps, "close", None)
            if close is not None:  # a generator: stop its loader (worker processes) now
                close()
            flush()
        if not collect:
            return torch.zeros(0, dim or 0)
        if out is None:  # the stream skipped every missing item
            out = blank((n, self.dim(fingerprint, kind) or 0), dtype=torch.float32)
        # repeated keys: copy the row of their first occurrence
        for i, k in enumerate(keys):
            j = first.get(k)
            if j is not None and j != i:
                out[i] = out[j]
        return out

    def encode_uncached(
        self, kind: str, n: int, encode_fn: Callable[[list[int]], torch.Tensor | np.ndarray],
        batch_size: int = 256, progress: bool = True, *, desc: str | None = None,
    ) -> torch.Tensor:
        """``encode`` without the cache (for a model whose fingerprint is not a safe key):
        all ``n`` items are encoded, and counted in ``stats``."""
        out = []
        bar = progress_bar(total=n, desc=desc or f"encode {kind}", unit="item", enabled=progress)
        try:
            for start in range(0, n, batch_size):
                idx = list(range(start, min(n, start + batch_size)))
                out.append(torch.from_numpy(_as_matrix(encode_fn(idx), len(idx))))
                bar.update(len(idx))
        finally:
            bar.close()
        self.stats.encoded += n
        self.stats.encoded_by_kind[kind] = self.stats.encoded_by_kind.get(kind, 0) + n
        return torch.cat(out) if out else torch.zeros(0, 0)

    def index(
        self, fingerprint: str, kind: str, keys: Sequence[str], backend: str | None = None,
        device: torch.device | str | None = None, index_kind: str = "auto",
    ) -> VectorIndex:
        """Build a ``VectorIndex`` over the cached vectors of ``keys`` (row i = ``keys[i]``).

        ``index_kind`` is the index's ``kind`` (``auto``: exact up to
        ``mmsec.search.AUTO_EXACT_MAX`` vectors, then approximate; ``exact`` for exact results).

        Raises ``KeyError`` when some keys are not cached (use ``encode`` first).
        """
        vectors, found = self.get(fingerprint, kind, keys)
        missing = len(found) - sum(found)
        if missing or vectors is None:
            raise KeyError(f"{missing} of {len(found)} keys are not cached in {fingerprint}/{kind}")
        return VectorIndex(vectors, backend=backend, device=device, kind=index_kind)

    # ---- maintenance

    def compact(
        self, fingerprint: str | None = None, kind: str | None = None, *, blocking: bool = True
    ) -> int:
        """Merge each namespace's shards into one shard and delete corrupt shards and stale
        temporary files, under the namespace's file lock.

        Args:
            fingerprint, kind: restrict to these namespaces (None = all).
            blocking: wait for the lock; if False, skip namespaces another process is compacting.

        Returns:
            The number of shard files removed.
        """
        removed = 0
        for fp, kd in self._namespaces(fingerprint, kind):
            ns_dir = self.namespace_dir(fp, kd)
            with _flock(ns_dir / _LOCK_NAME, blocking=blocking) as got:
                if not got:
                    continue
                try:
                    removed += self._compact_locked(fp, kd, ns_dir)
                except OSError as exc:
                    logger.warning("could not compact embedding cache %s: %s", ns_dir, exc)
        return removed

    def _compact_locked(self, fingerprint: str, kind: str, ns_dir: Path) -> int:
        """Compact one namespace; the caller holds its lock."""
        self._remove_stale_tmp(ns_dir)
        names = self._shard_names(ns_dir)
        merged_rows: dict[str, int] = {}
        merged_keys: list[str] = []
        blocks: list[np.ndarray] = []
        dim: int | None = None
        used: list[str] = []
        bad: list[str] = []
        for name in names:
            try:
                keys, vectors = self._load_shard(ns_dir / name, fingerprint, kind)
            except FileNotFoundError:
                continue
            except (ValueError, OSError) as exc:
                logger.warning("removing corrupt embedding cache shard %s (%s)", ns_dir / name, exc)
                bad.append(name)
                continue
            if dim is not None and vectors.shape[0] and vectors.shape[1] != dim:
                bad.append(name)
                continue
            used.append(name)
            if vectors.shape[0]:
                dim = int(vectors.shape[1])
                kept = [i for i, k in enumerate(keys) if k not in merged_rows]
                for i in kept:
                    merged_rows[keys[i]] = len(merged_rows)
                    merged_keys.append(keys[i])
                blocks.append(vectors[kept])
        if len(used) <= 1 and not bad:
            return 0
        if len(used) > 1:
            matrix = np.concatenate(blocks) if blocks else np.zeros((0, dim or 0), np.float32)
            new = self._write_shard(fingerprint, kind, merged_keys, matrix)
            with self._lock:
                view = self._views.get((fingerprint, kind))
                if view is not None:
                    view.loaded.add(new.name)
        else:
            used = []  # a single valid shard stays as it is
        for name in used + bad:
            with contextlib.suppress(FileNotFoundError):
                (ns_dir / name).unlink()
        fsync_dir(ns_dir)
        return len(used) + len(bad)

    @staticmethod
    def _remove_stale_tmp(ns_dir: Path) -> None:
        """Delete temporary files left by writers that died more than an hour ago."""
        now = time.time()
        for p in ns_dir.glob(f".*{TMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                    p.unlink()

    def _namespaces(
        self, fingerprint: str | None = None, kind: str | None = None
    ) -> list[tuple[str, str]]:
        """(fingerprint, kind) pairs present on disk, optionally filtered."""
        out: list[tuple[str, str]] = []
        if fingerprint is not None:
            _check_name("fingerprint", fingerprint)
        if kind is not None:
            _check_name("kind", kind)
        if not self.directory.is_dir():
            return out
        for fp_dir in sorted(self.directory.iterdir()):
            if not fp_dir.is_dir() or not _SAFE_NAME.match(fp_dir.name):
                continue
            if fingerprint is not None and fp_dir.name != fingerprint:
                continue
            for kd_dir in sorted(fp_dir.iterdir()):
                if kd_dir.is_dir() and _SAFE_NAME.match(kd_dir.name):
                    if kind is None or kd_dir.name == kind:
                        out.append((fp_dir.name, kd_dir.name))
        return out

    def info(self) -> dict[str, Any]:
        """Summarise the cache for ``mmsec cache info``.

        Reads only shard headers. ``items`` counts stored rows, so a key written by two processes
        at once counts twice until ``compact``.

        Returns:
            ``{"root", "directory", "namespaces": [{"fingerprint", "kind", "shards", "items",
            "dim", "bytes", "corrupt"}], "items", "bytes"}``.
        """
        namespaces: list[dict[str, Any]] = []
        for fp, kd in self._namespaces():
            ns_dir = self.namespace_dir(fp, kd)
            shards = items = nbytes = corrupt = 0
            dim: int | None = None
            for p in ns_dir.iterdir():
                with contextlib.suppress(OSError):
                    nbytes += p.stat().st_size
                if not (p.name.startswith(_SHARD_PREFIX) and p.name.endswith(_SHARD_SUFFIX)):
                    continue
                shards += 1
                try:
                    with open(p, "rb") as f:
                        head = f.read(8)
                        (n,) = struct.unpack("<Q", head)
                        meta = _read_header(head + f.read(min(n, 1 << 20)))["__metadata__"]
                    items += int(meta["count"])
                    dim = int(meta["dim"]) if int(meta["count"]) else dim
                except Exception:
                    corrupt += 1
            namespaces.append(
                {
                    "fingerprint": fp,
                    "kind": kd,
                    "shards": shards,
                    "items": items,
                    "dim": dim,
                    "bytes": nbytes,
                    "corrupt": corrupt,
                }
            )
        return {
            "root": str(self.root),
            "directory": str(self.directory),
            "namespaces": namespaces,
            "items": sum(ns["items"] for ns in namespaces),
            "bytes": sum(ns["bytes"] for ns in namespaces),
        }

    def clear(self, fingerprint: str | None = None, kind: str | None = None) -> int:
        """Delete cached embeddings: everything, one fingerprint, or one (fingerprint, kind).

        Returns:
            The number of bytes freed.
        """
        targets: list[Path]
        if fingerprint is None and kind is None:
            # everything: the embeddings, the procedural data memo and the file-scan memos
            targets = [self.directory, self.root / "procedural", self.root / "scan"]
        else:
            pairs = self._namespaces(fingerprint, kind)
            if kind is None and fingerprint is not None:
                targets = [self.directory / fingerprint]
            else:
                targets = [self.namespace_dir(fp, kd) for fp, kd in pairs]
        freed = 0
        for target in targets:
            if not target.exists():
                continue
            for p in target.rglob("*"):
                with contextlib.suppress(OSError):
                    if p.is_file():
                        freed += p.stat().st_size
            shutil.rmtree(target, ignore_errors=True)
        with self._lock:
            for fp, kd in list(self._views):
                if (fingerprint is None or fp == fingerprint) and (kind is None or kd == kind):
                    del self._views[(fp, kd)]
        return freed


