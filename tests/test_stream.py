"""Streaming image encodes into the cache (worker processes), resuming after a SIGKILL,
corrupt files found only at encode time, the on-disk scan memo, and `mmsec cache encode`."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmsec import EmbeddingCache
from mmsec.data import files as data_files
from mmsec.data import imagefolder, load_images
from mmsec.errors import MmsecError
from mmsec.evaluation.embed import encode_images, fill_cache
from mmsec.testing import invoke

pytestmark = pytest.mark.usefixtures("one_thread")

OLD = time.time() - 3600  # files "settled" long ago: the scan memo keeps them


def _folder(root: Path, n: int = 24, size: int = 40) -> Path:
    """``n`` noisy images in two classes, PNG and JPEG alternately, dated an hour ago."""
    rng = np.random.default_rng(0)
    for i in range(n):
        cls = root / ("red" if i % 2 else "blue")
        cls.mkdir(parents=True, exist_ok=True)
        rgb = (200, 40, 40) if i % 2 else (40, 40, 200)
        img = np.clip(rng.normal(rgb, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        path = cls / f"{i:04d}.{'png' if i % 4 < 2 else 'jpg'}"
        Image.fromarray(img).save(path)
        os.utime(path, (OLD, OLD))
    return root


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("MMSEC_CACHE_DIR", str(tmp_path / "cache"))
    data_files._SCAN_MEMO.clear()
    yield tmp_path
    data_files._SCAN_MEMO.clear()


def _plain(model, ds, batch):
    with torch.no_grad():
        return torch.cat([model.encode_image(load_images(ds, list(range(s, min(len(ds), s + batch)
                                                                          )))[0])
                          for s in range(0, len(ds), batch)])


def test_streaming_with_workers_equals_the_plain_path(env, zoo_model):
    ds = imagefolder(str(_folder(env / "imgs")), split="train", image_size=32)
    ref = _plain(zoo_model, ds, 8)
    cache = EmbeddingCache(env / "c1")
    got = encode_images(zoo_model, ds, cache, batch_size=8, progress=False, workers=2)
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-6, rtol=0)
    assert cache.stats.encoded == len(ds)
    again = encode_images(zoo_model, ds, cache, batch_size=8, progress=False, workers=2)
    assert torch.equal(again, got) and cache.stats.encoded == len(ds)  # read, not encoded
    # only the missing items are loaded at all
    loads = []
    real = type(ds).load
    ds.load = lambda i: (loads.append(i), real(ds, i))[1]
    cache.clear(zoo_model.fingerprint)
    cache.put(zoo_model.fingerprint, "image", [ds.key(i) for i in range(5)], got[:5].numpy())
    report = fill_cache(zoo_model, ds, cache, batch_size=8, workers=0, progress=False)
    assert sorted(loads) == list(range(5, len(ds)))
    assert (report.cached, report.encoded, report.skipped) == (5, len(ds) - 5, [])


_KILLED_RUN = """
import sys, time
from mmsec.cache import EmbeddingCache
from mmsec.data import imagefolder
from mmsec.evaluation.embed import fill_cache
from mmsec.model import load_model

model = load_model("zoo:shapes", device="cpu")
real = model.encode_image
def slow(x):
    time.sleep(0.15)
    return real(x)
model.encode_image = slow
ds = imagefolder(sys.argv[1], split="train", image_size=32)
fill_cache(model, ds, EmbeddingCache(sys.argv[2]), batch_size=4, workers=1,
           progress=False, flush_every=8)
