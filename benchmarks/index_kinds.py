"""Index kinds of mmsec.search.VectorIndex (exact / ivf / hnsw): recall@10, query time, build
time, peak memory and size on disk, on synthetic clustered data.

    python benchmarks/index_kinds.py [--n 100000] [--dim 512] [--queries 1000]
                                     [--clusters N/10] [--spread 0.8] [--kinds exact,ivf,hnsw]
                                     [--repeat 3]
    python benchmarks/index_kinds.py --n 1000000 --queries 500 --repeat 1     # ~10 GB
    python benchmarks/index_kinds.py --sweep 10000,30000,100000,300000        # auto threshold

Data: a two-level Gaussian mixture (100 random group directions in ``--dim`` dimensions;
``--clusters`` centres (default N/10), each its group's direction plus noise of norm 1; each
point its centre plus isotropic noise of norm ``--spread``), normalised; the queries are more
draws from the same mixture (not database rows). Uniform noise would make every neighbour
equally far and recall meaningless.

Per kind, on faiss-cpu: build = ``VectorIndex(x, kind=...)`` (for ivf/hnsw: training on the
sample, adding, and tuning nprobe/efSearch to recall@10 >= 0.95 on database rows); search =
``knn(q, 10)`` for all queries; recall@10 = mean overlap with the exact index's top 10 on the
held-out queries; ``file_mb`` = ``save`` size; ``load_s`` = ``VectorIndex.load(mmap=True)``
(hnsw: read, FAISS cannot map it) and whether the loaded index gives the same neighbours.
Time is CPU seconds (best of ``--repeat`` for search; one build per kind), peak memory the rise
of the process's peak RSS during the call (see ``knn_kmeans.py``). Use ``OMP_NUM_THREADS=1``.

``--sweep N1,N2,...``: exact search ms/query (``--queries`` in one batch) and ivf build seconds
and ms/query at each size, the query count from which ivf's build pays for itself
(``breakeven_q``) and the CPU time of an exact kNN of every item against all (``N`` queries:
what the cache's self-kNN, AdvCLIP's topology graph and SCAN do): the figures behind
``mmsec.search.AUTO_EXACT_MAX``. Keep ``--queries`` >= 250 at 512-d: faiss 1.15 searches a
flat index without BLAS below 128,000 query floats (``distance_compute_blas_threshold``),
about 20x slower a query.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import tempfile
from pathlib import Path

import faiss
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from knn_kmeans import measure  # noqa: E402

from mmsec.search import VectorIndex  # noqa: E402


def mixture(n: int, dim: int, clusters: int, spread: float, gen: torch.Generator,
            centres: torch.Tensor | None = None, groups: int = 100
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` normalised draws of the mixture (built in chunks: ~1x the output's memory).

    Two levels, so that neighbourhoods cross cluster borders as in real embeddings: ``groups``
    random unit directions; each of the ``clusters`` centres is a group direction plus noise of
    norm 1 (normalised: cosine ~0.7 to its group); each point a centre plus noise of norm
    ``spread``."""
    if centres is None:
        top = torch.nn.functional.normalize(torch.randn(groups, dim, generator=gen), dim=1)
        parent = torch.randint(groups, (clusters,), generator=gen)
        centres = torch.nn.functional.normalize(
            top[parent] + torch.randn(clusters, dim, generator=gen) / math.sqrt(dim), dim=1)
    out = torch.empty(n, dim)
    for s in range(0, n, 65536):
        m = min(65536, n - s)
        lab = torch.randint(clusters, (m,), generator=gen)
        chunk = torch.randn(m, dim, generator=gen).mul_(spread / math.sqrt(dim)).add_(
            centres[lab])
        out[s : s + m] = torch.nn.functional.normalize(chunk, dim=1)
    return out, centres


def recall10(found: torch.Tensor, truth: torch.Tensor) -> float:
    hits = sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), truth.tolist(), strict=True))
    return round(hits / truth.numel(), 4)


