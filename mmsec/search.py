"""Vector search and k-means shared by every plugin: FAISS when installed, exact torch otherwise.

``VectorIndex``
    Inner-product (cosine) search over L2-normalised float32 vectors. The backend follows the
    device the index is asked to live on: on a CUDA device FAISS on the GPU when FAISS sees one,
    else exact chunked torch matmul + top-k on that device; on the CPU FAISS, or exact torch
    search when FAISS is not installed. The index *kind* (FAISS backends only) is ``exact``
    (``IndexFlatIP``), ``ivf`` (``IndexIVFFlat``), ``hnsw`` (``IndexHNSWFlat``) or ``auto``
    (exact below ``AUTO_EXACT_MAX`` vectors, else ``AUTO_APPROX_KIND``). ``save``/``load`` keep
    an index on disk (FAISS's own format; flat and IVF indexes can be memory-mapped).
``kmeans``
    ``faiss.Kmeans`` (on the GPU when FAISS sees one) or a deterministic torch Lloyd's.

FAISS is imported lazily: this module imports without it.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .errors import MmsecError, UsageError
from .io import atomic_path

__all__ = ["AUTO_APPROX_KIND", "AUTO_EXACT_MAX", "BACKENDS", "KINDS", "VectorIndex",
           "choose_backend", "faiss_available", "kmeans"]

logger = logging.getLogger(__name__)

BACKENDS = ("faiss-gpu", "faiss-cpu", "torch")
"""Search backends that ``VectorIndex`` accepts."""

KINDS = ("exact", "ivf", "hnsw", "auto")
"""Index kinds that ``VectorIndex`` accepts (``auto``: exact below ``AUTO_EXACT_MAX``)."""

AUTO_EXACT_MAX = 100_000
"""``kind="auto"`` stays exact up to this many vectors (see ``VectorIndex``; measured in
``benchmarks/index_kinds.py``)."""

AUTO_APPROX_KIND = "ivf"
"""What ``kind="auto"`` builds above ``AUTO_EXACT_MAX`` (see ``benchmarks/index_kinds.py``)."""

TARGET_RECALL = 0.95
"""recall@10 that the ivf/hnsw search parameter (nprobe / efSearch) is tuned for at build."""

HNSW_M = 32
_NPROBES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
_EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
_CALIB_QUERIES = 256
_IVF_TRAIN_PER_LIST = 50  # training sample per inverted list (FAISS warns below 39)
_ADD_BLOCK = 1 << 16  # rows normalised and added to an ivf/hnsw index at a time

_FAISS_GPU_MAX_K = 2048
_BLOCK_ELEMS = 1 << 25  # similarity block budget for the torch backend (128 MiB of float32)



@functools.lru_cache(maxsize=1)
def _import_faiss() -> ModuleType | None:
    """Import ``faiss`` once; ``None`` when it is not installed or fails to load."""
    try:
        import faiss
    except Exception as exc:  # ImportError, or a broken native library
        logger.debug("faiss not available: %s", exc)
        return None
    return faiss


def faiss_available() -> bool:
    """Return whether the ``faiss`` module imports."""
    return _import_faiss() is not None


def _faiss_num_gpus() -> int:
    """Number of GPUs that FAISS can use (0 for faiss-cpu or without faiss)."""
    faiss = _import_faiss()
    if faiss is None or not hasattr(faiss, "get_num_gpus"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # pragma: no cover - depends on the installed wheel
        return 0


def choose_backend(device: torch.device | str | None = None) -> str:
    """Pick the search backend for ``device`` (None: CUDA when available, else the CPU).

    On a CUDA device: ``"faiss-gpu"`` when FAISS sees a GPU, else ``"torch"`` (exact search on
    the GPU beats FAISS on the CPU). On the CPU: ``"faiss-cpu"``, or ``"torch"`` without FAISS.
    """
    dev = _search_device(device)
    if _import_faiss() is None:
        return "torch"
    if dev.type == "cuda":
        return "faiss-gpu" if _faiss_num_gpus() > 0 else "torch"
    return "faiss-cpu"


def _search_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a torch.device; None means CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --------------------------------------------------------------------------------------------
# vector search


def _resolve_backend(backend: str | None, device: torch.device | str | None = None) -> str:
    """Validate a requested backend, or choose one for ``device`` when None."""
    if backend is None:
        return choose_backend(device)
    if backend not in BACKENDS:
        raise UsageError(f"unknown search backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend.startswith("faiss") and _import_faiss() is None:
        raise MmsecError(
            f"search backend {backend!r} needs faiss: pip install 'mmsec[cpu]' (or 'mmsec[gpu]')"
        )
    if backend == "faiss-gpu" and _faiss_num_gpus() == 0:
        raise MmsecError("search backend 'faiss-gpu' needs faiss-gpu and a GPU that it can see")
    return backend


def _torch_topk(
    db: torch.Tensor, queries: torch.Tensor, k: int, largest: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact chunked top-k of ``queries @ db.T``.

    Args:
        db: [N, D]; queries: [Q, D] on the same device; k <= N.

    Returns:
        sims [Q, k] and int64 idx [Q, k], sorted (descending if ``largest`` else ascending).
    """
    n = db.shape[0]
    q = queries.shape[0]
    db_chunk = max(k, min(n, 1 << 18))
    q_chunk = max(1, min(q, _BLOCK_ELEMS // max(1, min(n, db_chunk))))
    out_s = torch.empty(q, k, dtype=torch.float32, device=db.device)
    out_i = torch.empty(q, k, dtype=torch.long, device=db.device)
    for qs in range(0, q, q_chunk):
        qc = queries[qs : qs + q_chunk]
        best_s: torch.Tensor | None = None
        best_i: torch.Tensor | None = None
        for ds in range(0, n, db_chunk):
            sims = qc @ db[ds : ds + db_chunk].T
            kk = min(k, sims.shape[1])
            s, i = sims.topk(kk, dim=1, largest=largest, sorted=True)
            i = i + ds
            if best_s is None or best_i is None:
                best_s, best_i = s, i
            else:
                cat_s, cat_i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
                s, j = cat_s.topk(min(k, cat_s.shape[1]), dim=1, largest=largest, sorted=True)
                best_s, best_i = s, cat_i.gather(1, j)
        assert best_s is not None and best_i is not None
        out_s[qs : qs + q_chunk] = best_s
        out_i[qs : qs + q_chunk] = best_i
    return out_s, out_i


def _resolve_kind(kind: str, backend: str, n: int, exact_max: int | None) -> str:
    """The index kind to build for ``n`` vectors on ``backend`` (see ``VectorIndex``)."""
    if kind not in KINDS:
        raise UsageError(f"unknown index kind {kind!r}; choose from {', '.join(KINDS)}")
    if backend == "torch":
        if kind in ("ivf", "hnsw"):
            raise MmsecError(
                f"index kind {kind!r} needs a FAISS backend (faiss-cpu or faiss-gpu): the "
                "torch backend searches exactly only; pass kind='exact' or 'auto', or "
                "backend='faiss-cpu' with faiss installed (pip install 'mmsec[cpu]')"
            )
        return "exact"
    if kind == "auto":
        limit = AUTO_EXACT_MAX if exact_max is None else int(exact_max)
        return "exact" if n <= limit or n < 2 else AUTO_APPROX_KIND
    if kind != "exact" and n < 2:
        raise UsageError(f"index kind {kind!r} needs at least 2 vectors to build on, got {n}")
    return kind


def _ivf_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: 4 sqrt(N), at most one per 39 vectors (FAISS's floor
    for training), at least 1."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39))


def _set_param(index: Any, name: str, value: int) -> None:
    if name == "nprobe":
        index.nprobe = int(value)
    else:
        index.hnsw.efSearch = int(value)


def _get_param(index: Any, name: str) -> int:
    return int(index.nprobe if name == "nprobe" else index.hnsw.efSearch)


class VectorIndex:
    """Inner-product index over L2-normalised float32 vectors (cosine similarity).

    Args:
        vectors: database [N, D] (any float dtype and device).
        backend: ``"faiss-gpu"``, ``"faiss-cpu"`` or ``"torch"``; None picks with
            ``choose_backend(device)``.
        normalize: L2-normalise the database and every query (default). With False the scores are
            raw inner products.
        device: where the index lives and searches run (the run's ``--device``). Default: the
            vectors' device when it is not the CPU, else CUDA when available, else the CPU.
        kind: ``"exact"`` (``IndexFlatIP``; results identical to a brute-force search),
            ``"ivf"`` (``IndexIVFFlat``, nlist = 4 sqrt(N), trained on a sample of
            ``50 * nlist`` vectors), ``"hnsw"`` (``IndexHNSWFlat``, M = 32) or ``"auto"``
            (default): exact up to ``exact_max`` vectors, else ``AUTO_APPROX_KIND``. For ivf and
            hnsw the search parameter (nprobe / efSearch) is the smallest that reaches
            ``recall`` recall@10 on 256 database rows used as queries (themselves left out),
            against exact search, at build time. The torch backend is exact only: ``auto``
            is exact there (the chunked matmul path on CUDA without faiss-gpu) and ``ivf`` /
            ``hnsw`` raise ``MmsecError``. On faiss-gpu an ivf index is copied to every GPU;
            an hnsw index (not supported on the GPU by FAISS) searches on the CPU.
        exact_max: the ``auto`` threshold (default ``AUTO_EXACT_MAX``).
        recall: the recall@10 that ivf/hnsw are tuned for (default ``TARGET_RECALL``).
        seed: seed of the training sample and the tuning queries.

    Callers that need exact results (metrics, exact expectations) pass ``kind="exact"``.
    An ivf/hnsw index is built (trained, tuned) on the vectors passed here; ``add`` appends
    to it without retraining.

    Attributes:
        backend: the backend in use. ``mmap``: whether ``load`` mapped it. ``kind``: the kind (``exact``, ``ivf`` or
        ``hnsw``; never ``auto``). ``params``: nlist/nprobe or M/efSearch and the tuned recall
        (empty for exact). ``device``: where it searches. ``dim``/``ntotal``: D and N.

    Results come back on the device of the queries; indices are int64 rows of ``vectors``.
    ``farthest`` is approximate on ivf/hnsw too; ``range_search`` is exact for every kind.
    """

    def __init__(
        self,
        vectors: torch.Tensor | np.ndarray,
        *,
        backend: str | None = None,
        normalize: bool = True,
        device: torch.device | str | None = None,
        kind: str = "auto",
        exact_max: int | None = None,
        recall: float = TARGET_RECALL,
        seed: int = 0,
    ) -> None:
        x = vectors if isinstance(vectors, torch.Tensor) else torch.as_tensor(np.asarray(vectors))
        if x.ndim != 2:
            raise ValueError(f"expected vectors of shape [N, D], got {tuple(x.shape)}")
        if device is None and x.device.type != "cpu":
            device = x.device
        self.device = _search_device(device)
        self.backend = _resolve_backend(backend, self.device)
        self.normalize = normalize
        self.dim = int(x.shape[1])
        self.kind = _resolve_kind(kind, self.backend, int(x.shape[0]), exact_max)
        self.params: dict[str, Any] = {}
        self.mmap = False
        self._faiss_index: Any = None
        self._cpu_index: Any = None
        self._db: torch.Tensor | None = None
        if self.backend == "torch":
            self._db = torch.zeros(0, self.dim, dtype=torch.float32, device=self.device)
        elif self.kind != "exact":
            self._build_approx(x, recall, seed)
            return
        else:
            faiss = _import_faiss()
            assert faiss is not None
            self._cpu_index = faiss.IndexFlatIP(self.dim)
            if self.backend == "faiss-gpu":
                self._faiss_index = faiss.index_cpu_to_all_gpus(self._cpu_index)
            else:
                self._faiss_index = self._cpu_index
        self.add(x)

    def _build_approx(self, vectors: torch.Tensor, recall: float, seed: int) -> None:
        """Build, train and tune the ivf or hnsw FAISS index over ``vectors``.

        Memory: the index plus the training sample and one block of normalised rows at a time
        (the rows are normalised and added block by block, never copied whole)."""
        faiss = _import_faiss()
        assert faiss is not None
        n = int(vectors.shape[0])
        rng = np.random.default_rng(seed)
        if self.kind == "ivf":
            nlist = _ivf_nlist(n)
            index = faiss.index_factory(self.dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
            m = min(n, nlist * _IVF_TRAIN_PER_LIST)
            rows = np.arange(n) if m == n else np.sort(rng.choice(n, m, replace=False))
            index.cp.seed = seed
            index.cp.max_points_per_centroid = max(256, _IVF_TRAIN_PER_LIST + 1)
            index.train(self._block(vectors, torch.from_numpy(rows)))
            self.params = {"nlist": nlist, "train": m}
            values = [v for v in _NPROBES if v < nlist] + [nlist]
        else:
            index = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            self.params = {"M": HNSW_M, "efConstruction": int(index.hnsw.efConstruction)}
            values = list(_EF_SEARCH)
        for start in range(0, n, _ADD_BLOCK):
            index.add(self._block(vectors, slice(start, start + _ADD_BLOCK)))
        self._cpu_index = index
        name, got = self._tune(vectors, values, recall, rng)
        self.params[name] = _get_param(index, name)
        self.params["recall@10"] = round(got, 4)
        if self.backend == "faiss-gpu" and self.kind == "ivf":
            self._faiss_index = faiss.index_cpu_to_all_gpus(index)
        else:
            self._faiss_index = index

    def _block(self, vectors: torch.Tensor, rows: slice | torch.Tensor) -> np.ndarray:
        """``vectors[rows]`` as contiguous float32 on the CPU, normalised when asked."""
        return self._prep(vectors[rows], torch.device("cpu")).numpy()

    def _tune(self, vectors: torch.Tensor, values: list[int], recall: float,
              rng: np.random.Generator) -> tuple[str, float]:
        """Set the smallest nprobe/efSearch in ``values`` reaching ``recall`` (recall@10 of
        database rows as queries, each row's own hit left out); returns (name, recall)."""
        name = "nprobe" if self.kind == "ivf" else "efSearch"
        n = int(vectors.shape[0])
        m = min(_CALIB_QUERIES, n)
        rows = np.sort(rng.choice(n, m, replace=False))
        q = self._block(vectors, torch.from_numpy(rows))
        kk = min(11, n)
        qt = torch.from_numpy(q)
        best_s = best_i = None
        for start in range(0, n, _ADD_BLOCK):  # exact top-kk, block by block
            s, i = _torch_topk(torch.from_numpy(self._block(vectors, slice(start, start
                                                                              + _ADD_BLOCK))),
                               qt, min(kk, n - start), True)
            i = i + start
            if best_s is not None and best_i is not None:
                s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
                s, j = s.topk(kk, dim=1, sorted=True)
                i = i.gather(1, j)
            best_s, best_i = s, i
        assert best_i is not None
        truth_sets = [[int(j) for j in t if j != r][: kk - 1] for t, r in
                      zip(best_i.tolist(), rows.tolist(), strict=True)]
        got = 1.0
        for v in values:
            _set_param(self._cpu_index, name, v)
            if kk <= 1:
                break
            _, idx = self._cpu_index.search(q, kk)
            hits = total = 0
            for found, t, r in zip(idx.tolist(), truth_sets, rows.tolist(), strict=True):
                mine = [j for j in found if j != r and j >= 0][: len(t)]
                hits += len(set(mine) & set(t))
                total += len(t)
            got = hits / max(total, 1)
            if got >= recall:
                break
        else:
            logger.warning("%s index: recall@10 %.3f < %.3f at %s=%d", self.kind, got, recall,
                           name, values[-1])
        return name, got

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        return (f"VectorIndex(backend={self.backend!r}, kind={self.kind!r}, "
                f"ntotal={self.ntotal}, dim={self.dim})")

    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        if self._db is not None:
            return int(self._db.shape[0])
        return int(self._faiss_index.ntotal)

    def _prep(self, x: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
        """Cast [M, D] to float32 on ``device`` and normalise when asked."""
        t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        if t.ndim != 2 or t.shape[1] != self.dim:
            raise ValueError(f"expected shape [M, {self.dim}], got {tuple(t.shape)}")
        t = t.detach().to(device=device, dtype=torch.float32)
        if self.normalize:
            t = torch.nn.functional.normalize(t, dim=1)
        return t.contiguous()

    def add(self, vectors: torch.Tensor | np.ndarray) -> None:
        """Append vectors [M, D]; they get rows ``ntotal .. ntotal+M-1``.

        Memory: the index's own storage plus, on faiss-cpu, nothing more for float32 CPU
        input (the raw rows are added, then normalised in place in FAISS's storage), so a
        build peaks where FAISS's does; other input is first converted to float32.
        """
        if self.mmap:
            raise MmsecError("this index is memory-mapped from a file (VectorIndex.load with "
                             "mmap=True) and read-only: load it with mmap=False to add")
        if self._db is not None:
            x = self._prep(vectors, self.device)
            self._db = x if self._db.shape[0] == 0 else torch.cat([self._db, x], dim=0)
        elif self._cpu_index is self._faiss_index and self.normalize and self.kind == "exact":
            t = vectors if isinstance(vectors, torch.Tensor) else torch.as_tensor(
                np.asarray(vectors))
            if t.ndim != 2 or t.shape[1] != self.dim:
                raise ValueError(f"expected shape [M, {self.dim}], got {tuple(t.shape)}")
            start = int(self._cpu_index.ntotal)
            self._cpu_index.add(t.detach().to("cpu", torch.float32).contiguous().numpy())
            faiss = _import_faiss()
            total = int(self._cpu_index.ntotal)
            stored = faiss.rev_swig_ptr(self._cpu_index.get_xb(), total * self.dim)
            # FAISS's own in-place normalisation, on the new rows of its storage (a view)
            faiss.normalize_L2(stored.reshape(total, self.dim)[start:])
        else:
            x = self._prep(vectors, torch.device("cpu")).numpy()
            self._faiss_index.add(x)
            if self._cpu_index is not self._faiss_index:
                self._cpu_index.add(x)

    def _search(
        self, queries: torch.Tensor | np.ndarray, k: int, largest: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared body of ``knn`` and ``farthest``."""
        out_dev = queries.device if isinstance(queries, torch.Tensor) else torch.device("cpu")
        k = max(0, min(int(k), self.ntotal))
        if self._db is not None or (self.backend == "faiss-gpu" and k > _FAISS_GPU_MAX_K):
            db = self._torch_db()
            q = self._prep(queries, db.device)
            if k == 0:
                empty = torch.zeros(q.shape[0], 0, device=out_dev)
                return empty, empty.long()
            s, i = _torch_topk(db, q, k, largest)
            return s.to(out_dev), i.to(out_dev)
        q = self._prep(queries, torch.device("cpu"))
        if k == 0:
            empty = torch.zeros(q.shape[0], 0, device=out_dev)
            return empty, empty.long()
        qn = q.numpy() if largest else (-q).numpy()
        sims, idx = self._faiss_index.search(qn, k)
        s = torch.from_numpy(np.ascontiguousarray(sims))
        i = torch.from_numpy(idx.astype(np.int64))
        if self.kind != "exact":
            short = (i < 0).any(1).nonzero().flatten()
            if short.numel():
                # the probed lists / visited nodes held fewer than k vectors: exact for those
                es, ei = _torch_topk(self._torch_db().cpu(), q[short], k, largest)
                s[short], i[short] = (es if largest else -es), ei
        if not largest:
            s = -s
        return s.to(out_dev), i.to(out_dev)

    def _torch_db(self) -> torch.Tensor:
        """Database [N, D] for the exact torch paths (the FAISS backends fall back to them for
        range search on the GPU and for k beyond FAISS-GPU's limit), on the index's device."""
        if self._db is not None:
            return self._db
        if self.kind == "ivf":
            _import_faiss().extract_index_ivf(self._cpu_index).make_direct_map()
        db = torch.from_numpy(self._cpu_index.reconstruct_n(0, self._cpu_index.ntotal))
        return db.to(self.device)

    def knn(self, queries: torch.Tensor | np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k most similar database vectors per query.

        Args:
            queries: [Q, D]; k: neighbours per query (clamped to ``ntotal``).

        Returns:
            sims float32 [Q, k] (descending) and idx int64 [Q, k].
        """
        return self._search(queries, k, largest=True)

    def farthest(
        self, queries: torch.Tensor | np.ndarray, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k least similar database vectors per query.

        Returns:
            sims float32 [Q, k] (ascending) and idx int64 [Q, k].
        """
        return self._search(queries, k, largest=False)

    def range_search(
        self, queries: torch.Tensor | np.ndarray, threshold: float
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """All database vectors with similarity >= ``threshold``, per query.

        Args:
            queries: [Q, D]; threshold: minimum similarity (cosine when normalised).

        Returns:
            Q pairs ``(sims [m_q], idx [m_q])``, sorted by descending similarity.
        """
        out_dev = queries.device if isinstance(queries, torch.Tensor) else torch.device("cpu")
        if self.backend == "faiss-cpu" and self.kind == "exact":
            q = self._prep(queries, torch.device("cpu")).numpy()
            radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
            lims, dist, idx = self._cpu_index.range_search(q, radius)  # keeps sims > radius
            results = []
            for j in range(q.shape[0]):
                s = torch.from_numpy(dist[lims[j] : lims[j + 1]].copy())
                i = torch.from_numpy(idx[lims[j] : lims[j + 1]].astype(np.int64))
                keep = s >= threshold
                s, i = s[keep], i[keep]
                order = torch.argsort(s, descending=True, stable=True)
                results.append((s[order].to(out_dev), i[order].to(out_dev)))
            return results
        db = self._torch_db()
        q = self._prep(queries, db.device)
        per_q: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(q.shape[0])]
        n = db.shape[0]
        db_chunk = max(1, min(n, 1 << 18))
        q_chunk = max(1, _BLOCK_ELEMS // db_chunk)
        for qs in range(0, q.shape[0], q_chunk):
            qc = q[qs : qs + q_chunk]
            for ds in range(0, n, db_chunk):
                sims = qc @ db[ds : ds + db_chunk].T
                rows, cols = torch.nonzero(sims >= threshold, as_tuple=True)
                if rows.numel() == 0:
                    continue
                vals = sims[rows, cols]
                rows, cols, vals = rows.cpu(), (cols + ds).cpu(), vals.cpu()
                counts = torch.bincount(rows, minlength=qc.shape[0]).tolist()
                for r, (vs, cs) in enumerate(
                    zip(vals.split(counts), cols.split(counts), strict=True)
                ):
                    if vs.numel():
                        per_q[qs + r].append((vs, cs))
        results = []
        for parts in per_q:
            if parts:
                s = torch.cat([p[0] for p in parts])
                i = torch.cat([p[1] for p in parts])
                order = torch.argsort(s, descending=True, stable=True)
                s, i = s[order], i[order]
            else:
                s, i = torch.zeros(0), torch.zeros(0, dtype=torch.long)
            results.append((s.to(out_dev), i.to(out_dev)))
        return results


    # ---- on disk

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the index to ``path`` in FAISS's own format (``faiss.write_index``), atomically
        (a temporary file beside it, fsynced, then renamed). Returns the path.

        The torch backend's rows are written as an ``IndexFlatIP`` (needs faiss). ``normalize``
        is not stored: pass the same value to ``load``. The tuned nprobe / efSearch are
        (FAISS stores them with the index).
        """
        faiss = _import_faiss()
        if faiss is None:
            raise MmsecError("VectorIndex.save needs faiss: pip install 'mmsec[cpu]'")
        if self._db is not None:
            index = faiss.IndexFlatIP(self.dim)
            if self._db.shape[0]:
                index.add(self._db.detach().cpu().contiguous().numpy())
        else:
            index = self._cpu_index
        with atomic_path(path) as tmp:
            faiss.write_index(index, str(tmp))
        return Path(path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        mmap: bool = True,
        normalize: bool = True,
        backend: str | None = None,
        device: torch.device | str | None = None,
    ) -> VectorIndex:
        """Read an index written by ``save`` (or by ``faiss.write_index``: IndexFlatIP,
        IndexIVFFlat or IndexHNSWFlat with the inner-product metric).

        Args:
            mmap: memory-map the vectors instead of reading them: ``faiss.IO_FLAG_MMAP`` for
                ivf (its inverted lists), ``faiss.IO_FLAG_MMAP_IFC`` for exact and hnsw (the
                flat vector storage; hnsw's graph links are read into memory). The mapped file must stay in place while the index is used (``save`` over it
                is safe: it replaces the file, the mapping keeps the old one). A mapped index
                is read-only: ``add`` raises.
            normalize, backend, device: as for ``VectorIndex`` (the default backend on a CUDA
                device without faiss-gpu is the exact torch path: an exact index only).

        Raises:
            MmsecError: the file is missing, unreadable, corrupt or not an inner-product index
            of a supported type.
        """
        faiss = _import_faiss()
        if faiss is None:
            raise MmsecError("VectorIndex.load needs faiss: pip install 'mmsec[cpu]'")
        p = Path(path)
        if not p.is_file():
            raise MmsecError(f"no vector index at {p}")
        with open(p, "rb") as fh:
            head = fh.read(4)
        kind = {b"IxFI": "exact", b"IwFl": "ivf", b"IHNf": "hnsw"}.get(head)
        if kind is None:
            raise MmsecError(f"{p} is not a vector index written by VectorIndex.save "
                             f"(FAISS IndexFlatIP, IndexIVFFlat or IndexHNSWFlat); "
                             f"header {head!r}")
        use_mmap = bool(mmap)
        flags = 0
        if use_mmap:
            flags = faiss.IO_FLAG_MMAP if kind == "ivf" else faiss.IO_FLAG_MMAP_IFC
        try:
            index = faiss.read_index(str(p), flags)
        except Exception as exc:  # FAISS raises RuntimeError on a short or garbled file
            raise MmsecError(f"corrupt vector index {p}: {str(exc).strip().splitlines()[0]}"
                             ) from exc
        if int(index.metric_type) != int(faiss.METRIC_INNER_PRODUCT):
            raise MmsecError(f"{p}: expected an inner-product index, got metric "
                             f"{int(index.metric_type)}")
        self = cls.__new__(cls)
        self.device = _search_device(device)
        self.backend = _resolve_backend(backend, self.device)
        self.normalize = normalize
        self.dim = int(index.d)
        self.kind = kind
        self.mmap = use_mmap
        self.params = {}
        if kind == "ivf":
            ivf = faiss.extract_index_ivf(index)
            self.params = {"nlist": int(ivf.nlist), "nprobe": int(ivf.nprobe)}
        elif kind == "hnsw":
            self.params = {"M": HNSW_M, "efSearch": int(index.hnsw.efSearch)}
        self._faiss_index = self._cpu_index = index
        self._db = None
        if self.backend == "torch":
            if kind != "exact":
                raise MmsecError(f"{p} holds an {kind} index, which needs a FAISS backend; "
                                 "the torch backend is exact only (pass backend='faiss-cpu')")
            self._db = torch.from_numpy(index.reconstruct_n(0, index.ntotal)).to(self.device)
            self._cpu_index = self._faiss_index = None
        elif self.backend == "faiss-gpu" and kind != "hnsw":
            self._faiss_index = faiss.index_cpu_to_all_gpus(index)
        return self


# --------------------------------------------------------------------------------------------
# k-means


def _torch_kmeans(
    x: torch.Tensor, k: int, niter: int, seed: int, spherical: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding; x float32 [N, D] -> ([k, D], int64 [N])."""
    n = x.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def scores(c: torch.Tensor) -> torch.Tensor:
        """[N, k] cost of assigning each point to each centroid (lower is better)."""
        if spherical:
            return -(x @ c.T)
        return (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)).clamp_min_(0)

    # k-means++ seeding (on squared distances, also for spherical)
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = [first]
    d2 = (x - x[first]).pow(2).sum(1)
    for _ in range(1, k):
        w = d2.double().cpu()
        if float(w.sum()) <= 0:
            # all remaining points coincide with a centroid: take unchosen points in order
            taken = set(chosen)
            nxt = next(i for i in range(n) if i not in taken)
        else:
            nxt = int(torch.multinomial(w / w.sum(), 1, generator=gen))
        chosen.append(nxt)
        d2 = torch.minimum(d2, (x - x[nxt]).pow(2).sum(1))
    c = x[chosen].clone()
    if spherical:
        c = torch.nn.functional.normalize(c, dim=1)

    assign = scores(c).argmin(1)
    for _ in range(niter):
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = (counts == 0).nonzero().flatten().tolist()
        new_c = sums / counts.clamp_min(1).unsqueeze(1)
        if empty:
            # re-seed empty clusters with the points worst served by their centroid
            cost = scores(c).gather(1, assign[:, None]).squeeze(1)
            worst = cost.argsort(descending=True, stable=True)[: len(empty)]
            new_c[empty] = x[worst]
        if spherical:
            new_c = torch.nn.functional.normalize(new_c, dim=1)
        c = new_c
        new_assign = scores(c).argmin(1)
        if torch.equal(new_assign, assign) and not empty:
            break
        assign = new_assign
    return c, assign


def kmeans(
    x: torch.Tensor | np.ndarray,
    k: int,
    niter: int = 20,
    seed: int = 0,
    spherical: bool = False,
    *,
    backend: str | None = None,
    max_points_per_centroid: int | None = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means clustering, deterministic for a given seed (on CUDA the torch backend's sums may
    differ in the last bits between runs).

    The data is used as given (no normalisation). With ``spherical=True`` points are assigned by
    inner product and centroids are L2-normalised after each update (as ``faiss.Kmeans``): pass
    L2-normalised ``x`` for cosine k-means. Works for D=1 and for N as small as k.

    As ``faiss.Kmeans`` does by default, the centroids are trained on a random sample of
    ``k * max_points_per_centroid`` points when N is larger (None: on every point); every
    point is then assigned to its nearest centroid. With faiss this is ``faiss.Kmeans`` with
    its defaults plus one assignment search: the same time and memory as calling it directly.

    Args:
        x: [N, D] points, N >= k.
        k: number of clusters.
        niter: Lloyd iterations.
        seed: random seed (initialisation).
        spherical: see above.
        backend: ``"faiss"`` (``faiss.Kmeans``; on the GPU when FAISS sees one) or ``"torch"``
            (Lloyd's on x's device); None = faiss when installed, else torch.
        max_points_per_centroid: training sample per centroid (see above).

    Returns:
        centroids float32 [k, D] and assign int64 [N] (cluster of each point), on x's device.
    """
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise ValueError(f"expected points of shape [N, D], got {tuple(t.shape)}")
    n = int(t.shape[0])
    if k < 1 or n < k:
        raise ValueError(f"kmeans needs 1 <= k <= N, got k={k}, N={n}")
    out_dev = t.device
    t = t.detach().to(torch.float32)
    if max_points_per_centroid is not None and max_points_per_centroid < 1:
        raise ValueError(f"max_points_per_centroid must be >= 1, got {max_points_per_centroid}")
    cap = max_points_per_centroid if max_points_per_centroid is not None else math.ceil(n / k)
    if backend is None:
        backend = "faiss" if _import_faiss() is not None else "torch"
    if backend in ("faiss", "faiss-cpu", "faiss-gpu"):
        faiss = _import_faiss()
        if faiss is None:
            raise MmsecError("kmeans backend 'faiss' needs faiss: pip install 'mmsec[cpu]'")
        xn = t.cpu().contiguous().numpy()
        use_gpu = backend != "faiss-cpu" and _faiss_num_gpus() > 0
        km = faiss.Kmeans(
            xn.shape[1],
            k,
            niter=niter,
            seed=seed,
            spherical=spherical,
            gpu=use_gpu,
            verbose=False,
            min_points_per_centroid=1,
            max_points_per_centroid=cap,
        )
        km.train(xn)
        _, assign = km.index.search(xn, 1)
        cent = torch.from_numpy(np.ascontiguousarray(km.centroids, dtype=np.float32))
        return cent.to(out_dev), torch.from_numpy(assign[:, 0].astype(np.int64)).to(out_dev)
    if backend != "torch":
        raise UsageError(f"unknown kmeans backend {backend!r}; choose 'faiss' or 'torch'")
    if n <= k * cap:
        return _torch_kmeans(t, k, niter, seed, spherical)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sample = torch.randperm(n, generator=gen)[: k * cap].to(t.device)
    cent, _ = _torch_kmeans(t[sample], k, niter, seed, spherical)
    if spherical:
        return cent, (t @ cent.T).argmax(1)
    d2 = (t.pow(2).sum(1, keepdim=True) - 2 * t @ cent.T + cent.pow(2).sum(1)).clamp_min_(0)
    return cent, d2.argmin(1)

