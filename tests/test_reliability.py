"""Reliability under faults and hostile input (issue 18): each test pins one defect class.

Fast by design: run folders, recipes and data sources are exercised below the training
loops (the kill -9/resume runs live in test_advclip.py, test_backdoor.py, test_cpgc.py,
test_invertune.py and test_train.py).
"""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from mmsec.errors import MmsecError, UsageError
from mmsec.runs import Run


# ------------------------------------------------------------------ recipes: folder names
@pytest.mark.parametrize("name", ["../../escape", "/etc/x", "a/b", "..", "x" * 65, ".hidden"])
def test_recipe_name_that_is_not_a_plain_folder_name_is_refused(name: str) -> None:
    from mmsec.recipes import parse_recipe

    text = json.dumps({"name": name, "steps": [{"id": "a", "kind": "eval"}]})
    with pytest.raises(UsageError, match="name"):
        parse_recipe(text, "r.yaml")


def test_recipe_folder_stays_inside_the_runs_root(tmp_path: Path, monkeypatch) -> None:
    from mmsec.api import _recipe_root

    monkeypatch.chdir(tmp_path)
    first = _recipe_root(None, "../../../escape")  # a file stem is not validated by the schema
    second = _recipe_root(None, "../../../escape")
    for root in (first, second):
        assert root.resolve().parent == (tmp_path / "mmsec-runs").resolve()
    assert first != second  # the same second twice: a fresh folder, not a shared one


def test_recipe_out_that_holds_files_is_refused_and_left_alone(tmp_path: Path) -> None:
    from mmsec.api import run_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - {id: a, kind: eval}\n")
    out = tmp_path / "project"
    out.mkdir()
    (out / "summary.md").write_text("mine")
    with pytest.raises(UsageError, match="already holds"):
        run_recipe(recipe, out=out)
    assert (out / "summary.md").read_text() == "mine"


# ------------------------------------------------------------------ recipes: hostile YAML
def test_yaml_alias_bomb_is_refused_before_it_expands() -> None:
    from mmsec.recipes import parse_recipe

    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    bomb = "\n".join(lines) + "\nsteps: [{id: a, kind: eval}]\n"
    assert len(bomb) < 2000
    with pytest.raises(UsageError, match="expands to more than"):
        parse_recipe(bomb, "bomb.yaml")


@pytest.mark.parametrize("text", ["steps: &s [*s]\n", "steps: " + "[" * 5000 + "]" * 5000])
def test_recursive_or_deeply_nested_yaml_is_one_usage_error(text: str) -> None:
    from mmsec.recipes import parse_recipe

    with pytest.raises(UsageError, match="YAML error"):
        parse_recipe(text, "deep.yaml")


def test_yaml_python_tag_is_refused_and_never_run(tmp_path: Path) -> None:
    from mmsec.recipes import parse_recipe

    marker = tmp_path / "ran"
    text = f"name: !!python/object/apply:os.system ['touch {marker}']\nsteps: []\n"
    with pytest.raises(UsageError, match="tag"):
        parse_recipe(text, "tag.yaml")
    assert not marker.exists()


# ------------------------------------------------------------------ run folders
def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_finishing_never_leaves_completed(tmp_path: Path, monkeypatch) -> None:
    from mmsec import runs

    real = runs.write_atomic

    def full_for_config(path, data):
        if Path(path).name == runs.CONFIG_FILE:
            _enospc()
        return real(path, data)

    monkeypatch.setattr(runs, "write_atomic", full_for_config)
    with pytest.raises(OSError, match="No space"):
        with Run.create(tmp_path / "r", "eval", None, quiet=True) as run:
            run.finish({"clean_top1": 0.9})
    status = json.loads((tmp_path / "r" / "results.json").read_text())
    assert status["status"] == "failed" and "No space left" in status["error"]


