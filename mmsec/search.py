"""Vector search and k-means shared by every plugin: FAISS when installed, exact torch otherwise.

``VectorIndex``
    Inner-product (cosine) search over L2-normalised float32 vectors. The backend follows the
    device the index is asked to live on: on a CUDA device FAISS on the GPU when FAISS sees one,
    else exact chunked torch matmul + top-k on that device; on the CPU FAISS ``IndexFlatIP``, or
    exact torch search when FAISS is not installed.
``kmeans``
    ``faiss.Kmeans`` (on the GPU when FAISS sees one) or a deterministic torch Lloyd's.

FAISS is imported lazily: this module imports without it.
"""

from __future__ import annotations

import functools
import logging
import math
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .errors import MmsecError, UsageError

__all__ = ["BACKENDS", "VectorIndex", "choose_backend", "faiss_available", "kmeans"]

logger = logging.getLogger(__name__)

BACKENDS = ("faiss-gpu", "faiss-cpu", "torch")
"""Search backends that ``VectorIndex`` accepts."""

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


class VectorIndex:
    """Exact inner-product index over L2-normalised float32 vectors (cosine similarity).

    Args:
        vectors: database [N, D] (any float dtype and device).
        backend: ``"faiss-gpu"``, ``"faiss-cpu"`` or ``"torch"``; None picks with
            ``choose_backend(device)``.
        normalize: L2-normalise the database and every query (default). With False the scores are
            raw inner products.
        device: where the index lives and searches run (the run's ``--device``). Default: the
            vectors' device when it is not the CPU, else CUDA when available, else the CPU.

    Attributes:
        backend: the backend in use. ``device``: where it searches. ``dim``/``ntotal``: D and N.

    Results come back on the device of the queries; indices are int64 rows of ``vectors``.
    """

    def __init__(
        self,
        vectors: torch.Tensor | np.ndarray,
        *,
        backend: str | None = None,
        normalize: bool = True,
        device: torch.device | str | None = None,
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
        self._faiss_index: Any = None
        self._cpu_index: Any = None
        self._db: torch.Tensor | None = None
        if self.backend == "torch":
            self._db = torch.zeros(0, self.dim, dtype=torch.float32, device=self.device)
        else:
            faiss = _import_faiss()
            assert faiss is not None
            self._cpu_index = faiss.IndexFlatIP(self.dim)
            if self.backend == "faiss-gpu":
                self._faiss_index = faiss.index_cpu_to_all_gpus(self._cpu_index)
            else:
                self._faiss_index = self._cpu_index
        self.add(x)

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        return f"VectorIndex(backend={self.backend!r}, ntotal={self.ntotal}, dim={self.dim})"

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
        if self._db is not None:
            x = self._prep(vectors, self.device)
            self._db = x if self._db.shape[0] == 0 else torch.cat([self._db, x], dim=0)
        elif self._cpu_index is self._faiss_index and self.normalize:
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
        if not largest:
            s = -s
        return s.to(out_dev), torch.from_numpy(idx.astype(np.int64)).to(out_dev)

    def _torch_db(self) -> torch.Tensor:
        """Database [N, D] for the exact torch paths (the FAISS backends fall back to them for
        range search on the GPU and for k beyond FAISS-GPU's limit), on the index's device."""
        if self._db is not None:
            return self._db
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
        if self.backend == "faiss-cpu":
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

