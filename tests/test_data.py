"""Data sources: procedural, imagefolder, captions, fashion-mnist, torchvision, corrupt files."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmsec import data
from mmsec.data import (
    FileImageDataset,
    ImageDataset,
    builtin_sources,
    load_dataset,
    parse_spec,
    read_idx,
    subset,
)
from mmsec.data import files as data_files
from mmsec.errors import MmsecError, UsageError

SOURCES = {s.name: s for s in builtin_sources()}
FASHION_DIR = Path(data.FASHION_MNIST_DIR)


def _img(path: Path, colour=(200, 30, 30), size=(16, 12), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[...] = colour
    arr[: size[1] // 2, : size[0] // 2] = 255 - np.array(colour, np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def _folder(root: Path, classes=("dog", "cat", "hot_dog"), per_class=6, size=(16, 12)) -> Path:
    for c, cls in enumerate(classes):
        for i in range(per_class):
            _img(root / cls / f"{i:03d}.png", colour=(40 * c % 256, 20 * i % 256, 90), size=size)
    return root


@pytest.fixture(autouse=True)
def _clear_scan_memo():
    data_files._SCAN_MEMO.clear()
    yield
    data_files._SCAN_MEMO.clear()


# --------------------------------------------------------------------------- procedural
@pytest.fixture
def procedural(monkeypatch, tmp_path):
    monkeypatch.setenv("MMSEC_CACHE_DIR", str(tmp_path / "cache"))
    pytest.importorskip("mmsec.runs", reason="mmsec.runs (write_atomic) is not written yet")
    return data.procedural_shapes


def test_procedural_is_deterministic(procedural, tmp_path):
    a = procedural(split="test", seed=0, n=40)
    b = procedural(split="test", seed=0, n=40)  # second time from the on-disk memo
    assert list((tmp_path / "cache" / "procedural").iterdir())
    assert torch.equal(a.images, b.images)
    assert [a.key(i) for i in range(40)] == [b.key(i) for i in range(40)]
    data_files._SCAN_MEMO.clear()
    for f in (tmp_path / "cache" / "procedural").iterdir():
        f.unlink()
    c = procedural(split="test", seed=0, n=40)  # rendered again: same bytes
    assert c.images.numpy().tobytes() == a.images.numpy().tobytes()
    d = procedural(split="test", seed=1, n=40)
    assert not torch.equal(a.images, d.images)
    e = procedural(split="train", seed=0, n=40)
    assert not torch.equal(a.images, e.images)


def test_procedural_renders_in_worker_processes_to_the_same_bytes(procedural, tmp_path,
                                                                  monkeypatch):
    from mmsec.data import procedural as module

    monkeypatch.setenv("MMSEC_RENDER_WORKERS", "0")
    serial = procedural(split="val", seed=3, n=45)
    for f in (tmp_path / "cache" / "procedural").iterdir():
        f.unlink()
    monkeypatch.setattr(module, "_CHUNK", 10)  # 5 chunks over 2 forked workers
    monkeypatch.setenv("MMSEC_RENDER_WORKERS", "2")
    with module._pool(5) as pool:
        assert pool is not None
    parallel = procedural(split="val", seed=3, n=45)
    assert parallel.images.numpy().tobytes() == serial.images.numpy().tobytes()
    monkeypatch.setenv("MMSEC_RENDER_WORKERS", "two")
    with pytest.raises(UsageError, match="MMSEC_RENDER_WORKERS"):
        with module._pool(5):
            pass


def test_procedural_labels_captions(procedural):
    ds = procedural(split="test", seed=0, n=50)
    assert len(ds) == 50 and ds.classnames is not None and len(ds.classnames) == 10
    assert ds.labels().bincount(minlength=10).tolist() == [5] * 10
    img, label = ds[3]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert ds.has_captions
    for i in range(len(ds)):
        caps = ds.captions(i)
        assert caps and all(ds.classnames[int(ds.labels()[i])] in c for c in caps)
    with pytest.raises(UsageError, match="unknown split"):
        procedural(split="nope")


# --------------------------------------------------------------------------- imagefolder
def test_imagefolder_classes_and_hashed_split(tmp_path):
    root = _folder(tmp_path / "pets", per_class=20)
    train = data.imagefolder(str(root), split="train")
    test = data.imagefolder(str(root), split="test")
    assert train.classnames == test.classnames == ["cat", "dog", "hot dog"]
    assert isinstance(train, FileImageDataset) and train.skipped == 0
    names_train = {f.relative_to(root).as_posix() for f in train.files}
    names_test = {f.relative_to(root).as_posix() for f in test.files}
    assert not names_train & names_test and len(names_train | names_test) == 60
    assert 30 <= len(names_train) <= 58  # about 80 %
    # labels follow the folders
    for ds in (train, test):
        for i in range(len(ds)):
            assert ds.classnames[ds.labels()[i]].replace(" ", "_") == ds.files[i].parent.name
    # adding files never moves existing ones to the other split
    _folder(root, classes=("cat", "dog", "hot_dog", "zebra"), per_class=30)
    train2 = data.imagefolder(str(root), split="train")
    names_train2 = {f.relative_to(root).as_posix() for f in train2.files}
    assert names_train <= names_train2
    assert not names_train2 & names_test
    assert train2.classnames == ["cat", "dog", "hot dog", "zebra"]
    assert data.imagefolder(str(root), split="val").files == data.imagefolder(str(root)).files


def test_imagefolder_items_keys_and_sizes(tmp_path):
    root = tmp_path / "mixed"
    _img(root / "a" / "1.png", size=(16, 12))
    _img(root / "a" / "2.jpg", size=(20, 20), fmt="JPEG")
    _img(root / "b" / "1.png", size=(8, 8))
    ds = data.imagefolder(str(root), split="train")
    ds_all = [data.imagefolder(str(root), split=s) for s in ("train", "test")]
    n = sum(len(d) for d in ds_all)
    assert n == 3
    # explicit size: square; native size: first image's
    for d in ds_all:
        if len(d):
            x, y = d[0]
            assert x.shape[0] == 3 and x.dtype == torch.float32 and 0 <= y <= 1
    sized = data.imagefolder(str(root), split="train", image_size=24)
    assert all(sized[i][0].shape == (3, 24, 24) for i in range(len(sized)))
    batch = torch.stack([ds[i][0] for i in range(len(ds))])  # collates
    assert batch.shape[0] == len(ds)
    first = ds.files[0]
    w, h = Image.open(first).size
    assert ds[0][0].shape == (3, h, w)
    assert ds.key(0) == hashlib.sha1(first.read_bytes()).hexdigest()
    assert sized.key(0) != ds.key(0)  # resized pixels, different key
    assert ds.captions(0) == [ds.templates[0].format(ds.classnames[int(ds.labels()[0])])]
    assert not ds.has_captions


def test_imagefolder_train_test_dirs(tmp_path):
    root = tmp_path / "split"
    _folder(root / "train", classes=("b", "a"), per_class=3)
    _folder(root / "val", classes=("a", "c"), per_class=2)
    train = data.imagefolder(str(root), split="train")
    test = data.imagefolder(str(root), split="test")  # falls back to val/
    assert train.classnames == test.classnames == ["a", "b", "c"]
    assert len(train) == 6 and len(test) == 4
    assert sorted(test.labels().tolist()) == [0, 0, 2, 2]
    assert all("val" in f.parts for f in test.files)


def test_imagefolder_is_lazy_and_scans_once(tmp_path, monkeypatch):
    root = _folder(tmp_path / "lazy", per_class=4)
    ds = data.imagefolder(str(root), split="train")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    again = data.imagefolder(str(root), split="train")  # scan results are memoised
    assert opened == [] and again.files == ds.files
    ds.labels(), ds.captions(0), ds.key(0), len(ds)  # none of these decode
    assert opened == []
    ds[0]
    assert opened == [1]


def test_corrupt_images_skipped_and_strict(tmp_path, caplog):
    root = _folder(tmp_path / "bad", classes=("x", "y"), per_class=3)
    good = _img(tmp_path / "tmp.jpg", size=(64, 64), fmt="JPEG").read_bytes()
    (root / "x" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "y" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    (root / "y" / "notes.txt").write_text("ignored: not an image extension")
    with caplog.at_level(logging.WARNING, logger="mmsec.data"):
        parts = [data.imagefolder(str(root), split=s) for s in ("train", "test")]
    assert sum(p.skipped for p in parts) == 2
    assert sum(len(p) for p in parts) == 6
    assert "skipped" in caplog.text and ("truncated.jpg" in caplog.text or "garbage" in caplog.text)
    # every split, in one place: a flat folder has no other split when all files are in train/
    flat = tmp_path / "flat"
    for name in ("x", "y"):
        for f in (root / name).iterdir():
            dst = flat / "train" / name / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(f.read_bytes())
    _img(flat / "test" / "x" / "t.png")
    ds = data.imagefolder(str(flat), split="train")
    assert ds.skipped == 2 and len(ds) == 6
    assert all(ds[i][0].shape == ds[0][0].shape for i in range(len(ds)))
    with pytest.raises(MmsecError, match=r"cannot decode image .*(truncated\.jpg|garbage\.png)"):
        data.imagefolder(str(flat), split="train", strict=True)


def test_all_corrupt_or_empty_is_an_error(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(MmsecError, match="no image files"):
        data.imagefolder(str(tmp_path / "empty"))
    bad = tmp_path / "allbad" / "train" / "cls"
    bad.mkdir(parents=True)
    (tmp_path / "allbad" / "test").mkdir()
    (bad / "a.png").write_bytes(b"junk")
    with pytest.raises(MmsecError, match="no usable images"):
        data.imagefolder(str(tmp_path / "allbad"), split="train")


def test_missing_paths(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(MmsecError, match=re.escape(f"not found: {missing}")):
        data.imagefolder(str(missing))
    with pytest.raises(MmsecError, match=re.escape(f"not found: {missing}")):
        data.captions_file(str(missing / "c.csv"))
    with pytest.raises(MmsecError, match="not found"):
        load_dataset("imagefolder:/nonexistent", sources=SOURCES)
    with pytest.raises(UsageError, match="needs an argument"):
        load_dataset("imagefolder", sources=SOURCES)
    with pytest.raises(UsageError, match="unknown dataset"):
        load_dataset("nosuchset:x", sources=SOURCES)


def test_parse_spec_routes_bare_paths(tmp_path):
    root = _folder(tmp_path / "d", per_class=5)
    csv = tmp_path / "c.csv"
    csv.write_text("image,caption\nd/cat/000.png,a cat\n")
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"image": "d/cat/000.png", "caption": "a cat"}) + "\n")
    assert parse_spec(str(root)) == ("imagefolder", str(root))
    assert parse_spec(str(csv)) == ("captions", str(csv))
    assert parse_spec(str(jsonl)) == ("captions", str(jsonl))
    assert parse_spec("imagefolder:/x/y") == ("imagefolder", "/x/y")
    assert parse_spec("fashion-mnist") == ("fashion-mnist", None)
    assert parse_spec(None) == (data.DEFAULT_DATASET, None)
    ds = load_dataset(str(root), split="train", sources=SOURCES)
    assert ds.classnames == ["cat", "dog", "hot dog"]
    assert len(load_dataset(str(csv), sources=SOURCES)) == 1


# --------------------------------------------------------------------------- captions
def test_captions_csv(tmp_path):
    _img(tmp_path / "img" / "a.png", colour=(10, 200, 10))
    _img(tmp_path / "img" / "b.jpg", colour=(10, 10, 200), fmt="JPEG")
    _img(tmp_path / "img" / "c.png", colour=(200, 10, 10))
    f = tmp_path / "caps.csv"
    f.write_text(
        "image,captions,label\n"
        "img/a.png,a green square|a square that is green, square\n"
        'img/b.jpg,"a blue thing, with a comma",circle\n'
        "img/c.png,a red square,square\n"
    )
    ds = data.captions_file(str(f))
    assert ds.has_captions and len(ds) == 3 and ds.skipped == 0
    assert ds.captions(0) == ["a green square", "a square that is green"]
    assert ds.captions(1) == ["a blue thing, with a comma"]
    assert ds.classnames == ["circle", "square"]
    assert ds.labels().tolist() == [1, 0, 1]
    img, label = ds[1]
    assert img.shape == (3, 12, 16) and label == 0
    assert load_dataset(f"captions:{f}", split="train", sources=SOURCES).captions(2) == [
        "a red square"
    ]


def test_captions_csv_single_caption_and_split(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png", colour=(1, 2, 3))
    f = tmp_path / "caps.csv"
    f.write_text("image,caption,split\na.png,one | with a bar,train\nb.png,two,test\n")
    train = data.captions_file(str(f), split="train")
    test = data.captions_file(str(f), split="test")
    assert train.captions(0) == ["one | with a bar"] and test.captions(0) == ["two"]
    assert len(train) == len(test) == 1 and train.classnames is None
    assert train.labels().tolist() == [-1] and train.captions(0)
    assert data.captions_file(str(f), split="val").captions(0) == ["two"]  # val -> test
    only_train = tmp_path / "train_only.csv"
    only_train.write_text("image,caption,split\na.png,x,train\n")
    with pytest.raises(MmsecError, match="no rows for split 'test'.*splits there: train"):
        data.captions_file(str(only_train), split="test")
    no_image = tmp_path / "bad.csv"
    no_image.write_text("file,caption\na.png,x\n")
    with pytest.raises(MmsecError, match=re.escape(str(no_image)) + ".*no 'image' column"):
        data.captions_file(str(no_image))


def test_captions_jsonl(tmp_path):
    _img(tmp_path / "imgs" / "0.png", colour=(255, 0, 0))
    _img(tmp_path / "imgs" / "1.png", colour=(0, 255, 0))
    _img(tmp_path / "imgs" / "2.png", colour=(0, 0, 255))
    sub = tmp_path  # image paths are relative to the file's folder, inside it
    rows = [
        {"image": "imgs/0.png", "captions": ["red one", "a red image"], "label": 2},
        {"image": "./imgs/1.png", "caption": "green one", "label": 0},
        {"image": "imgs/2.png", "captions": ["blue"], "split": "train"},
    ]
    f = sub / "caps.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    test = data.captions_file(str(f))
    assert len(test) == 2 and test.classnames is None
    assert test.captions(0) == ["red one", "a red image"] and test.captions(1) == ["green one"]
    assert test.labels().tolist() == [2, 0]
    train = data.captions_file(str(f), split="train")
    assert len(train) == 3 and train.labels().tolist() == [2, 0, -1]
    # string labels -> sorted class names
    rows2 = [
        {"image": "imgs/0.png", "caption": "r", "label": "red"},
        {"image": "imgs/1.png", "caption": "g", "label": "green"},
    ]
    f2 = sub / "named.jsonl"
    f2.write_text("\n".join(json.dumps(r) for r in rows2))
    named = data.captions_file(str(f2))
    assert named.classnames == ["green", "red"] and named.labels().tolist() == [1, 0]
    bad = sub / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(MmsecError, match=r"bad\.jsonl:2: invalid JSON"):
        data.captions_file(str(bad))


def test_captions_missing_and_corrupt_images(tmp_path, caplog):
    _img(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nxxxx")
    f = tmp_path / "c.csv"
    f.write_text("image,caption\nok.png,fine\nbroken.png,bad\nmissing.png,gone\n")
    with caplog.at_level(logging.WARNING, logger="mmsec.data"):
        ds = data.captions_file(str(f))
    assert len(ds) == 1 and ds.skipped == 2 and ds.captions(0) == ["fine"]
    assert "broken.png" in caplog.text
    with pytest.raises(MmsecError, match=r"broken\.png"):
        data.captions_file(str(f), strict=True)


def test_subset_keeps_file_dataset_metadata(tmp_path):
    root = _folder(tmp_path / "s", per_class=10)
    ds = data.imagefolder(str(root), split="train")
    sub = subset(ds, 5, seed=1)
    assert isinstance(sub, ImageDataset) and len(sub) == 5
    assert sub.classnames == ds.classnames
    assert torch.equal(sub.labels(), ds.labels()[sub.indices])
    assert sub.key(0) == ds.key(sub.indices[0])


# --------------------------------------------------------------------------- fashion-mnist
def _write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> Path:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, ">u4").tobytes()
    payload = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


@pytest.mark.skipif(
    not FASHION_DIR.is_dir(), reason=f"{FASHION_DIR} absent (apt-get install dataset-fashion-mnist)"
)
def test_fashion_mnist_real_files():
    train = load_dataset("fashion-mnist", split="train", sources=SOURCES)
    test = data.fashion_mnist(None, split="test")
    assert len(train) == 60000 and len(test) == 10000
    assert test.classnames[0] == "t-shirt" and test.classnames[9] == "ankle boot"
    assert test.labels().bincount().tolist() == [1000] * 10
    img, label = test[0]
    assert img.shape == (3, 28, 28) and 0 <= label < 10
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    assert img.max() > 0.5
    assert "{}" in test.templates[0] and test.captions(0)


def test_fashion_mnist_from_dir_and_corrupt(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (7, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(7) % 10, gz=False)
    ds = data.fashion_mnist(str(tmp_path))
    assert len(ds) == 7 and ds.labels().tolist() == list(range(7))
    assert read_idx(tmp_path / "t10k-labels-idx1-ubyte").shape == (7,)
    # wrong magic
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x01\x02\x03abcd"))
    with pytest.raises(MmsecError, match=r"bad magic number.*t10k-images-idx3-ubyte\.gz"):
        data.fashion_mnist(str(tmp_path))
    # truncated data
    good = _write_idx(tmp_path / "x.gz", rng.integers(0, 256, (7, 28, 28)))
    raw = gzip.decompress(good.read_bytes())
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(MmsecError, match=r"t10k-images-idx3-ubyte\.gz is truncated or corrupt"):
        data.fashion_mnist(str(tmp_path))
    # not even gzip
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bgarbage")
    with pytest.raises(MmsecError, match=r"t10k-images-idx3-ubyte\.gz"):
        data.fashion_mnist(str(tmp_path))
    # label count mismatch
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (5, 28, 28)))
    with pytest.raises(MmsecError, match="5 images but"):
        data.fashion_mnist(str(tmp_path))


def test_fashion_mnist_missing(tmp_path):
    with pytest.raises(MmsecError, match="apt-get install dataset-fashion-mnist") as err:
        data.fashion_mnist(str(tmp_path / "none"))
    assert "t10k-images-idx3-ubyte" in str(err.value) and str(tmp_path / "none") in str(err.value)
    with pytest.raises(MmsecError, match="missing train-images"):
        data.fashion_mnist(str(tmp_path), split="train")
    with pytest.raises(UsageError, match="unknown split"):
        data.fashion_mnist(str(tmp_path), split="val")


# --------------------------------------------------------------------------- torchvision
def test_torchvision_sources_registered():
    for name in ("cifar10", "cifar100", "stl10", "mnist"):
        assert SOURCES[name].needs_arg and SOURCES[name].description


def test_torchvision_missing_root(tmp_path):
    with pytest.raises(MmsecError, match="not found"):
        load_dataset(f"cifar10:{tmp_path / 'none'}", sources=SOURCES)
    with pytest.raises(MmsecError, match="not found under .*download it with torchvision"):
        load_dataset(f"cifar10:{tmp_path}", sources=SOURCES)


def test_torchvision_mnist_from_fake_files(tmp_path):
    pytest.importorskip("torchvision")
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix in ("train", "t10k"):  # torchvision wants both splits' files
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (4, 28, 28)), gz=False)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.array([3, 1, 4, 1]), gz=False)
    ds = load_dataset(f"mnist:{tmp_path}", sources=SOURCES)
    assert len(ds) == 4 and ds.labels().tolist() == [3, 1, 4, 1]
    assert ds.classnames[3] == "three"
    img, _ = ds[0]
    assert img.shape == (3, 28, 28) and torch.equal(img[0], img[2])