def test_disk_full_for_every_write_keeps_the_original_error(tmp_path: Path,
                                                            monkeypatch) -> None:
    from mmsec import runs

    run = Run.create(tmp_path / "r", "eval", None, quiet=True)
    monkeypatch.setattr(runs, "write_atomic", _enospc)
    monkeypatch.setattr(runs, "write_json_atomic", _enospc)
    with pytest.raises(RuntimeError, match="the plugin broke"):
        with run:
            raise RuntimeError("the plugin broke")
    # the results.json written at the start still says "running", never "completed"
    assert json.loads((tmp_path / "r" / "results.json").read_text())["status"] == "running"


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MB tmpfs (skipped where mounting is not permitted: not root, no tmpfs)."""
    import shutil
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small disk")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.strip() or made.returncode}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("free_kb", [4, 40, 200])
def test_a_real_full_disk_under_a_run_and_its_cache(small_disk: Path, free_kb: int,
                                                    monkeypatch) -> None:
    """The run folder and the cache on a disk that fills up part-way (at the start, while
    finishing, while saving artifacts): one error line that says the disk is full, never
    "completed", checkpoints intact; with space again, --resume completes the run."""
    import os

    from mmsec.data import procedural
    from mmsec.io import load_tensors
    from mmsec.testing import invoke

    monkeypatch.setitem(procedural.PROCEDURAL_SIZES, "train", 512)
    monkeypatch.setenv("MMSEC_CACHE_DIR", str(small_disk / "cache"))
    st = os.statvfs(small_disk)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - free_kb * 1024))
    run = small_disk / "run"
    args = ["attack", "-p", "uap", "-o", "train_items", "64", "-o", "epochs", "2",
            "-o", "batch_size", "32", "--limit", "32", "--knn-bank", "0", "--device", "cpu",
            "-q", "--out", run]
    failed = invoke(*args)
    assert failed.exit_code == 1, failed.output
    errors = [line for line in failed.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "the disk is full" in errors[0], failed.stderr
    assert "Traceback" not in failed.stderr and "Logging error" not in failed.stderr
    assert json.loads((run / "results.json").read_text())["status"] in ("running", "failed")
    assert not list(small_disk.rglob("*.tmp"))  # no half-written file left behind
    for checkpoint in (run / "checkpoints").glob("*.safetensors"):
        assert load_tensors(checkpoint)[0]  # complete, or not there at all

    filler.unlink()
    done = invoke(*args, "--resume")
    assert done.exit_code == 0, done.output
    assert json.loads((run / "results.json").read_text())["status"] == "completed"


def test_out_into_a_folder_of_other_files_is_refused(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("mine: true\n")
    with pytest.raises(UsageError, match="holds no mmsec run"):
        Run.create(project, "eval", None, quiet=True)
    assert (project / "config.yaml").read_text() == "mine: true\n"
    Run.create(tmp_path / "empty", "eval", None, quiet=True).close()  # new: fine


def _run_with(path: Path, config: dict, resume: bool = False) -> Run:
    run = Run.create(path, "attack", "advclip", resume=resume, quiet=True)
    run.set("config", config)
    return run


def test_resume_with_changed_settings_is_refused_naming_them(tmp_path: Path) -> None:
    start = {"seed": 0, "device": "cpu", "options": {"lr": 0.01, "area": 0.03, "epochs": 2}}
    run = _run_with(tmp_path / "r", start)
    run.save_checkpoint({"w": torch.zeros(2)}, {"step": 1})
    run.close()
    changed = {"seed": 1, "device": "cpu", "options": {"lr": 0.02, "area": 0.03, "epochs": 2}}
    again = _run_with(tmp_path / "r", changed, resume=True)
    with pytest.raises(UsageError) as info:
        with again:
            again.load_checkpoint()
    message = str(info.value)
    assert "options.lr 0.01 -> 0.02" in message and "seed 0 -> 1" in message
    assert "area" not in message and "\n" not in message and info.value.exit_code == 2
    # refusing writes nothing over the run it holds
    assert not (tmp_path / "r" / "config.yaml").exists()
    # the documented safe keys (device, a longer schedule) resume
    safe = {"seed": 0, "device": "cuda", "options": {"lr": 0.01, "area": 0.03, "epochs": 5}}
    with _run_with(tmp_path / "r", safe, resume=True) as ok:
        state, meta = ok.load_checkpoint()
        assert meta == {"step": 1} and torch.equal(state["w"], torch.zeros(2))


# ------------------------------------------------------------------ procedural memo
def test_procedural_memo_corruption_is_found_and_rerendered(tmp_path: Path, monkeypatch,
                                                            caplog) -> None:
    from mmsec.cache import EmbeddingCache
    from mmsec.data import procedural

    monkeypatch.setenv("MMSEC_CACHE_DIR", str(tmp_path))
    fresh = procedural._procedural_array(3, "val", 40, 16)
    (memo,) = (tmp_path / "procedural").iterdir()
    blob = bytearray(memo.read_bytes())
    blob[-500:-400] = bytes(100)  # zero some pixels: still a valid .npy of the right shape
    memo.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="mmsec.data"):
        again = procedural._procedural_array(3, "val", 40, 16)
    assert "checksum mismatch" in caplog.text
    assert np.array_equal(again, fresh)
    assert procedural._read_memo(memo, (40, 16, 16, 3)) is not None  # rewritten whole
    assert EmbeddingCache(tmp_path).clear() > 0
    assert not (tmp_path / "procedural").exists()


def test_limit_beyond_a_procedural_split_is_capped(caplog) -> None:
    from mmsec.data import procedural

    with caplog.at_level(logging.WARNING, logger="mmsec.data"):
        ds = procedural.procedural_shapes(split="val", n=5000, image_size=8)
    assert len(ds) == procedural.PROCEDURAL_SIZES["val"]
    assert "using all 2000, not 5000" in caplog.text


# ------------------------------------------------------------------ caption files
def _png(path: Path, size=(20, 10), colour=(200, 0, 0)) -> Path:
    from PIL import Image

    Image.new("RGB", size, colour).save(path)
    return path


@pytest.mark.parametrize("image", ["/etc/hostname", "../outside.png", "sub/../../x.png",
                                   "~/x.png", ""])
def test_caption_image_paths_are_confined_to_the_files_folder(tmp_path: Path, image: str):
    from mmsec.data.files import captions_file

    _png(tmp_path / "outside.png")
    folder = tmp_path / "data"
    folder.mkdir()
    _png(folder / "ok.png")
    csv = folder / "caps.csv"
    csv.write_text(f'image,caption\nok.png,a red box\n"{image}",a thing\n')
    with pytest.raises(MmsecError, match="must be relative to the file's folder"):
        captions_file(str(csv))


def test_caption_rows_may_leave_the_label_out(tmp_path: Path, zoo_model) -> None:
    from mmsec.data.files import captions_file
    from mmsec.evaluation import Evaluation
    from mmsec.evaluation.probes import BUILTIN_METRICS

    for i in range(4):
        _png(tmp_path / f"{i}.png", colour=(60 * i, 0, 0))
    (tmp_path / "c.jsonl").write_text(
        '{"image": "0.png", "caption": "a red square", "label": "red"}\n'
        '{"image": "1.png", "caption": "a dark square"}\n'
        '{"image": "2.png", "caption": "a red circle", "label": "red"}\n'
        '{"image": "3.png", "caption": "a blue square", "label": "blue"}\n')
    ds = captions_file(str(tmp_path / "c.jsonl"), image_size=32)
    assert ds.labels().tolist() == [1, -1, 1, 0]
    from mmsec.cache import EmbeddingCache

    ev = Evaluation(zoo_model, ds, EmbeddingCache(tmp_path / "cache"),
                    metrics=list(BUILTIN_METRICS))
    rows = {(r.metric, r.n_items) for r in ev.measure([ev.clean()])}
    assert ("top1", 3) in rows  # zero-shot over the 3 labelled rows; retrieval over all 4
    assert ("i2t_r1", 4) in rows


@pytest.mark.parametrize("text,match", [
    ("image,caption\na.png,a cat, sitting,x\n", "more in this row"),
    ("image,caption\na.png,\"" + "x" * 200_000 + "\"\n", "bad CSV"),
    ("image,caption\na.png,\nb.png,\n", "neither captions nor labels"),
])
def test_bad_caption_csv_is_one_clean_error(tmp_path: Path, text: str, match: str) -> None:
    from mmsec.data.files import captions_file

    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    (tmp_path / "c.csv").write_text(text)
    with pytest.raises(MmsecError, match=match) as info:
        captions_file(str(tmp_path / "c.csv"))
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ image folders
@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory) -> Path:
    """One class of ordinary 20x10 images, plus a 1x1 image and a 16-bit PNG sorted first,
    a 9,000 x 9,000 PNG (a few KB), a name that is not UTF-8, a symlink loop."""
    import os

    from PIL import Image

    root = tmp_path_factory.mktemp("odd")
    cls = root / "red"
    cls.mkdir()
    _png(cls / "00-tiny.png", size=(1, 1), colour=(0, 0, 0))
    Image.fromarray(np.full((10, 20), 30000, dtype=np.uint16)).save(cls / "01-wide.png")
    for i in range(3):
        _png(cls / f"im{i}.png")
    Image.new("RGB", (9000, 9000)).save(cls / "huge.png")
    _png(Path(os.fsdecode(os.path.join(os.fsencode(cls), b"caf\xe9.png"))))
    os.symlink("..", cls / "loop")
    (root / "split-by-hash").mkdir()  # nothing: an empty second class is fine
    return root


def test_odd_image_folder_loads_each_image_right(odd_folder: Path) -> None:
    from mmsec.data.files import MAX_PIXELS, imagefolder

    files = {}
    for split in ("train", "test"):
        ds = imagefolder(str(odd_folder), split=split)
        assert ds.size == (20, 10)  # the common size, not the first file's 1x1
        for i in range(len(ds)):
            files[ds.files[i].name] = (ds.load(i)[0], int(ds.labels()[i]), split)
        assert all(reason.startswith("image too large") for _, reason in ds.skipped_items)
    assert 9000 * 9000 > MAX_PIXELS
    # every file once (the symlink loop is not walked), the huge one left out
    assert sorted(files) == sorted(["00-tiny.png", "01-wide.png", "im0.png", "im1.png",
                                    "im2.png", "caf\udce9.png"])
    wide = files["01-wide.png"][0]
    assert wide.shape == (3, 10, 20)
    assert abs(float(wide.mean()) - 30000 / 65535) < 0.01  # scaled, not clipped white
    assert float(files["im0.png"][0][0].mean()) == pytest.approx(200 / 255, abs=0.01)


def test_huge_image_is_refused_under_strict(odd_folder: Path) -> None:
    from mmsec.data.files import imagefolder

    for split in ("train", "test"):
        try:
            imagefolder(str(odd_folder), split=split, strict=True)
        except MmsecError as exc:
            assert "huge.png" in str(exc) and "too large" in str(exc)
            return
    pytest.fail("huge.png was accepted under --strict")


def test_names_that_are_not_utf8_reach_results_and_report(odd_folder: Path,
                                                          tmp_path: Path) -> None:
    run = Run.create(tmp_path / "r", "eval", None, quiet=True)
    with run:
        run.skipped_items.append({"item": str(odd_folder / "red" / "caf\udce9.png"),
                                  "reason": "test"})
        run.log.warning("skipped %s", "caf\udce9.png")
        run.finish({"clean_top1": 1.0})
    assert "caf" in (tmp_path / "r" / "report.md").read_text()
    assert json.loads((tmp_path / "r" / "results.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("orientation", [1, 6])
def test_big_jpeg_photos_are_decoded_at_a_reduced_scale(tmp_path: Path, monkeypatch,
                                                         orientation: int) -> None:
    """A 2,000 x 1,500 JPEG for 64-pixel images is decoded at 1/8 scale (250 x 188, or
    turned by its EXIF orientation) before the bicubic resize; truncated JPEGs still fail."""
    from PIL import Image

    from mmsec.data import files

    cls = tmp_path / "photos" / "test" / "cat"
    cls.mkdir(parents=True)
    (tmp_path / "photos" / "train" / "cat").mkdir(parents=True)
    yy, xx = np.mgrid[0:1500, 0:2000]
    pixels = np.stack([xx * 255 // 2000, yy * 255 // 1500, (xx + yy) % 256], -1)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels.astype(np.uint8)).save(cls / "big.jpg", quality=90, exif=exif)
    data = (cls / "big.jpg").read_bytes()
    (cls / "cut.jpg").write_bytes(data[: len(data) // 2])
    decoded: list[tuple[int, ...]] = []
    resize = files._resize

    def spy(arr, size):
        decoded.append(arr.shape)
        return resize(arr, size)

    monkeypatch.setattr(files, "_resize", spy)
    ds = files.imagefolder(str(tmp_path / "photos"), image_size=64)
    assert len(ds) == 1 and ds.skipped == 1  # the truncated one, found by the scan
    img, _ = ds.load(0)
    assert img.shape == (3, 64, 64)
    assert decoded == [(188, 250, 3) if orientation == 1 else (250, 188, 3)]
    full = files._resize(files._decode_image(data), (64, 64))  # the old way: full size first
    assert np.abs(img.permute(1, 2, 0).numpy() * 255 - full).mean() < 3


# ------------------------------------------------------------------ checkpoints from strangers
def _tampered(tmp_path: Path, zoo_model, name: str, edit) -> Path:
    """The zoo model saved as a checkpoint, with its tensors or metadata changed by ``edit``."""
    from safetensors.torch import load_file, save_file

    from mmsec.io import load_tensors

    path = zoo_model.save(tmp_path / "orig.safetensors")
    _, meta = load_tensors(path)
    tensors = load_file(str(path))
    edit(tensors, meta)
    save_file(tensors, str(tmp_path / name), metadata=meta)
    return tmp_path / name


def test_absurd_model_spec_in_metadata_is_refused_before_allocating(tmp_path: Path,
                                                                    zoo_model) -> None:
    from mmsec.model import load_model

    def widen(_tensors, meta):
        spec = json.loads(meta["zoo"])
        spec["model_cfg"]["text_cfg"]["width"] = 65536
        meta["zoo"] = json.dumps(spec)

    path = _tampered(tmp_path, zoo_model, "wide.safetensors", widen)
    with pytest.raises(MmsecError, match="describes a model of ~"):
        load_model(pretrained=str(path), device="cpu")

    def absurd_ratio(_tensors, meta):
        spec = json.loads(meta["zoo"])
        spec["model_cfg"]["text_cfg"]["mlp_ratio"] = 1e6
        meta["zoo"] = json.dumps(spec)

    path = _tampered(tmp_path, zoo_model, "ratio.safetensors", absurd_ratio)
    with pytest.raises(MmsecError, match="mlp_ratio"):
        load_model(pretrained=str(path), device="cpu")


@pytest.mark.parametrize("kind", ["int64", "nan"])
def test_integer_or_nan_weights_are_refused_by_name(tmp_path: Path, zoo_model, kind: str):
    from mmsec.model import load_model

    def spoil(tensors, _meta):
        key = "text_projection"
        if kind == "int64":
            tensors[key] = tensors[key].to(torch.int64)
        else:
            tensors[key] = tensors[key].clone()
            tensors[key][0, 0] = float("nan")

    path = _tampered(tmp_path, zoo_model, f"{kind}.safetensors", spoil)
    match = "non-floating weights" if kind == "int64" else "NaN or infinite"
    with pytest.raises(MmsecError, match=match) as info:
        load_model(pretrained=str(path), device="cpu")
    assert "text_projection" in str(info.value)


# ------------------------------------------------------------------ usage errors: one line, exit 2
@pytest.mark.parametrize("args,match", [
    (["--limit", "0"], "--limit 0: use a positive"),
    (["--limit", "-3"], "--limit -3: use a positive"),
    (["--seed", "-1"], "--seed -1: use an integer"),
    (["--seed", "99999999999999999999"], "use an integer from 0"),
    (["--device", "mps"], "MPS is not available"),
    (["--device", "tpu"], "invalid device"),
    (["--out", "x" * 300], "cannot use it as the run folder"),
])
def test_usage_errors_are_one_line_exit_2(tmp_path: Path, monkeypatch, args, match) -> None:
    from mmsec.testing import invoke

    monkeypatch.chdir(tmp_path)
    result = invoke("eval", "--knn-bank", "0", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and match in lines[0], lines
    assert not (tmp_path / "mmsec-runs").exists()  # refused before a run folder exists


@pytest.mark.parametrize("args,match", [
    (["--epochs", "0"], "--epochs 0: use an integer of at least 1"),
    (["--steps", "-2"], "--steps -2: use an integer"),
    (["--min-steps", "-5"], "--min-steps -5"),
    (["--batch-size", "1"], "--batch-size 1: use an integer from 2"),
    (["--lr", "nan"], "--lr nan: use a positive finite"),
    (["--lr", "-1"], "--lr -1.0: use a positive finite"),
    (["--image-size", "100000"], "--image-size 100000: use an integer from 32 to 1024"),
    (["--seed", "-1"], "--seed -1: use an integer from 0"),
    (["--train-items", "0"], "--train-items 0"),
    (["--test-items", "-1"], "--test-items -1"),
])
def test_zoo_train_numbers_out_of_range_are_one_line_exit_2(tmp_path: Path, args,
                                                             match) -> None:
    from mmsec.testing import invoke

    result = invoke("zoo", "train", "--out-dir", tmp_path / "zoo", "--out", tmp_path / "run",
                    *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and match in lines[0], lines
    assert not (tmp_path / "run").exists() and not (tmp_path / "zoo").exists()


def test_cache_folder_that_is_a_file_is_one_line(tmp_path: Path, monkeypatch) -> None:
    from mmsec.testing import invoke

    monkeypatch.chdir(tmp_path)
    (tmp_path / "cachefile").write_text("x")
    monkeypatch.setenv("MMSEC_CACHE_DIR", str(tmp_path / "cachefile"))
    result = invoke("eval", "--knn-bank", "0", "--limit", "4")
    assert result.exit_code == 2 and "is a file, not a folder" in result.stderr
    assert not (tmp_path / "mmsec-runs").exists()


def test_empty_or_hostile_checkpoint_files_are_named(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from mmsec.api import load_artifact
    from mmsec.model import load_model

    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(MmsecError, match=r"empty\.pt: cannot load .* \(EOFError\)"):
        load_model(pretrained=str(tmp_path / "empty.pt"), device="cpu")
    deep = "[" * 100_000 + "]" * 100_000
    for meta in ({"meta": deep}, {"meta": "[1, 2]"}, {"meta": "{}"}):
        save_file({"patch": torch.zeros(3, 4, 4)}, str(tmp_path / "a.safetensors"),
                  metadata={"format": "mmsec-artifact-v2", **meta})
        with pytest.raises(MmsecError, match="artifact"):
            load_artifact(tmp_path / "a.safetensors")


def test_bf16_on_the_cpu_records_the_precision_that_ran(tmp_path: Path) -> None:
    from mmsec import api

    res = api.eval(api.Settings(out=tmp_path / "r", limit=8, device="cpu", precision="bf16",
                                quiet=True), knn_bank=0)
    assert res["precision"] == "fp32" and res["precision_requested"] == "bf16"
    assert "precision: fp32" in (tmp_path / "r" / "config.yaml").read_text()


def test_model_from_an_attack_that_writes_no_model_is_refused_before_running(
        tmp_path: Path) -> None:
    from mmsec.api import run_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - {id: patch, kind: attack, plugin: uap}\n"
                      "  - {id: check, kind: eval, model_from: patch}\n")
    with pytest.raises(UsageError, match='writes no model') as info:
        run_recipe(recipe, out=tmp_path / "out")
    assert 'steps[1] "check"' in str(info.value)
    assert not (tmp_path / "out" / "patch").exists()  # nothing ran


def test_disk_full_in_the_cache_keeps_the_run_going(tmp_path: Path, monkeypatch,
                                                    caplog) -> None:
    from mmsec import cache as mcache

    keys = [f"{i:064x}" for i in range(6)]
    vectors = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4)
    store = mcache.EmbeddingCache(tmp_path / "c")
    store.put("fp", "image", keys[:3], vectors[:3])  # the previous complete state
    monkeypatch.setattr(mcache, "write_atomic", _enospc)
    calls: list[list[int]] = []

    def encode(idx: list[int]) -> torch.Tensor:
        calls.append(list(idx))
        return vectors[idx]

    with caplog.at_level(logging.WARNING, logger="mmsec.cache"):
        out = store.encode("fp", "image", keys, lambda idx: vectors[idx], progress=False)
        again = store.encode("fp", "image", keys, encode, progress=False)
    assert torch.equal(out, vectors) and torch.equal(again, vectors)
    assert calls == []  # the second pass found them in memory
    assert "No space left on device" in caplog.text and "continuing without" in caplog.text
    fresh = mcache.EmbeddingCache(tmp_path / "c")  # the shard written before is intact
    assert torch.equal(torch.as_tensor(fresh.get("fp", "image", keys[:3])[0]), vectors[:3])


def test_a_plugin_raising_mid_run_is_recorded_and_others_keep_working(tmp_path: Path):
    from mmsec import api
    from mmsec.attacks import Attack
    from mmsec.options import Options as PluginOptions
    from mmsec.testing import hook_module, make_registry, use_registry

    class Flaky(Attack):
        name = "flaky"
        description = "fails half way through fit"
        universal = False  # fits on the 8 evaluation items, not the whole train split

        class Options(PluginOptions):
            pass

        def fit(self, model, data, run):
            run.run.metrics["flaky_progress"] = 0.5  # a partial figure before the failure
            raise RuntimeError("out of luck at step 7")

    module = hook_module("flaky_plugin", register_attacks=lambda register: register(Flaky))
    with use_registry(make_registry(module, builtins=["pgd"])):
        settings = api.Settings(out=tmp_path / "bad", limit=8, device="cpu", quiet=True)
        with pytest.raises(MmsecError, match=r'plugin "flaky" .* failed in fit'):
            api.attack("flaky", settings, knn_bank=0)
        res = json.loads((tmp_path / "bad" / "results.json").read_text())
        assert res["status"] == "failed" and "out of luck at step 7" in res["error"]
        assert res["failure"]["plugin"] == "flaky" and res["failure"]["phase"] == "fit"
        assert res["metrics"] == {"flaky_progress": 0.5}
        ok = api.attack("pgd", api.Settings(out=tmp_path / "ok", limit=8, device="cpu",
                                           quiet=True), options={"steps": 2}, knn_bank=0)
        assert ok["status"] == "completed"


def test_zoo_train_never_writes_over_the_installed_zoo(tmp_path: Path) -> None:
    from mmsec.model import ZOO_DIR
    from mmsec.zoo.train import zoo_out_dir

    before = (ZOO_DIR / "shapes.safetensors").stat().st_mtime_ns
    for out_dir in (None, ZOO_DIR, ZOO_DIR / "sub" / ".."):
        with pytest.raises(UsageError, match="ships with mmsec|is where the shipped"):
            zoo_out_dir("shapes", out_dir)
    assert zoo_out_dir("shapes", tmp_path) == tmp_path
    assert (ZOO_DIR / "shapes.safetensors").stat().st_mtime_ns == before
