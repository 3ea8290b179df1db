"""VectorIndex kinds (exact / ivf / hnsw / auto) and the on-disk index (save / load, mmap).

Exact search against brute force, the backends and k-means are tested in test_cache.py.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from mmsec import MmsecError, UsageError
from mmsec import search as search_mod
from mmsec.search import AUTO_APPROX_KIND, KINDS, VectorIndex, faiss_available

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
APPROX = [pytest.param("ivf", marks=needs_faiss), pytest.param("hnsw", marks=needs_faiss)]


def clustered(n: int, dim: int = 32, clusters: int = 20, seed: int = 0,
              queries: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gaussian mixture (normalised) and held-out queries from the same mixture."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=g), dim=1)

    def draw(m: int) -> torch.Tensor:
        lab = torch.randint(clusters, (m,), generator=g)
        x = centres[lab] + 0.8 / dim**0.5 * torch.randn(m, dim, generator=g)
        return torch.nn.functional.normalize(x, dim=1)

    return draw(n), draw(queries)


def recall10(found: torch.Tensor, truth: torch.Tensor) -> float:
    hits = sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), truth.tolist(), strict=True))
    return hits / truth.numel()


@needs_faiss
def test_auto_picks_exact_up_to_the_threshold_then_the_approximate_kind() -> None:
    x, _ = clustered(400)
    small = VectorIndex(x[:200], backend="faiss-cpu", exact_max=200)
    big = VectorIndex(x, backend="faiss-cpu", exact_max=200)
    assert small.kind == "exact" and small.params == {}
    assert big.kind == AUTO_APPROX_KIND and big.kind in KINDS and big.params["recall@10"] >= 0.95
    assert "kind='exact'" in repr(small)
    # the default threshold keeps every small index exact, and auto there is exact search
    auto = VectorIndex(x, backend="faiss-cpu")
    exact = VectorIndex(x, backend="faiss-cpu", kind="exact")
    assert auto.kind == "exact"
    q = x[:50] + 0.01
    assert all(torch.equal(a, b) for a, b in zip(auto.knn(q, 7), exact.knn(q, 7), strict=True))
    # an explicit kind wins over the size
    assert VectorIndex(x, backend="faiss-cpu", kind="hnsw", exact_max=10**9).kind == "hnsw"
    assert VectorIndex(x, backend="faiss-cpu", kind="exact", exact_max=1).kind == "exact"


def test_unknown_kind_and_the_exact_only_torch_backend() -> None:
    x = torch.randn(300, 8)
    with pytest.raises(UsageError, match="unknown index kind"):
        VectorIndex(x, kind="lsh")
    with pytest.raises(MmsecError, match="torch backend searches exactly only"):
        VectorIndex(x, backend="torch", kind="ivf")
    # auto on the torch backend (e.g. CUDA without faiss-gpu) is exact, whatever the size
    assert VectorIndex(x, backend="torch", exact_max=10).kind == "exact"


@pytest.mark.parametrize("kind", APPROX)
def test_approximate_kinds_reach_their_recall_on_clustered_data(kind: str) -> None:
    x, q = clustered(4000, queries=100)
    index = VectorIndex(x, backend="faiss-cpu", kind=kind)
    exact = VectorIndex(x, backend="faiss-cpu", kind="exact")
    assert index.kind == kind and index.ntotal == 4000
    assert ("nprobe" if kind == "ivf" else "efSearch") in index.params
    sims, idx = index.knn(q, 10)
    ref_s, ref_i = exact.knn(q, 10)
    assert recall10(idx, ref_i) >= 0.9
    assert bool((sims[:, :-1] >= sims[:, 1:]).all())
    # farthest is approximate too, but mostly right; range search is exact for every kind
    assert recall10(index.farthest(q, 10)[1], exact.farthest(q, 10)[1]) >= 0.5
    for (_, i1), (_, i2) in zip(index.range_search(q[:5], 0.5), exact.range_search(q[:5], 0.5),
                                  strict=True):
        assert set(i1.tolist()) == set(i2.tolist())
    # add appends without retraining
    index.add(q)
    assert index.ntotal == 4100 and int(index.knn(q[:3], 1)[1][0, 0]) == 4000


@needs_faiss
def test_ivf_never_returns_missing_neighbours() -> None:
    """When the probed lists hold fewer than k vectors those queries are searched exactly."""
    x, q = clustered(400, queries=5)
    index = VectorIndex(x, backend="faiss-cpu", kind="ivf")
    index._cpu_index.nprobe = 1
    sims, idx = index.knn(q, 300)
    ref_s, ref_i = VectorIndex(x, backend="faiss-cpu", kind="exact").knn(q, 300)
    assert bool((idx >= 0).all()) and torch.isfinite(sims).all()


@pytest.mark.parametrize("kind", [pytest.param("exact", marks=needs_faiss), *APPROX])
def test_save_and_load_with_mmap_give_identical_results(kind: str, tmp_path: Path) -> None:
    x, q = clustered(3000, queries=40)
    index = VectorIndex(x, backend="faiss-cpu", kind=kind)
    path = index.save(tmp_path / "sub" / "index.faiss")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["index.faiss"]
    loaded = VectorIndex.load(path, mmap=True, backend="faiss-cpu")
    assert loaded.kind == kind and loaded.mmap and loaded.ntotal == 3000 and loaded.dim == 32
    assert {k: v for k, v in loaded.params.items() if k in ("nprobe", "efSearch")} == \
        {k: v for k, v in index.params.items() if k in ("nprobe", "efSearch")}
    for a, b in zip(index.knn(q, 10), loaded.knn(q, 10), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(index.farthest(q, 3)[1], loaded.farthest(q, 3)[1])
    with pytest.raises(MmsecError, match="read-only"):
        loaded.add(q)
    copy = VectorIndex.load(path, mmap=False, backend="faiss-cpu")
    assert not copy.mmap
    copy.add(q)
    assert copy.ntotal == 3040
    # saving over a mapped file replaces it; the mapped index keeps answering
    VectorIndex(x[:100], backend="faiss-cpu", kind="exact").save(path)
    assert torch.equal(loaded.knn(q, 10)[1], index.knn(q, 10)[1])
    assert VectorIndex.load(path, backend="faiss-cpu").ntotal == 100


@needs_faiss
def test_torch_backend_saves_as_exact_and_loads_on_either_backend(tmp_path: Path) -> None:
    x, q = clustered(500, queries=10)
    src = VectorIndex(x, backend="torch")
    src.save(tmp_path / "t.faiss")
    for backend in ("torch", "faiss-cpu"):
        loaded = VectorIndex.load(tmp_path / "t.faiss", backend=backend, device="cpu")
        assert loaded.backend == backend and loaded.kind == "exact"
        assert torch.equal(loaded.knn(q, 5)[1], src.knn(q, 5)[1])
    VectorIndex(x, backend="faiss-cpu", kind="ivf").save(tmp_path / "ivf.faiss")
    with pytest.raises(MmsecError, match="exact only"):
        VectorIndex.load(tmp_path / "ivf.faiss", backend="torch", device="cpu")


@needs_faiss
def test_a_missing_or_corrupt_index_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MmsecError, match="no vector index"):
        VectorIndex.load(tmp_path / "absent.faiss")
    (tmp_path / "junk.faiss").write_bytes(b"not an index at all")
    with pytest.raises(MmsecError, match="not a vector index"):
        VectorIndex.load(tmp_path / "junk.faiss")
    x, _ = clustered(300)
    for kind in ("exact", "ivf", "hnsw"):
        good = VectorIndex(x, backend="faiss-cpu", kind=kind).save(tmp_path / f"{kind}.faiss")
        data = good.read_bytes()
        for mmap in (True, False):
            cut = tmp_path / f"{kind}-cut.faiss"
            cut.write_bytes(data[: len(data) // 2])
            with pytest.raises(MmsecError, match="corrupt vector index"):
                VectorIndex.load(cut, mmap=mmap)


@needs_faiss
def test_a_failed_save_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                           ) -> None:
    x, q = clustered(200, queries=5)
    path = VectorIndex(x, backend="faiss-cpu", kind="exact").save(tmp_path / "i.faiss")
    before = path.read_bytes()
    faiss = search_mod._import_faiss()

    def broken(index, name):
        Path(name).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(faiss, "write_index", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        VectorIndex(x[:10], backend="faiss-cpu", kind="exact").save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["i.faiss"]


@needs_faiss
def test_the_index_kinds_benchmark_runs_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        module = importlib.import_module("index_kinds")
        out = module.main(["--n", "1500", "--dim", "16", "--queries", "20", "--clusters", "10",
                           "--repeat", "1"])
    finally:
        sys.path.remove(str(bench))
    kinds = out["kinds"]
    assert set(kinds) == {"exact", "ivf", "hnsw"} and kinds["exact"]["recall@10"] == 1.0
    assert all(r["same_after_load"] and r["mmap"] for r in kinds.values())
    assert '"index_kinds"' in capsys.readouterr().out