def kinds(args: argparse.Namespace, x: torch.Tensor, q: torch.Tensor) -> dict:
    out: dict = {}
    truth = None
    for kind in args.kinds.split(","):
        holder: list = []

        def build(kind: str = kind, holder: list = holder):
            holder.append(VectorIndex(x, backend="faiss-cpu", kind=kind, seed=args.seed))

        b = measure(build, 1)
        index = holder[0]
        s = measure(lambda index=index: index.knn(q, 10), args.repeat)
        _, idx = index.knn(q, 10)
        if kind == "exact":
            truth = idx
        row = {"kind": index.kind, "params": index.params, "build": b, "search": s,
               "ms_per_query": round(1000 * s["cpu_s"] / q.shape[0], 3)}
        if truth is not None:
            row["recall@10"] = recall10(idx, truth)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{kind}.faiss"
            index.save(path)
            row["file_mb"] = round(path.stat().st_size / 2**20, 1)
            del index, holder[:]
            gc.collect()
            loaded: list = []
            row["load"] = measure(lambda loaded=loaded, path=path: loaded.append(
                VectorIndex.load(path, mmap=True)), 1)
            row["mmap"] = loaded[0].mmap
            row["same_after_load"] = bool(torch.equal(loaded[0].knn(q, 10)[1], idx))
            del loaded[:]
            gc.collect()
        out[kind] = row
        print(json.dumps({kind: row}), file=sys.stderr, flush=True)
    return out


def sweep(args: argparse.Namespace) -> list:
    rows = []
    for n in (int(v) for v in args.sweep.split(",")):
        gen = torch.Generator().manual_seed(args.seed)
        clusters = args.clusters_arg or max(1, n // 10)
        x, centres = mixture(n, args.dim, clusters, args.spread, gen)
        q, _ = mixture(args.queries, args.dim, clusters, args.spread, gen, centres)
        exact = VectorIndex(x, backend="faiss-cpu", kind="exact")
        e = measure(lambda exact=exact, q=q: exact.knn(q, 10), args.repeat)
        truth = exact.knn(q, 10)[1]
        del exact
        holder: list = []
        b = measure(lambda holder=holder, x=x: holder.append(
            VectorIndex(x, backend="faiss-cpu", kind="ivf", seed=args.seed)), 1)
        ivf = holder[0]
        s = measure(lambda ivf=ivf, q=q: ivf.knn(q, 10), args.repeat)
        exact_ms = 1000 * e["cpu_s"] / q.shape[0]
        ivf_ms = 1000 * s["cpu_s"] / q.shape[0]
        gain = exact_ms - ivf_ms
        row = {"n": n, "exact_ms_per_query": round(exact_ms, 3),
               "ivf_build_cpu_s": b["cpu_s"], "ivf_ms_per_query": round(ivf_ms, 3),
               "ivf_params": ivf.params, "ivf_recall@10": recall10(ivf.knn(q, 10)[1], truth),
               "breakeven_q": round(1000 * b["cpu_s"] / gain) if gain > 0 else None,
               "exact_self_knn_cpu_s": round(n * exact_ms / 1000, 1)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        del ivf, holder[:], x
        gc.collect()
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--clusters", type=int, default=None, help="default N/10")
    ap.add_argument("--spread", type=float, default=0.8)
    ap.add_argument("--kinds", default="exact,ivf,hnsw")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep", default=None, help="comma-separated sizes (see above)")
    args = ap.parse_args(argv)
    args.clusters_arg = args.clusters
    if args.clusters is None:
        args.clusters = max(1, args.n // 10)
    out: dict = {"benchmark": "index_kinds", "dim": args.dim, "clusters": args.clusters,
                 "spread": args.spread, "threads": faiss.omp_get_max_threads()}
    if args.sweep:
        out["sweep"] = sweep(args)
    else:
        gen = torch.Generator().manual_seed(args.seed)
        x, centres = mixture(args.n, args.dim, args.clusters, args.spread, gen)
        q, _ = mixture(args.queries, args.dim, args.clusters, args.spread, gen, centres)
        out.update({"n": args.n, "queries": args.queries, "kinds": kinds(args, x, q)})
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
