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

"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Iterator, Sequence
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


def _encode_shard(fingerprint: str, kind: str, keys: list[str], vectors: np.ndarray) -> bytes:
    """Serialise one shard (safetensors bytes) with its checksum in the metadata."""
    keys_blob = "\n".join(keys).encode("utf-8")
    meta = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "kind": kind,
        "count": str(len(keys)),
        "dim": str(vectors.shape[1]),
        "sha256": _checksum(keys_blob, vectors),
    }
    tensors = {"vectors": vectors, "keys": np.frombuffer(keys_blob, dtype=np.uint8).copy()}
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


@dataclass
class _Namespace:
    """In-memory view of one namespace: every valid shard loaded so far, merged."""

    dim: int | None = None
    loaded: set[str] = field(default_factory=set)
    bad: set[str] = field(default_factory=set)
    rows: dict[str, int] = field(default_factory=dict)
    blocks: list[np.ndarray] = field(default_factory=list)
    _matrix: np.ndarray | None = None
    _matrix_rows: int = 0

    def add(self, keys: list[str], vectors: np.ndarray) -> None:
        """Add the rows whose keys are new (first occurrence wins); vectors are float32 [n, D]."""
        base = len(self.rows)
        kept: list[int] = []
        for i, k in enumerate(keys):
            if k not in self.rows:
                self.rows[k] = base + len(kept)
                kept.append(i)
        if not kept:
            return
        self.blocks.append(vectors if len(kept) == len(keys) else vectors[kept])
        if self.dim is None:
            self.dim = int(vectors.shape[1])

    def matrix(self) -> np.ndarray:
        """All cached rows as one float32 [n_items, D] array (concatenated lazily)."""
        total = len(self.rows)
        if self._matrix is None or self._matrix_rows != total:
            if len(self.blocks) > 1:
                self.blocks = [np.concatenate(self.blocks, axis=0)]
            self._matrix = self.blocks[0] if self.blocks else np.zeros((0, self.dim or 0), "f4")
            self._matrix_rows = total
        return self._matrix


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
                    keys, vectors = self._load_shard(ns_dir / name, fingerprint, kind)
                except FileNotFoundError:
                    vanished = True  # compacted away meanwhile: its rows are in a newer shard
                    continue
                except (ValueError, OSError) as exc:
                    self._mark_bad(view, ns_dir / name, str(exc))
                    continue
                if view.dim is not None and vectors.shape[0] and vectors.shape[1] != view.dim:
                    self._mark_bad(view, ns_dir / name, f"dimension {vectors.shape[1]}")
                    continue
                view.loaded.add(name)
                if vectors.shape[0]:
                    view.add(keys, vectors)
            if not vanished:
                break
        # names compacted away need not be remembered; their rows stay valid in memory
        view.loaded.intersection_update(names)
        return view

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
            view = self._refresh(fingerprint, kind)
            rows = [view.rows.get(k, -1) for k in keys]
            found = [r >= 0 for r in rows]
            n_found = sum(found)
            self.stats.hits += n_found
            self.stats.misses += len(keys) - n_found
            if n_found == 0:
                return None, found
            sel = np.fromiter((r for r in rows if r >= 0), dtype=np.int64, count=n_found)
            return torch.from_numpy(view.matrix()[sel]), found

    def lookup(self, fingerprint: str, kind: str, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Return ``{key: vector [D]}`` for the keys that are cached (missing keys are absent)."""
        vectors, found = self.get(fingerprint, kind, keys)
        hits = [k for k, f in zip(keys, found, strict=True) if f]
        return {k: vectors[i] for i, k in enumerate(hits)} if vectors is not None else {}

    def contains(self, fingerprint: str, kind: str, keys: Sequence[str]) -> list[bool]:
        """Return, per key, whether it is cached (does not touch ``stats``)."""
        keys = _check_keys(keys)
        with self._lock:
            view = self._refresh(fingerprint, kind)
            return [k in view.rows for k in keys]

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
            seen: set[str] = set()
            fresh: list[int] = []
            for i, k in enumerate(keys):
                if k not in view.rows and k not in seen:
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
                view.add(new_keys, new_vecs)  # still found again in this process
                return None
            view.loaded.add(path.name)
            view.add(new_keys, new_vecs)
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

        Returns:
            float32 CPU tensor [N, D], row i for ``keys[i]``.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        keys = _check_keys(keys)
        n = len(keys)
        cached, found = self.get(fingerprint, kind, keys)
        first: dict[str, int] = {}
        todo: list[int] = []
        for i, (k, f) in enumerate(zip(keys, found, strict=True)):
            if not f and k not in first:
                first[k] = i
                todo.append(i)

        dim = cached.shape[1] if cached is not None else None
        out: torch.Tensor | None = None
        if cached is not None:
            out = torch.empty(n, dim, dtype=torch.float32)
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

        bar = progress_bar(total=len(todo), desc=desc or f"encode {kind}", unit="item",
                           enabled=progress)
        try:
            for start in range(0, len(todo), batch_size):
                idx = todo[start : start + batch_size]
                vecs = _as_matrix(encode_fn(list(idx)), len(idx))
                if dim is None:
                    dim = vecs.shape[1]
                    out = torch.empty(n, dim, dtype=torch.float32)
                elif vecs.shape[1] != dim:
                    raise ValueError(
                        f"encode_fn returned dimension {vecs.shape[1]}, expected {dim}"
                    )
                assert out is not None
                out[torch.tensor(idx, dtype=torch.long)] = torch.from_numpy(vecs)
                self.stats.encoded += len(idx)
                self.stats.encoded_by_kind[kind] = self.stats.encoded_by_kind.get(kind, 0) + len(
                    idx
                )
                pending_keys.extend(keys[i] for i in idx)
                pending_vecs.append(vecs)
                pending += len(idx)
                if pending >= flush_every:
                    flush()
                bar.update(len(idx))
        finally:
            bar.close()
            flush()
        assert out is not None
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
        device: torch.device | str | None = None,
    ) -> VectorIndex:
        """Build a ``VectorIndex`` over the cached vectors of ``keys`` (row i = ``keys[i]``).

        Raises ``KeyError`` when some keys are not cached (use ``encode`` first).
        """
        vectors, found = self.get(fingerprint, kind, keys)
        missing = len(found) - sum(found)
        if missing or vectors is None:
            raise KeyError(f"{missing} of {len(found)} keys are not cached in {fingerprint}/{kind}")
        return VectorIndex(vectors, backend=backend, device=device)

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
        merged = _Namespace()
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
            if merged.dim is not None and vectors.shape[0] and vectors.shape[1] != merged.dim:
                bad.append(name)
                continue
            used.append(name)
            if vectors.shape[0]:
                merged.add(keys, vectors)
        if len(used) <= 1 and not bad:
            return 0
        if len(used) > 1:
            keys_sorted = sorted(merged.rows, key=merged.rows.__getitem__)
            new = self._write_shard(fingerprint, kind, keys_sorted, merged.matrix())
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
            # everything: the embeddings and the procedural data memo
            targets = [self.directory, self.root / "procedural"]
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


