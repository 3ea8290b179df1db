"""Your own data and your own victim model: `mmsec zoo train` on an image folder and on a
captions file, the checkpoint loaded by file and by name in every command, the unknown-token
warning, --image-size, and step-based schedules on small data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from mmsec.io import load_tensors
from mmsec.testing import invoke

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = {"apple": (200, 30, 30), "leaf": (40, 170, 40), "sky": (40, 80, 210)}


def _folder(root, classes=COLOURS, n=10, size=40):
    """A small real image folder: one class per colour, noisy, with a bright square."""
    rng = np.random.default_rng(0)
    for name, rgb in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.clip(rng.normal(rgb, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            x, y = rng.integers(0, size - 10, 2)
            img[y:y + 8, x:x + 8] = 255
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def _captions(root):
    folder = _folder(root / "imgs")
    rows = [{"image": f"imgs/{c}/{i}.png", "caption": f"a noisy {c} coloured picture"}
            for c in COLOURS for i in range(10)]
    path = root / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    del folder
    return path


def _json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_zoo_train_on_an_image_folder_loads_by_name_and_by_file_in_every_command(tmp_path):
    data = f"imagefolder:{_folder(tmp_path / 'fruit')}"
    res = _json(invoke("zoo", "train", "-d", data, "--steps", "4", "--batch-size", "8",
                       "--out", tmp_path / "zrun", "--json"))
    weights = res["model_checkpoint"]
    assert res["model"] == "zoo:fruit" and 0 <= res["metrics"]["clean_top1"] <= 1
    assert res["train"]["steps"] == 4 and res["train"]["image_size"] == 32  # 40 px data
    tensors, meta = load_tensors(weights)
    spec = json.loads(meta["zoo"])  # self-describing: the spec travels with the weights
    assert spec["classnames"] == ["apple", "leaf", "sky"] and spec["metrics"]["measured_on"]
    assert all(v.dtype.is_floating_point is False or v.dtype.itemsize == 2
               for v in tensors.values())  # fp16, and the figure is the fp16 file's
    listed = invoke("models")
    assert "zoo:fruit" in listed.stdout
    elsewhere = tmp_path / "copy" / "victim.safetensors"
    elsewhere.parent.mkdir()
    shutil.copy(weights, elsewhere)  # without its .json: the metadata is enough
    by_name = _json(invoke("eval", "-m", "zoo:fruit", "-d", data, "--knn-bank", "0",
                           "--out", tmp_path / "e1", "--json"))
    by_file = _json(invoke("eval", "--pretrained", elsewhere, "-d", data, "--knn-bank", "0",
                           "--out", tmp_path / "e2", "--json"))
    by_zoo_path = _json(invoke("eval", "-m", f"zoo:{weights}", "-d", data, "--knn-bank", "0",
                               "--out", tmp_path / "e3", "--json"))
    tops = {r["metrics"]["clean_top1"] for r in (by_name, by_file, by_zoo_path)}
    assert len(tops) == 1 and "unreliable" not in by_name  # its own vocabulary reads them
    assert by_name["model_fingerprint"] == by_file["model_fingerprint"]
    atk = _json(invoke("attack", "-p", "pgd", "--pretrained", elsewhere, "-d", data,
                       "-o", "steps", "2", "--knn-bank", "0", "--out", tmp_path / "a",
                       "--json"))
    assert atk["model"] == "zoo:fruit" and "fooling_rate" in atk["metrics"]
    dfn = _json(invoke("defend", "-p", "fare", "-m", "zoo:fruit", "-d", data, "--clean-items",
                       "8", "-o", "steps", "1", "-o", "batch_size", "4", "-o", "attack_steps",
                       "1", "-o", "warmup_steps", "0", "--out", tmp_path / "d", "--json"))
    assert dfn["model_checkpoint"].endswith("model.safetensors")


def test_zoo_train_on_a_captions_file_holds_out_a_test_part_and_reports_recall(tmp_path):
    path = _captions(tmp_path)
    res = _json(invoke("zoo", "train", "-d", f"captions:{path}", "--name", "pairs", "--steps",
                       "3", "--batch-size", "8", "--vocab", "full", "--out", tmp_path / "z",
                       "--json"))
    assert {"i2t_r1", "t2i_r1"} <= set(res["metrics"]) and "clean_top1" not in res["metrics"]
    assert "held out" in res["train"]["held_out"] and res["train"]["vocab"] == "full"
    ev = _json(invoke("eval", "-m", "zoo:pairs", "-d", f"captions:{path}", "--knn-bank", "0",
                      "--out", tmp_path / "e", "--json"))
    assert "clean_t2i_r1" in ev["metrics"] and "unreliable" not in ev


def test_fitting_on_a_captions_file_without_splits_is_marked_unreliable(tmp_path):
    path = _captions(tmp_path)
    opts = ["-o", "epochs", "1", "-o", "batch_size", "8"]
    shared = _json(invoke("attack", "-p", "uap", "-d", f"captions:{path}", *opts,
                          "--out", tmp_path / "a", "--json"))
    assert "no split column" in shared["unreliable"]["fit"]
    assert "clean_knn_top1" not in shared["metrics"]  # no kNN bank made of the queries
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, row in enumerate(rows):
        row["split"] = "test" if i % 5 == 0 else "train"
    split = tmp_path / "split.jsonl"
    split.write_text("\n".join(json.dumps(r) for r in rows))
    ok = _json(invoke("attack", "-p", "uap", "-d", f"captions:{split}", *opts,
                      "--out", tmp_path / "b", "--json"))
    assert "fit" not in ok.get("unreliable", {})


def test_zoo_train_refuses_bad_sizes_unknown_data_and_shipped_names(tmp_path):
    data = f"imagefolder:{_folder(tmp_path / 'f', n=4)}"
    r = invoke("zoo", "train", "-d", data, "--image-size", "48")
    assert r.exit_code == 2 and "multiple of 32" in r.stderr
    r = invoke("zoo", "train", "--name", "mine")
    assert r.exit_code == 2 and "give the data" in r.stderr
    r = invoke("zoo", "train", "--name", "shapes", "--steps", "1")
    assert r.exit_code == 2 and "--out-dir" in r.stderr


def test_unknown_words_warn_and_mark_the_figures_unreliable_only_when_words_are_lost(tmp_path):
    unknown = _folder(tmp_path / "animals", {"kangaroo": (90, 60, 30), "wombat": (60, 60, 60)},
                      n=3)
    known = _folder(tmp_path / "shapes", {"circle": (200, 0, 0), "square": (0, 0, 200)}, n=3)
    r = invoke("eval", "-d", f"imagefolder:{unknown}", "--split", "train", "--knn-bank", "0",
               "--out", tmp_path / "u", "--json")
    res = _json(r)
    assert "kangaroo" in r.stderr and "wombat" in r.stderr and "unreliable" in r.stderr
    assert "zero_shot" in res["unreliable"]
    assert res["text_coverage"]["zero_shot"]["unknown_words"] == {"kangaroo": 5, "wombat": 5}
    r = invoke("eval", "-d", f"imagefolder:{known}", "--split", "train", "--knn-bank", "0",
               "--out", tmp_path / "k", "--json")
    res = _json(r)
    assert "unreliable" not in res and "tokenizer" not in r.stderr
    r = invoke("eval", "-d", f"imagefolder:{unknown}", "--split", "train", "--strict",
               "--out", tmp_path / "s")
    assert r.exit_code == 1 and "kangaroo" in r.stderr


def test_identical_prompts_are_counted(zoo_model):
    from mmsec.coverage import prompt_coverage

    cov = prompt_coverage(zoo_model.tokenizer, ["circle", "dog", "cat"], ["a {}."])
    assert cov.classes == 3 and cov.distinct_classes == 2  # dog and cat both read as the unknown token
    assert "read as only 2 distinct" in cov.message()


def test_image_size_loads_file_images_at_that_size(tmp_path, monkeypatch):
    monkeypatch.setenv("MMSEC_CACHE_DIR", str(tmp_path / "cache"))  # counts below start at 0
    folder = _folder(tmp_path / "f", n=3, size=40)
    res = _json(invoke("eval", "-d", f"imagefolder:{folder}", "--split", "train",
                       "--image-size", "24", "--knn-bank", "0", "--out", tmp_path / "e",
                       "--json"))
    assert "image_size: 24" in (tmp_path / "e" / "config.yaml").read_text()
    # Without the option, files load at the model's input size (zoo:shapes: 32), the same
    # images an explicit --image-size 32 gives, not at the first file's 40 px.
    default = _json(invoke("eval", "-d", f"imagefolder:{folder}", "--split", "train",
                           "--knn-bank", "0", "--out", tmp_path / "d", "--json"))
    explicit = _json(invoke("eval", "-d", f"imagefolder:{folder}", "--split", "train",
                            "--image-size", "32", "--knn-bank", "0", "--json"))
    assert "image_size: 32" in (tmp_path / "d" / "config.yaml").read_text()
    assert default["metrics"]["clean_top1"] == explicit["metrics"]["clean_top1"]
    # 24 px and 32 px are different images to the cache; the explicit 32 px run only hits it
    assert res["images_encoded"] == default["images_encoded"] > 0
    assert explicit["images_encoded"] == 0


def test_min_steps_gives_small_data_enough_steps():
    from mmsec_plugins.uap import UAP

    from mmsec.data import procedural_shapes
    from mmsec.testing import make_registry, run_context

    data = procedural_shapes(split="train", n=64)
    attack = UAP({"epochs": 1, "batch_size": 64, "train_items": 64, "min_steps": 5})
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, run_context(
            f"{tmp}/run", plugin="uap", registry=make_registry(builtins=["uap"])) as run:
        from mmsec import load_model

        attack.fit(load_model(device="cpu"), data, run)
        assert run.metrics["uap_steps"] == 5.0


STAMPS = "/usr/share/tuxpaint/stamps"


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").path.isdir(STAMPS),
                    reason="apt-get install tuxpaint-stamps-default")
def test_a_victim_trained_on_real_clip_art_learns_and_a_patch_attack_beats_its_control(tmp_path):
    """The README's own-data example on real data (Debian's Tux Paint stamps: 11 classes of
    colour clip art): a short zoo train learns well above chance on held-out images, the
    model loads by name, and PGD fools far more than noise of the same budget."""
    import runpy
    import sys

    script = __import__("pathlib").Path(__file__).parents[1] / "docs/examples/stamps_dataset.py"
    argv = sys.argv
    sys.argv = [str(script), str(tmp_path / "stamps"), "--size", "64"]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    images = tmp_path / "stamps" / "images"
    assert len(list(images.iterdir())) == 11
    data = f"imagefolder:{images}"
    res = _json(invoke("zoo", "train", "-d", data, "--name", "stamps", "--min-steps", "200",
                       "--epochs", "1", "--json"))
    top1 = res["metrics"]["clean_top1"]
    assert res["train"]["image_size"] == 64 and res["train"]["steps"] >= 200
    assert top1 > 3 / 11, f"held-out top-1 {top1} is not well above chance (1/11)"
    atk = _json(invoke("attack", "-p", "pgd", "-m", "zoo:stamps", "-d", data, "--knn-bank", "0",
                       "--out", tmp_path / "pgd", "--json"))
    m = atk["metrics"]
    assert abs(m["clean_top1"] - top1) < 1e-3  # the same held-out images, the same file
    assert m["fooling_rate"] > 0.2 and m["fooling_rate"] > 5 * m["control_fooling_rate"]
