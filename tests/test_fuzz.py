"""Fuzzing the input layers with hypothesis (issue 18): recipe YAML, ``-o KEY VALUE`` options,
caption files and image files. Every input ends in a valid result or one clean mmsec error
(one line, no traceback), never another exception, a hang or an unbounded allocation.

Only the parsing and validation layers run here (no model, no run), so the whole module
stays within seconds; ``HYPOTHESIS_PROFILE=deep`` tries 20x more examples.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mmsec.errors import MmsecError, one_line  # noqa: E402

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("deep", max_examples=800, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.function_scoped_fixture])
FUZZ = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _clean(exc: MmsecError) -> None:
    """A message the CLI can print as one line: not empty, no traceback (a newline that comes
    from the input itself, a caption or a split name, is escaped by ``one_line`` there)."""
    text = str(exc)
    assert text.strip() and "Traceback" not in text, text
    assert "\n" not in one_line(text)


# ------------------------------------------------------------------ recipe YAML
SCHEMA_KEYS = ["name", "description", "defaults", "steps", "id", "kind", "plugin", "options",
               "model", "pretrained", "data", "device", "precision", "seed", "split", "limit",
               "clean_items", "knn_bank", "image_size", "model_from", "artifact_from",
               "trigger_from", "robust"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["attack", "defend", "eval", "pgd", "uap", "backdoor", "invertune", "a",
                     "b", "fp32", "bf16", "cpu", "cuda:0", "mps", "auto", "test", "train",
                     "4/255", "zoo:shapes", "../../x", "/etc/passwd"]),
)
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(SCHEMA_KEYS), st.text(max_size=8)), inner,
                        max_size=6),
    ),
    max_leaves=30,
)
step = st.fixed_dictionaries(
    {"id": st.sampled_from(["a", "b", "c", "A", "a b", ""]),
     "kind": st.sampled_from(["attack", "defend", "eval", "other"])},
    optional={k: scalars for k in ("plugin", "model_from", "artifact_from", "trigger_from",
                                   "seed", "limit", "device", "precision", "robust")}
    | {"options": st.dictionaries(st.text(max_size=8), scalars, max_size=3)},
)
recipes = st.fixed_dictionaries(
    {"steps": st.lists(step, max_size=4)},
    optional={"name": scalars, "defaults": documents, "description": scalars},
)
SNIPPETS = ["&a [*a]", "&x {a: 1}", "*undefined", "!!python/object/apply:os.system ['true']",
            "!!binary aGVsbG8=", "{", "[", ": :", "- - -", "\t", "\x00", "%YAML 9.9", "---\n---",
            "? [a]\n: b", "<<: {a: 1}", "!custom x", "[" * 80, "'", '"\\x"']


@FUZZ
@given(doc=st.one_of(recipes, documents))
def test_recipe_documents_validate_or_fail_cleanly(doc) -> None:
    import yaml

    from mmsec.recipes import Recipe, parse_recipe

    text = yaml.safe_dump(doc, allow_unicode=True)
    try:
        assert isinstance(parse_recipe(text, "fuzz.yaml"), Recipe)
    except MmsecError as exc:
        _clean(exc)
        assert str(exc).startswith("fuzz.yaml")


@FUZZ
@given(head=st.text(max_size=60), snippet=st.sampled_from(SNIPPETS), tail=st.text(max_size=60))
def test_recipe_text_validates_or_fails_cleanly(head: str, snippet: str, tail: str) -> None:
    from mmsec.recipes import parse_recipe

    for text in (head + snippet + tail, f"steps:\n  - id: a\n    kind: eval\n    x: {snippet}\n"):
        try:
            parse_recipe(text, "fuzz.yaml")
        except MmsecError as exc:
            _clean(exc)


# ------------------------------------------------------------------ -o KEY VALUE
@pytest.fixture(scope="module")
def plugin_classes():
    from mmsec.registry import get_registry

    reg = get_registry()
    return [*reg.attacks.values(), *reg.defenses.values()]


values = st.one_of(
    st.text(max_size=20), st.integers(-2**70, 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["4/255", "1/0", "-8 / 255", "none", "None", "null", "true", "off", "",
                     "1,2,3", "[1, 2]", "[" * 3000, "{a: 1}", "{a: &a [*a]}", "{", "0x10",
                     "1e999", "nan", "-inf", "2**64", "a,b", "[[1]]", "{" + "a: {" * 60]),
)


@FUZZ
@given(data=st.data())
def test_cli_option_pairs_validate_or_fail_cleanly(plugin_classes, data) -> None:
    from mmsec.options import parse_cli_pairs

    cls = data.draw(st.sampled_from(plugin_classes))
    names = list(cls.Options.model_fields)
    keys = st.one_of(st.sampled_from(names), st.sampled_from(names).map(lambda k: k.upper()),
                     st.text(max_size=10))
    pairs = data.draw(st.lists(st.tuples(keys, values), max_size=4))
    try:
        plugin = cls(parse_cli_pairs(pairs))
        json.dumps(plugin.options_dict())  # what results.json will record
    except MmsecError as exc:
        _clean(exc)


# ------------------------------------------------------------------ caption files
@pytest.fixture(scope="module")
def caption_dir(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("captions")
    (root / "sub").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "a.png")
    Image.new("RGB", (8, 8), (0, 255, 0)).save(root / "sub" / "b.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 20)
    return root


images = st.sampled_from(["a.png", "sub/b.png", "./a.png", "broken.png", "missing.png", "",
                          "../a.png", "/etc/hostname", "sub", "~/a.png", "a.png\x00", "é.png"])
cells = st.one_of(st.text(max_size=12), st.sampled_from(["0", "-1", "3", "red", "train",
                                                         "test", "val", "x|y", '"', ",", ""]))
row = st.fixed_dictionaries(
    {"image": images},
    optional={"caption": cells, "captions": st.one_of(cells, st.lists(cells, max_size=3)),
              "label": st.one_of(cells, st.integers(-3, 3), st.none()),
              "split": st.one_of(cells, st.none())},
)


def _load(path: Path) -> None:
    from mmsec.data.files import captions_file

    for split in ("test", "train"):
        try:
            ds = captions_file(str(path), split=split, image_size=8)
        except MmsecError as exc:
            _clean(exc)
            continue
        assert len(ds) >= 1
        for i in range(len(ds)):
            assert ds.load(i)[0].shape == (3, 8, 8)
            ds.captions(i)


@FUZZ
@given(rows=st.lists(row, max_size=5), kind=st.sampled_from(["csv", "jsonl", "json"]))
def test_caption_files_load_or_fail_cleanly(caption_dir: Path, rows, kind: str) -> None:
    import csv

    path = caption_dir / f"fuzz.{kind if kind != 'json' else 'jsonl'}"
    if kind == "csv":
        buf = io.StringIO()
        columns = sorted({k for r in rows for k in r} | {"image"})
        writer = csv.DictWriter(buf, columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "|".join(map(str, v)) if isinstance(v, list) else v
                             for k, v in r.items()})
        path.write_text(buf.getvalue(), encoding="utf-8")
    elif kind == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows), encoding="utf-8")
    _load(path)


@FUZZ
@given(blob=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)),
       suffix=st.sampled_from([".csv", ".jsonl"]),
       prefix=st.sampled_from([b"", b"image,caption\n", b"image,caption,label\na.png,x,1\n",
                               b'{"image": "a.png", "caption": "x"}\n', b"[", b"\xef\xbb\xbf"]))
def test_caption_bytes_load_or_fail_cleanly(caption_dir: Path, blob: bytes, suffix: str,
                                            prefix: bytes) -> None:
    path = caption_dir / f"bytes{suffix}"
    path.write_bytes(prefix + blob)
    _load(path)


# ------------------------------------------------------------------ image files
@FUZZ
@given(blobs=st.lists(st.binary(max_size=200), min_size=1, max_size=3),
       header=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"BM",
                               b"P6\n2 2\n255\n"]))
def test_image_bytes_are_skipped_or_refused_cleanly(tmp_path_factory, blobs, header) -> None:
    from PIL import Image

    from mmsec.data.files import FileImageDataset

    folder = tmp_path_factory.mktemp("img")
    good = folder / "good.png"
    Image.new("RGB", (6, 4), (10, 20, 30)).save(good)
    paths = [good]
    for i, blob in enumerate(blobs):
        paths.append(folder / f"f{i}.png")
        paths[-1].write_bytes(header + blob)
    ds = FileImageDataset(paths, [0] * len(paths), name="fuzz", split="test", classnames=["x"])
    assert ds.skipped + len(ds) == len(paths)
    for i in range(len(ds)):  # each image at the dataset's (most common) size
        assert ds.load(i)[0].shape == (3, ds.size[1], ds.size[0])
    try:
        FileImageDataset(paths, [0] * len(paths), name="fuzz", split="test", classnames=["x"],
                         strict=True)
    except MmsecError as exc:
        _clean(exc)
        assert "cannot decode image" in str(exc)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "1", "P", "I;16", "I", "F", "CMYK",
                                  "YCbCr", "HSV"])
def test_every_pillow_mode_decodes_to_rgb(tmp_path: Path, mode: str) -> None:
    import numpy as np
    from PIL import Image

    from mmsec.data.files import FileImageDataset

    im = Image.new(mode, (5, 3))
    suffix = ".tiff" if mode in ("F", "CMYK", "YCbCr", "HSV", "I") else ".png"
    path = tmp_path / f"im{suffix}"
    try:
        im.save(path)
    except (OSError, KeyError, ValueError):
        pytest.skip(f"Pillow cannot write mode {mode} as {suffix}")
    ds = FileImageDataset([path], [0], name="modes", split="test", classnames=["x"],
                          strict=True)
    img = ds.load(0)[0]
    assert img.shape == (3, 3, 5) and bool(np.isfinite(img.numpy()).all())
