"""Tests for mmsec.cache: the on-disk embedding cache and the vector search helpers."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import struct
import sys
from pathlib import Path

import numpy as np
import platformdirs
import pytest
import torch

from mmsec import cache as cache_mod
from mmsec import search as search_mod
from mmsec.cache import EmbeddingCache, content_hash, default_cache_dir
from mmsec.search import VectorIndex, choose_backend, faiss_available, kmeans

FP = "fp-0123abcd"
DIM = 8

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss not installed")


def key_of(i: int) -> str:
    """Deterministic hex content key for item i."""
    return hashlib.sha256(f"item-{i}".encode()).hexdigest()


def vector_of(key: str, dim: int = DIM) -> np.ndarray:
    """Deterministic float32 [dim] vector for a key (what a model would return)."""
    rng = np.random.default_rng(int(key[:12], 16))
    return rng.standard_normal(dim).astype(np.float32)


def vectors_of(keys: list[str], dim: int = DIM) -> np.ndarray:
    """Stack of ``vector_of`` for each key: float32 [len(keys), dim]."""
    return np.stack([vector_of(k, dim) for k in keys]) if keys else np.zeros((0, dim), "f4")


def shards(cache: EmbeddingCache, fp: str = FP, kind: str = "image") -> list[Path]:
    """Complete shard files of one namespace."""
    return sorted(cache.namespace_dir(fp, kind).glob("shard-*.safetensors"))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> EmbeddingCache:
    """A cache rooted in a fresh folder given through $MMSEC_CACHE_DIR."""
    monkeypatch.setenv("MMSEC_CACHE_DIR", str(tmp_path / "cache"))
    return EmbeddingCache()


# ---------------------------------------------------------------------------------------------
# storage


def test_default_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMSEC_CACHE_DIR", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    assert EmbeddingCache().root == tmp_path / "x"
    monkeypatch.delenv("MMSEC_CACHE_DIR")
    assert default_cache_dir() == Path(platformdirs.user_cache_dir("mmsec"))


def test_put_get_roundtrip(cache: EmbeddingCache) -> None:
    keys = [key_of(i) for i in range(10)]
    vecs = vectors_of(keys)
    path = cache.put(FP, "image", keys, torch.from_numpy(vecs))
    assert path is not None and path.exists() and path.parent == cache.namespace_dir(FP, "image")

    got, found = cache.get(FP, "image", [keys[3], "ff" * 32, keys[7]])
    assert found == [True, False, True]
    assert got is not None and got.dtype == torch.float32 and got.shape == (2, DIM)
    assert torch.equal(got, torch.from_numpy(vecs[[3, 7]]))

    # a fresh object (another process) reads it from disk
    other = EmbeddingCache(cache.root)
    got2, found2 = other.get(FP, "image", keys)
    assert all(found2) and torch.equal(got2, torch.from_numpy(vecs))
    as_dict = other.lookup(FP, "image", [keys[0], "00"])
    assert list(as_dict) == [keys[0]] and torch.equal(as_dict[keys[0]], torch.from_numpy(vecs[0]))
    assert other.dim(FP, "image") == DIM

    # nothing found -> None; re-putting known keys writes nothing
    assert cache.get(FP, "image", ["ab"]) == (None, [False])
    assert cache.put(FP, "image", keys[:4], vecs[:4]) is None
    assert len(shards(cache)) == 1


def test_put_validates(cache: EmbeddingCache) -> None:
    keys = [key_of(i) for i in range(3)]
    with pytest.raises(ValueError):
        cache.put(FP, "image", keys, np.zeros((2, DIM), "f4"))
    with pytest.raises(ValueError):
        cache.put(FP, "image", ["a\nb"], np.zeros((1, DIM), "f4"))
    with pytest.raises(ValueError):
        cache.put(FP, "image", keys[:1], np.full((1, DIM), np.nan, "f4"))
    with pytest.raises(Exception, match="invalid cache fingerprint"):
        cache.put("../evil", "image", keys[:1], np.zeros((1, DIM), "f4"))
    cache.put(FP, "image", keys[:1], np.zeros((1, DIM), "f4"))
    with pytest.raises(ValueError, match="dimension"):
        cache.put(FP, "image", keys[1:2], np.zeros((1, DIM + 1), "f4"))


def make_encoder(keys: list[str], calls: list[list[int]]):
    """encode_fn over ``keys`` that records the indices it is called with."""

    def encode_fn(idx: list[int]) -> torch.Tensor:
        calls.append(list(idx))
        return torch.from_numpy(vectors_of([keys[i] for i in idx]))

    return encode_fn


def test_encode_second_call_encodes_nothing(cache: EmbeddingCache) -> None:
    keys = [key_of(i) for i in range(50)]
    calls: list[list[int]] = []
    out = cache.encode(FP, "image", keys, make_encoder(keys, calls), batch_size=16, progress=False)
    assert out.shape == (50, DIM) and torch.equal(out, torch.from_numpy(vectors_of(keys)))
    assert [len(c) for c in calls] == [16, 16, 16, 2]
    assert cache.stats.encoded == 50 and cache.stats.misses == 50

    before = cache.stats.encoded
    calls.clear()
    out2 = cache.encode(FP, "image", keys, make_encoder(keys, calls), batch_size=16, progress=False)
    assert calls == [] and cache.stats.encoded - before == 0
    assert cache.stats.hits == 50
    assert torch.equal(out2, out)

    # also from a fresh object reading the shards
    other = EmbeddingCache(cache.root)
    calls.clear()
    out3 = other.encode(FP, "image", keys[::-1], make_encoder(keys[::-1], calls), progress=False)
    assert calls == [] and other.stats.encoded == 0
    assert torch.equal(out3, out.flip(0))


def test_encode_only_missing_and_changed_content(cache: EmbeddingCache) -> None:
    keys = [key_of(i) for i in range(20)]
    cache.encode(FP, "image", keys[:12], make_encoder(keys[:12], []), progress=False)

    # new items and a changed item (its content hash changes) are the only ones encoded
    changed = list(keys)
    changed[5] = content_hash(b"edited image 5")
    calls: list[list[int]] = []
    out = cache.encode(FP, "image", changed, make_encoder(changed, calls), progress=True)
    assert sorted(i for c in calls for i in c) == [5, *range(12, 20)]
    assert torch.equal(out, torch.from_numpy(vectors_of(changed)))


def test_encode_repeated_keys_and_empty(cache: EmbeddingCache) -> None:
    keys = [key_of(0), key_of(1), key_of(0), key_of(2), key_of(1)]
    calls: list[list[int]] = []
    out = cache.encode(FP, "text", keys, make_encoder(keys, calls), progress=False)
    assert sorted(i for c in calls for i in c) == [0, 1, 3]
    assert torch.equal(out, torch.from_numpy(vectors_of(keys)))
    assert cache.encode(FP, "text", [], make_encoder([], []), progress=False).shape == (0, DIM)


def test_encode_from_a_stream_that_skips_items_and_without_collecting(
        cache: EmbeddingCache) -> None:
    keys = [key_of(i) for i in range(10)] + [key_of(3)]
    cache.put(FP, "image", keys[:2], vectors_of(keys[:2]))
    planned: list[list[int]] = []

    def stream(batches: list[list[int]]):
        planned.extend(batches)
        for b in batches:  # item 3 "fails to load"
            kept = [i for i in b if i != 3]
            yield len(b), kept, torch.from_numpy(vectors_of([keys[i] for i in kept]))

    out = cache.encode(FP, "image", keys, None, batch_size=4, progress=False,
                       flush_every=3, stream=stream)
    assert planned == [[2, 3, 4, 5], [6, 7, 8, 9]]  # only the missing ones, in order
    assert torch.isnan(out[[3, 10]]).all() and not torch.isnan(out[:3]).any()
    assert torch.equal(out[4:10], torch.from_numpy(vectors_of(keys[4:10])))
    assert cache.stats.encoded == 7 and len(shards(cache)) == 3  # 1 put + flushes of 3 and 4
    assert cache.contains(FP, "image", keys) == [True] * 3 + [False] + [True] * 6 + [False]

    calls: list[list[int]] = []
    more = keys + [key_of(20)]
    small = cache.encode(FP, "image", more, make_encoder(more, calls), progress=False,
                         collect=False)
    assert small.shape == (0, DIM) and calls == [[3, 11]]
    assert all(cache.contains(FP, "image", more))
    assert cache.encode(FP, "image", more, make_encoder(more, calls), progress=False,
                        collect=False).shape == (0, DIM) and calls == [[3, 11]]


def test_encode_keeps_progress_when_encoder_fails(cache: EmbeddingCache) -> None:
    keys = [key_of(i) for i in range(10)]

    def failing(idx: list[int]) -> torch.Tensor:
        if idx[0] >= 4:
            raise RuntimeError("boom")
        return torch.from_numpy(vectors_of([keys[i] for i in idx]))

    with pytest.raises(RuntimeError, match="boom"):
        cache.encode(FP, "image", keys, failing, batch_size=4, progress=False)
    assert cache.contains(FP, "image", keys) == [True] * 4 + [False] * 6


def test_fingerprint_and_kind_separate(cache: EmbeddingCache) -> None:
    keys = [key_of(i) for i in range(5)]
    cache.encode(FP, "image", keys, make_encoder(keys, []), progress=False)
    for fp, kind in [("fp-other", "image"), (FP, "text")]:
        calls: list[list[int]] = []
        cache.encode(fp, kind, keys, make_encoder(keys, calls), progress=False)
        assert sum(len(c) for c in calls) == 5


def test_sees_shards_written_by_others(cache: EmbeddingCache) -> None:
    keys = [key_of(i) for i in range(6)]
    cache.put(FP, "image", keys[:3], vectors_of(keys[:3]))
    assert cache.contains(FP, "image", keys) == [True] * 3 + [False] * 3
    EmbeddingCache(cache.root).put(FP, "image", keys[3:], vectors_of(keys[3:]))
    assert cache.contains(FP, "image", keys) == [True] * 6


def flip_tensor_byte(path: Path, tensor: str, offset: int) -> None:
    """Flip one byte of a stored tensor's data inside a safetensors shard, in place."""
    data = bytearray(path.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    begin, end = json.loads(data[8 : 8 + n])[tensor]["data_offsets"]
    assert begin + offset < end
    data[8 + n + begin + offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    ["flip-vector", "flip-key", "flip-header", "truncate", "garbage", "empty"],
)
def test_corrupt_shard_ignored_and_reencoded(
    cache: EmbeddingCache, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    good = [key_of(i) for i in range(4)]
    bad = [key_of(i) for i in range(4, 8)]
    cache.put(FP, "image", good, vectors_of(good))
    bad_path = cache.put(FP, "image", bad, vectors_of(bad))
    assert bad_path is not None
    original = bad_path.read_bytes()
    if damage == "flip-vector":
        flip_tensor_byte(bad_path, "vectors", 4 * DIM + 3)
    elif damage == "flip-key":
        flip_tensor_byte(bad_path, "keys", 70)
    elif damage == "flip-header":  # still valid JSON, but claims 5 rows
        bad_path.write_bytes(bad_path.read_bytes().replace(b'"count":"4"', b'"count":"5"'))
    elif damage == "truncate":
        bad_path.write_bytes(bad_path.read_bytes()[:-17])
    elif damage == "garbage":
        bad_path.write_bytes(b"\x01\x02 this is not a shard" * 10)
    else:
        bad_path.write_bytes(b"")
    assert bad_path.read_bytes() != original
    # a stray non-shard file and a leftover temp file are ignored too
    (bad_path.parent / "README").write_text("hello")
    (bad_path.parent / ".shard-1-x.safetensors.abc.tmp").write_bytes(b"partial")

    fresh = EmbeddingCache(cache.root)
    keys = good + bad
    calls: list[list[int]] = []
    with caplog.at_level(logging.WARNING, logger="mmsec.cache"):
        out = fresh.encode(FP, "image", keys, make_encoder(keys, calls), progress=False)
    assert sorted(i for c in calls for i in c) == list(range(4, 8))
    assert torch.equal(out, torch.from_numpy(vectors_of(keys)))
    assert fresh.stats.corrupt_shards == 1
    assert "corrupt" in caplog.text

    # the re-encoded items are stored; compaction removes the corrupt shard
    again = EmbeddingCache(cache.root)
    assert again.contains(FP, "image", keys) == [True] * 8
    again.compact()
    assert not bad_path.exists() and len(shards(again)) == 1
    final = EmbeddingCache(cache.root)
    got, found = final.get(FP, "image", keys)
    assert all(found) and final.stats.corrupt_shards == 0
    assert torch.equal(got, torch.from_numpy(vectors_of(keys)))


def test_lookup_reads_and_checks_only_the_rows_it_needs(
    cache: EmbeddingCache, caplog: pytest.LogCaptureFixture
) -> None:
    keys = [key_of(i) for i in range(40)]
    path = cache.put(FP, "image", keys, vectors_of(keys))
    flip_tensor_byte(path, "vectors", 30 * 4 * DIM + 5)  # row 30 only
    fresh = EmbeddingCache(cache.root)
    with caplog.at_level(logging.WARNING, logger="mmsec.cache"):
        got, found = fresh.get(FP, "image", keys[:3])  # rows 0-2: row 30 is never read
        assert all(found) and torch.equal(got, torch.from_numpy(vectors_of(keys[:3])))
        assert fresh.stats.corrupt_shards == 0 and not caplog.text
        calls: list[list[int]] = []
        out = fresh.encode(FP, "image", keys[28:32], make_encoder(keys[28:32], calls),
                           progress=False)
    # row 30 fails its check: the shard is dropped, its rows encoded again, with a warning
    assert torch.equal(out, torch.from_numpy(vectors_of(keys[28:32])))
    assert sorted(i for c in calls for i in c) == [0, 1, 2, 3]
    assert fresh.stats.corrupt_shards == 1 and "corrupt" in caplog.text
    assert fresh.contains(FP, "image", keys[:3]) == [False] * 3  # the whole shard is gone


def test_a_shard_without_row_sums_is_read_whole_and_checked(cache: EmbeddingCache) -> None:
    from safetensors.numpy import save

    keys = [key_of(i) for i in range(6)]
    vecs = vectors_of(keys)
    blob = "\n".join(keys).encode()
    meta = {"format": cache_mod.FORMAT, "fingerprint": FP, "kind": "image", "count": "6",
            "dim": str(DIM), "sha256": cache_mod._checksum(blob, vecs)}
    folder = cache.namespace_dir(FP, "image")
    folder.mkdir(parents=True)
    old = folder / "shard-1-old.safetensors"
    old.write_bytes(save({"vectors": vecs, "keys": np.frombuffer(blob, np.uint8).copy()},
                         metadata=meta))
    got, found = EmbeddingCache(cache.root).get(FP, "image", keys[:2])
    assert all(found) and torch.equal(got, torch.from_numpy(vecs[:2]))
    flip_tensor_byte(old, "vectors", 5 * 4 * DIM)  # a row not asked for: still found
    again = EmbeddingCache(cache.root)
    assert again.get(FP, "image", keys[:2])[0] is None and again.stats.corrupt_shards == 1


def test_shard_from_another_namespace_rejected(cache: EmbeddingCache) -> None:
    keys = [key_of(0)]
    path = cache.put("fp-a", "image", keys, vectors_of(keys))
    target = cache.namespace_dir("fp-b", "image")
    target.mkdir(parents=True)
    (target / path.name).write_bytes(path.read_bytes())
    fresh = EmbeddingCache(cache.root)
    assert fresh.contains("fp-b", "image", keys) == [False]
    assert fresh.stats.corrupt_shards == 1


def test_compact_and_auto_compact(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path, max_shards=4)
    keys = [key_of(i) for i in range(12)]
    for i in range(0, 12, 2):
        cache.put(FP, "image", keys[i : i + 2], vectors_of(keys[i : i + 2]))
    assert 1 <= len(shards(cache)) <= 4
    cache.compact(FP, "image")
    assert len(shards(cache)) == 1
    got, found = EmbeddingCache(tmp_path).get(FP, "image", keys)
    assert all(found) and torch.equal(got, torch.from_numpy(vectors_of(keys)))
    assert cache.compact() == 0  # nothing left to merge


def test_info_and_clear(cache: EmbeddingCache) -> None:
    assert cache.info()["namespaces"] == [] and cache.info()["items"] == 0
    keys = [key_of(i) for i in range(5)]
    cache.put("fp-a", "image", keys, vectors_of(keys))
    cache.put("fp-a", "text", keys[:2], vectors_of(keys[:2]))
    cache.put("fp-b", "image", keys[:3], vectors_of(keys[:3]))
    info = cache.info()
    assert info["root"] == str(cache.root) and info["items"] == 10 and info["bytes"] > 0
    per_ns = {(ns["fingerprint"], ns["kind"]): ns for ns in info["namespaces"]}
    assert set(per_ns) == {("fp-a", "image"), ("fp-a", "text"), ("fp-b", "image")}
    assert per_ns[("fp-a", "image")]["items"] == 5 and per_ns[("fp-a", "image")]["dim"] == DIM

    assert cache.clear("fp-a", "text") > 0
    assert {ns["kind"] for ns in cache.info()["namespaces"] if ns["fingerprint"] == "fp-a"} == {
        "image"
    }
    assert cache.clear("fp-a") > 0
    assert cache.contains("fp-a", "image", keys) == [False] * 5
    assert cache.contains("fp-b", "image", keys[:3]) == [True] * 3
    assert cache.clear() > 0
    assert cache.info()["items"] == 0
    assert cache.contains("fp-b", "image", keys[:3]) == [False] * 3


def test_content_hash() -> None:
    x = torch.arange(6, dtype=torch.float32)
    assert content_hash(x) == content_hash(x.numpy())
    assert content_hash(x) != content_hash(x.reshape(2, 3))
    assert content_hash(x) != content_hash(x.double())
    assert len(content_hash("a photo of a cat")) == 64
    assert content_hash(b"a") != content_hash("a")


# ---------------------------------------------------------------------------------------------
# concurrency


def _writer(root: str, worker: int, barrier, rounds: int, per_round: int) -> None:
    """Writer body: put overlapping key ranges; worker 0 also compacts while others write."""
    cache = EmbeddingCache(root, max_shards=3)
    barrier.wait(timeout=120)
    for r in range(rounds):
        start = (worker * per_round // 2) + r * per_round
        keys = [key_of(i) for i in range(start, start + per_round)]
        cache.put(FP, "image", keys, vectors_of(keys, 64))
        if worker == 0 and r % 2 == 1:
            cache.compact(FP, "image")


def test_concurrent_writers(tmp_path: Path) -> None:
    # two spawned processes plus this one write overlapping keys at the same time
    ctx = mp.get_context("spawn")
    n_workers, rounds, per_round = 3, 12, 40
    barrier = ctx.Barrier(n_workers)
    procs = [
        ctx.Process(target=_writer, args=(str(tmp_path), w, barrier, rounds, per_round))
        for w in range(n_workers - 1)
    ]
    for p in procs:
        p.start()
    try:
        _writer(str(tmp_path), n_workers - 1, barrier, rounds, per_round)
    finally:
        for p in procs:
            p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * (n_workers - 1)

    expected = sorted(
        {
            key_of(i)
            for w in range(n_workers)
            for r in range(rounds)
            for i in range(
                w * per_round // 2 + r * per_round, w * per_round // 2 + (r + 1) * per_round
            )
        }
    )
    cache = EmbeddingCache(tmp_path)
    got, found = cache.get(FP, "image", expected)
    assert all(found) and cache.stats.corrupt_shards == 0
    assert torch.equal(got, torch.from_numpy(vectors_of(expected, 64)))
    assert not list(cache.namespace_dir(FP, "image").glob(".*.tmp"))
    # every shard on disk verifies on its own
    for shard in shards(cache):
        keys, vecs = cache_mod._decode_shard(shard.read_bytes(), FP, "image")
        assert np.array_equal(vecs, vectors_of(keys, 64))


def _worker(root: str, role: str, seed: int, barrier, rounds: int, q) -> None:
    """One process of the mixed test: encode, read or clear, checking every vector it gets."""
    rng = np.random.default_rng(seed)
    cache = EmbeddingCache(root, max_shards=4)
    barrier.wait(timeout=120)
    checked = 0
    for _ in range(rounds):
        keys = [key_of(int(i)) for i in rng.choice(300, size=40, replace=False)]
        if role == "encode":
            out = cache.encode(FP, "image", keys, lambda idx, keys=keys: vectors_of(
                [keys[i] for i in idx]), batch_size=16, progress=False, flush_every=16)
            checked += int(torch.equal(out, torch.from_numpy(vectors_of(keys))))
        elif role == "read":
            got, found = cache.get(FP, "image", keys)
            hits = [k for k, f in zip(keys, found, strict=True) if f]
            checked += int(got is None or torch.equal(got, torch.from_numpy(vectors_of(hits))))
        else:  # clear now and then, compact otherwise
            if rng.random() < 0.3:
                cache.clear(FP, "image")
            else:
                cache.compact(FP, "image")
            checked += 1
    q.put((role, seed, checked, cache.stats.corrupt_shards))


def test_processes_encoding_reading_and_clearing_one_cache(tmp_path: Path) -> None:
    """Two encoders, two readers and a process that clears and compacts, all at once: every
    vector anyone gets is right, no shard is torn, nobody hangs."""
    ctx = mp.get_context("spawn")
    roles = ["encode", "encode", "read", "read", "clear"]
    barrier, q, rounds = ctx.Barrier(len(roles)), ctx.Queue(), 25
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), role, seed, barrier, rounds, q))
             for seed, role in enumerate(roles)]
    for p in procs:
        p.start()
    try:
        results = [q.get(timeout=180) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():  # a deadlock: fail, never hang the suite
                p.kill()
    assert [p.exitcode for p in procs] == [0] * len(roles)
    assert sorted(r[2] for r in results) == [rounds] * len(roles), results
    assert all(r[3] == 0 for r in results), results  # nothing torn, nothing "corrupt"
    cache = EmbeddingCache(tmp_path)
    keys = [key_of(i) for i in range(300)]
    got, found = cache.get(FP, "image", keys)
    hits = [k for k, f in zip(keys, found, strict=True) if f]
    assert got is None or torch.equal(got, torch.from_numpy(vectors_of(hits)))
    assert cache.stats.corrupt_shards == 0


# ---------------------------------------------------------------------------------------------
# search


def brute_force(db: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix [Q, N] in float64."""
    dbn = torch.nn.functional.normalize(db.double(), dim=1)
    qn = torch.nn.functional.normalize(q.double(), dim=1)
    return qn @ dbn.T


def test_choose_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search_mod, "_import_faiss", lambda: None)
    assert choose_backend() == "torch"
    assert VectorIndex(torch.randn(4, 3)).backend == "torch"
    with pytest.raises(Exception, match="needs faiss"):
        VectorIndex(torch.randn(4, 3), backend="faiss-cpu")
    # kmeans falls back to torch as well
    c, a = kmeans(torch.tensor([[0.0], [0.1], [5.0], [5.1]]), 2)
    assert c.shape == (2, 1) and a.shape == (4,)
    with pytest.raises(Exception, match="unknown search backend"):
        VectorIndex(torch.randn(4, 3), backend="annoy")


def test_works_without_faiss_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # "import faiss" now raises ImportError
    search_mod._import_faiss.cache_clear()
    try:
        assert not faiss_available() and choose_backend() == "torch"
        index = VectorIndex(torch.eye(3))
        _, idx = index.knn(torch.eye(3), 1)
        assert index.backend == "torch" and idx.flatten().tolist() == [0, 1, 2]
    finally:
        search_mod._import_faiss.cache_clear()


@needs_faiss
def test_choose_backend_with_faiss(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search_mod, "_faiss_num_gpus", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_backend() == "faiss-cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_backend() == "torch"  # CUDA but faiss without GPU: exact search on the GPU
    monkeypatch.setattr(search_mod, "_faiss_num_gpus", lambda: 1)
    assert choose_backend() == "faiss-gpu"
    # the run's device decides: --device cpu searches on the CPU even where CUDA is
    assert choose_backend("cpu") == "faiss-cpu" and choose_backend("cuda:0") == "faiss-gpu"
    assert VectorIndex(torch.randn(4, 3), device="cpu").backend == "faiss-cpu"


BACKEND_PARAMS = [
    pytest.param("faiss-cpu", marks=needs_faiss),
    "torch",
]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_knn_matches_brute_force(backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    db, q = torch.randn(500, 32, generator=g), torch.randn(37, 32, generator=g)
    index = VectorIndex(db, backend=backend, kind="exact")
    assert index.backend == backend and index.ntotal == 500 and index.dim == 32
    sims, idx = index.knn(q, 10)
    assert sims.shape == (37, 10) and idx.shape == (37, 10) and idx.dtype == torch.long
    ref = brute_force(db, q)
    ref_s, ref_i = ref.topk(10, dim=1)
    assert torch.equal(idx, ref_i)
    assert torch.allclose(sims.double(), ref_s, atol=1e-5)

    fs, fi = index.farthest(q, 5)
    ref_fs, ref_fi = ref.topk(5, dim=1, largest=False)
    assert torch.equal(fi, ref_fi) and torch.allclose(fs.double(), ref_fs, atol=1e-5)

    # k beyond N is clamped; numpy queries work too
    s_all, _ = index.knn(q[:2].numpy(), 10_000)
    assert s_all.shape == (2, 500)


@needs_faiss
def test_faiss_and_torch_agree() -> None:
    g = torch.Generator().manual_seed(1)
    db, q = torch.randn(2000, 64, generator=g), torch.randn(100, 64, generator=g)
    a = VectorIndex(db, backend="faiss-cpu", kind="exact")
    b = VectorIndex(db, backend="torch", kind="exact")
    sa, ia = a.knn(q, 20)
    sb, ib = b.knn(q, 20)
    assert torch.equal(ia, ib) and torch.allclose(sa, sb, atol=1e-5)
    ra, rb = a.range_search(q, 0.3), b.range_search(q, 0.3)
    for (s1, i1), (s2, i2) in zip(ra, rb, strict=True):
        assert torch.equal(i1, i2) and torch.allclose(s1, s2, atol=1e-5)


def test_torch_backend_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # tiny blocks force many query and database chunks
    monkeypatch.setattr(search_mod, "_BLOCK_ELEMS", 64)
    g = torch.Generator().manual_seed(2)
    db, q = torch.randn(300, 16, generator=g), torch.randn(9, 16, generator=g)
    sims, idx = search_mod._torch_topk(
        torch.nn.functional.normalize(db, dim=1), torch.nn.functional.normalize(q, dim=1), 7, True
    )
    assert torch.equal(idx, brute_force(db, q).topk(7, dim=1).indices)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_range_search_matches_brute_force(backend: str) -> None:
    g = torch.Generator().manual_seed(3)
    db, q = torch.randn(400, 8, generator=g), torch.randn(12, 8, generator=g)
    db[17] = q[0] * 3.0  # exact duplicate direction: similarity 1 must be included at 1.0 - eps
    threshold = 0.6
    index = VectorIndex(db, backend=backend, kind="exact")
    results = index.range_search(q, threshold)
    ref = brute_force(db, q)
    assert len(results) == 12
    for j, (s, i) in enumerate(results):
        expected = set((ref[j] >= threshold).nonzero().flatten().tolist())
        # ignore points within float error of the threshold
        border = set(((ref[j] - threshold).abs() < 1e-5).nonzero().flatten().tolist())
        assert set(i.tolist()) - border == expected - border
        assert bool((s >= threshold).all()) and bool((s[:-1] >= s[1:]).all())
        assert torch.allclose(s.double(), ref[j, i], atol=1e-5)
    assert 17 in results[0][1].tolist()
    assert results[0][1][0] == 17
    # an unreachable threshold gives empty results
    assert all(s.numel() == 0 for s, _ in index.range_search(q, 1.5))


def test_index_from_cache_and_add(cache: EmbeddingCache) -> None:
    keys = [key_of(i) for i in range(30)]
    cache.put(FP, "image", keys, vectors_of(keys))
    index = cache.index(FP, "image", keys, backend="torch")
    _, idx = index.knn(torch.from_numpy(vectors_of(keys[4:6])), 1)
    assert idx.flatten().tolist() == [4, 5]
    index.add(torch.from_numpy(vectors_of([key_of(99)])))
    assert len(index) == 31
    assert index.knn(torch.from_numpy(vectors_of([key_of(99)])), 1)[1].item() == 30
    with pytest.raises(KeyError):
        cache.index(FP, "image", [key_of(1000)])


# ---------------------------------------------------------------------------------------------
# k-means


def matches_labels(assign: torch.Tensor, truth: torch.Tensor) -> bool:
    """Whether a 2-cluster assignment equals the truth up to swapping the labels."""
    return bool(torch.equal(assign, truth) or torch.equal(assign, 1 - truth))


KMEANS_BACKENDS = [pytest.param("faiss", marks=needs_faiss), "torch"]


@pytest.mark.parametrize("backend", KMEANS_BACKENDS)
def test_kmeans_two_blobs(backend: str) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(100, 16, generator=g) * 0.1 + 5.0
    b = torch.randn(60, 16, generator=g) * 0.1 - 5.0
    x = torch.cat([a, b])
    truth = torch.cat([torch.zeros(100), torch.ones(60)]).long()
    cent, assign = kmeans(x, 2, niter=20, seed=0, backend=backend)
    assert cent.shape == (2, 16) and assign.shape == (160,) and assign.dtype == torch.long
    assert matches_labels(assign, truth)
    means = torch.stack([a.mean(0), b.mean(0)])
    d = torch.cdist(cent, means)
    assert float(d.min(dim=1).values.max()) < 1e-3
    # deterministic for a given seed
    cent2, assign2 = kmeans(x, 2, niter=20, seed=0, backend=backend)
    assert torch.equal(cent, cent2) and torch.equal(assign, assign2)


@pytest.mark.parametrize("backend", KMEANS_BACKENDS)
def test_kmeans_one_dimensional_tiny(backend: str) -> None:
    # InverTune: k=2 on per-neuron activation shifts, shape [N, 1], no normalisation
    x = torch.tensor([[0.02], [-0.01], [0.0], [3.1], [2.9]])
    cent, assign = kmeans(x, 2, seed=0, backend=backend)
    assert cent.shape == (2, 1)
    assert matches_labels(assign, torch.tensor([0, 0, 0, 1, 1]))
    assert sorted(round(float(c), 4) for c in cent.flatten()) == [0.0033, 3.0]
    # a 1-D vector is treated as [N, 1]; N == k works
    cent, assign = kmeans(torch.tensor([1.0, 7.0]), 2, backend=backend)
    assert sorted(cent.flatten().tolist()) == [1.0, 7.0] and sorted(assign.tolist()) == [0, 1]
    with pytest.raises(ValueError):
        kmeans(torch.tensor([[1.0]]), 2, backend=backend)


@pytest.mark.parametrize("backend", KMEANS_BACKENDS)
def test_kmeans_spherical(backend: str) -> None:
    g = torch.Generator().manual_seed(4)
    dirs = torch.nn.functional.normalize(torch.randn(3, 12, generator=g), dim=1) * 4
    x = torch.cat([dirs[i] + 0.05 * torch.randn(30, 12, generator=g) for i in range(3)])
    x = torch.nn.functional.normalize(x, dim=1)
    cent, assign = kmeans(x, 3, spherical=True, seed=1, backend=backend)
    assert torch.allclose(cent.norm(dim=1), torch.ones(3), atol=1e-4)
    groups = [set(assign[i * 30 : (i + 1) * 30].tolist()) for i in range(3)]
    assert all(len(gr) == 1 for gr in groups) and len(set.union(*groups)) == 3


def test_kmeans_torch_identical_points() -> None:
    x = torch.ones(5, 3)
    cent, assign = kmeans(x, 2, backend="torch")
    assert cent.shape == (2, 3) and assign.shape == (5,)
    assert torch.isfinite(cent).all()


@needs_faiss
def test_faiss_index_normalises_in_its_own_storage() -> None:
    """The faiss-cpu build adds the raw rows and normalises them in FAISS's storage: the
    caller's tensor is untouched and the stored rows are the normalised ones."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g) * 3
    x[5] = 0.0  # a zero row stays zero, as with F.normalize
    before = x.clone()
    index = VectorIndex(x, backend="faiss-cpu", kind="exact")
    assert torch.equal(x, before)
    assert torch.allclose(index._torch_db(), torch.nn.functional.normalize(x, dim=1),
                          atol=1e-6, rtol=0)
    more = torch.randn(7, 8, generator=g, dtype=torch.float64)  # converted, then appended
    index.add(more.numpy())
    assert len(index) == 407
    assert torch.allclose(index._torch_db()[400:],
                          torch.nn.functional.normalize(more.float(), dim=1), atol=1e-6, rtol=0)
    exact = VectorIndex(torch.cat([x, more.float()]), backend="torch", kind="exact")
    q = torch.randn(20, 8, generator=g)
    assert torch.equal(index.knn(q, 5)[1], exact.knn(q, 5)[1])


@pytest.mark.parametrize("backend", KMEANS_BACKENDS)
def test_kmeans_trains_on_a_sample_like_faiss(backend: str) -> None:
    """Above k * max_points_per_centroid points the centroids are trained on a sample (as
    faiss.Kmeans does by default) and every point is assigned; None trains on all."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(700, 8, generator=g) * 0.2 + 3.0
    b = torch.randn(500, 8, generator=g) * 0.2 - 3.0
    x = torch.cat([a, b])
    truth = torch.cat([torch.zeros(700), torch.ones(500)]).long()
    for cap in (256, 10, None):
        cent, assign = kmeans(x, 2, seed=0, backend=backend, max_points_per_centroid=cap)
        assert assign.shape == (1200,) and matches_labels(assign, truth)
        assert float(torch.cdist(cent, torch.stack([a.mean(0), b.mean(0)])).min(1).values
                     .max()) < 0.2
    if backend == "faiss":
        import faiss

        km = faiss.Kmeans(8, 2, niter=20, seed=0)  # faiss's defaults: 256 points a centroid
        km.train(x.numpy())
        cent, assign = kmeans(x, 2, seed=0, backend=backend)
        assert np.array_equal(cent.numpy(), km.centroids)
        assert np.array_equal(assign.numpy(), km.index.search(x.numpy(), 1)[1][:, 0])
    with pytest.raises(ValueError):
        kmeans(x, 2, backend=backend, max_points_per_centroid=0)
