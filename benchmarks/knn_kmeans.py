"""kNN index build, search and k-means (mmsec.search) against FAISS called directly.

    python benchmarks/knn_kmeans.py [--n 100000] [--dim 512] [--k 10] [--queries 2000]
                                    [--repeat 3]

Everything runs in one process on the same random float32 data on the CPU (faiss-cpu):

* build: ``VectorIndex(x)`` (cosine: normalises without touching ``x``) against
  ``faiss.normalize_L2`` in place on a copy made beforehand + ``IndexFlatIP.add``;
* search: ``VectorIndex.knn(q, 10)`` against ``IndexFlatIP.search`` on normalised queries;
* k-means: ``mmsec.search.kmeans(x, k)`` (centroids and every point's cluster) against
  ``faiss.Kmeans(d, k, niter=20, seed=0).train`` + ``index.search(x, 1)`` (the same outputs),
  and ``train`` alone.

Time is CPU seconds (best of ``--repeat``; steadier than wall time on a shared machine, and
equal to it with one thread); peak memory is the rise of the process's peak RSS over its
RSS before the call (``/proc/self/clear_refs`` resets the peak between calls; Linux). Prints
JSON with each figure, the FAISS figure and their ratio. Use ``OMP_NUM_THREADS=1`` for the
README's single-thread figures; ``--n 1000000`` needs about 8 GB.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from mmsec.search import VectorIndex, kmeans


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(fn, repeat: int, setup=None) -> dict:
    """Best-of-``repeat`` CPU and wall seconds of ``fn()`` and its largest peak RSS rise (MB;
    memory the allocator kept from an earlier call can hide a rise, never add one)."""
    cpus, walls, peaks = [], [], []
    for _ in range(repeat):
        arg = setup() if setup is not None else None
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        rss0 = _status("VmRSS")
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn() if setup is None else fn(arg)
        cpus.append(time.process_time() - c0)
        walls.append(time.perf_counter() - w0)
        peaks.append(_status("VmHWM") - rss0)
        del out, arg
    return {"cpu_s": round(min(cpus), 3), "wall_s": round(min(walls), 3),
            "peak_mb": round(max(peaks) / 2**20, 1)}


def ratio(ours: dict, ref: dict) -> dict:
    """mmsec / FAISS; the peak ratio is None when both rises are under 16 MB (noise)."""
    peak = None
    if max(ours["peak_mb"], ref["peak_mb"]) >= 16:
        peak = round(ours["peak_mb"] / max(ref["peak_mb"], 1.0), 2)
    return {"time": round(ours["cpu_s"] / max(ref["cpu_s"], 1e-9), 2), "peak": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=10, help="k-means clusters")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.dim, generator=g)
    q = torch.randn(args.queries, args.dim, generator=g)
    out: dict = {"benchmark": "knn_kmeans", "n": args.n, "dim": args.dim, "k": args.k,
                 "queries": args.queries, "threads": faiss.omp_get_max_threads()}

    # build
    def faiss_build(xn: np.ndarray):
        faiss.normalize_L2(xn)
        index = faiss.IndexFlatIP(args.dim)
        index.add(xn)
        return index

    ref = measure(faiss_build, args.repeat, setup=lambda: x.numpy().copy())  # normalised in place
    ours = measure(lambda: VectorIndex(x, backend="faiss-cpu"), args.repeat)
    out["build"] = {"mmsec": ours, "faiss": ref, "ratio": ratio(ours, ref)}

    # search
    index = VectorIndex(x, backend="faiss-cpu")
    raw = faiss_build(x.numpy().copy())

    def faiss_search():
        qn = q.numpy().copy()
        faiss.normalize_L2(qn)
        return raw.search(qn, 10)

    ref = measure(faiss_search, args.repeat)
    ours = measure(lambda: index.knn(q, 10), args.repeat)
    same = bool(torch.equal(index.knn(q, 10)[1], torch.from_numpy(faiss_search()[1])))
    out["search"] = {"mmsec": ours, "faiss": ref, "ratio": ratio(ours, ref),
                     "same_neighbours": same}
    index = raw = None  # free them before k-means

    # k-means
    xn = x.numpy()

    def faiss_kmeans(assign: bool):
        km = faiss.Kmeans(args.dim, args.k, niter=20, seed=0)
        km.train(xn)
        return km.index.search(xn, 1) if assign else km.centroids

    ref_train = measure(lambda: faiss_kmeans(False), args.repeat)
    ref = measure(lambda: faiss_kmeans(True), args.repeat)
    ours = measure(lambda: kmeans(x, args.k, niter=20, seed=0), args.repeat)
    cent, assign = kmeans(x, args.k, niter=20, seed=0)
    _, ref_assign = faiss_kmeans(True)
    out["kmeans"] = {"mmsec": ours, "faiss_train_assign": ref, "faiss_train": ref_train,
                     "ratio": ratio(ours, ref), "ratio_to_train": ratio(ours, ref_train),
                     "same_assignment": bool(np.array_equal(assign.numpy(), ref_assign[:, 0]))}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