print("finished")
"""


def test_a_sigkilled_encode_resumes_where_its_shards_end(env, zoo_model):
    folder = _folder(env / "imgs", n=60)
    cache_dir = env / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(folder), str(cache_dir)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not list(cache_dir.glob("embeddings/*/image/shard-*.safetensors")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no shard written in 60 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL and b"finished" not in out

    ds = imagefolder(str(folder), split="train", image_size=32)
    cache = EmbeddingCache(cache_dir)
    kept = sum(cache.contains(zoo_model.fingerprint, "image",
                              [ds.key(i) for i in range(len(ds))]))
    assert 8 <= kept < len(ds)
    report = fill_cache(zoo_model, ds, cache, batch_size=4, workers=1, progress=False)
    assert (report.cached, report.encoded) == (kept, len(ds) - kept)
    resumed = encode_images(zoo_model, ds, cache, progress=False)
    whole = encode_images(zoo_model, ds, EmbeddingCache(env / "whole"), progress=False,
                          workers=0)
    assert torch.allclose(resumed, whole, atol=1e-6, rtol=0)


def test_a_file_corrupted_after_the_scan_is_skipped_with_a_warning(env, zoo_model, caplog):
    folder = _folder(env / "imgs")
    ds = imagefolder(str(folder), split="train", image_size=32)
    victim = ds.files[3]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated after the scan
    cache = EmbeddingCache(env / "c")
    with caplog.at_level(logging.WARNING):
        report = fill_cache(zoo_model, ds, cache, batch_size=4, workers=2, progress=False)
    assert [p for p, _ in report.skipped] == [str(victim)]
    assert report.encoded == len(ds) - 1 and "skipped" in caplog.text
    assert victim.name in caplog.text
    with pytest.raises(MmsecError, match=r"1 image\(s\) .* failed to load .* new scan"):
        encode_images(zoo_model, ds, cache, batch_size=4, progress=False, workers=0)
    with pytest.raises(MmsecError, match=r"1 image\(s\) .* failed to load"):
        fill_cache(zoo_model, ds, cache, workers=0, progress=False, strict=True)
    again = imagefolder(str(folder), split="train", image_size=32)  # the scan leaves it out
    assert again.skipped == 1 and len(again) == len(ds) - 1
    before = cache.stats.encoded
    encode_images(zoo_model, again, cache, progress=False)
    assert cache.stats.encoded == before  # everything else was cached


def test_the_scan_memo_is_used_and_a_bad_memo_is_ignored(env, monkeypatch, caplog):
    folder = _folder(env / "imgs")
    scans = []
    real = data_files._scan_file
    monkeypatch.setattr(data_files, "_scan_file", lambda p: (scans.append(p), real(p))[1])
    first = imagefolder(str(folder), split="train")
    n = len(first)
    assert len(scans) == n
    memo = list((env / "cache" / "scan").glob("*.jsonl"))
    assert len(memo) == 1

    def build():
        scans.clear()
        data_files._SCAN_MEMO.clear()  # as a new process
        ds = imagefolder(str(folder), split="train")
        assert [ds.key(i) for i in range(len(ds))] == [first.key(i) for i in range(n)]
        return len(scans)

    assert build() == 0  # a resumed run stats the files, decodes none

    data = bytearray(memo[0].read_bytes())
    data[-10] ^= 0x01  # damaged on disk: the checksum fails
    memo[0].write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert build() == n
    assert "ignoring the scan memo" in caplog.text and "checksum" in caplog.text
    assert build() == 0  # rewritten whole

    entries = data_files._memo_load(memo[0])  # well-formed, but wrong about these files
    forged = {k: data_files._FileInfo(sha1="0" * 40, size=v.size, format=v.format)
              for k, v in entries.items()}
    data_files._memo_save(memo[0], forged)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert build() == n
    assert "does not have the hash it records" in caplog.text

    memo[0].write_text("not json at all\n")
    assert build() == n
    monkeypatch.setenv("MMSEC_SCAN_MEMO", "0")
    assert build() == n


def test_cache_encode_command(env):
    folder = _folder(env / "imgs")
    res = invoke("cache", "encode", "-d", f"imagefolder:{folder}", "--split", "train",
                 "--workers", "1", "--batch-size", "4", "-q")
    assert res.exit_code == 0, res.output
    assert "0 already cached, 0 skipped (corrupt)" in res.stdout and "img/s" in res.stdout
    n = int(res.stdout.split()[0])
    res = invoke("cache", "encode", "-d", f"imagefolder:{folder}", "--split", "train", "-q")
    assert res.exit_code == 0 and f"0 encoded now, {n} already cached" in res.stdout

    missing = invoke("cache", "encode", "-d", f"imagefolder:{env / 'nope'}")
    assert missing.exit_code == 1
    assert missing.stderr.strip().splitlines() == [
        f"Error: imagefolder: directory not found: {env / 'nope'}"]
    unknown = invoke("cache", "encode", "-m", "zoo:nope", "-d", f"imagefolder:{folder}")
    assert unknown.exit_code == 2 and len(unknown.stderr.strip().splitlines()) == 1
    assert "unknown zoo model 'nope'" in unknown.stderr
    bad = invoke("cache", "encode", "--workers", "-1")
    assert bad.exit_code == 2


def test_a_file_that_rots_in_place_leaves_the_scan_memo_when_it_fails_to_load(env, zoo_model):
    folder = _folder(env / "imgs")
    ds = imagefolder(str(folder), split="train", image_size=32)  # memoised on disk
    victim = ds.files[2]
    data = victim.read_bytes()
    victim.write_bytes(data[:20] + b"\0" * (len(data) - 20))  # same size ...
    os.utime(victim, (OLD, OLD))  # ... and mtime: the memo's key still matches
    data_files._SCAN_MEMO.clear()
    report = fill_cache(zoo_model, ds, EmbeddingCache(env / "c"), workers=0, progress=False)
    assert [p for p, _ in report.skipped] == [str(victim)]
    data_files._SCAN_MEMO.clear()
    again = imagefolder(str(folder), split="train", image_size=32)
    assert again.skipped == 1 and str(victim) in again.skipped_items[0][0]
