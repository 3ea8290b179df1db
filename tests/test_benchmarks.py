"""Every benchmark script runs at tiny sizes and prints the shared JSON schema.

The scripts are called in this process (``main(argv)``), so torch and the model load once;
only ``main_job`` starts the ``mmsec`` command line in a child, on a tiny image folder.
Figures at these sizes mean nothing: this checks that the suite runs, not how fast.
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def suite():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("run_all"), importlib.import_module("_common")
    finally:
        sys.path.remove(str(BENCH))


def _check(row: dict, schema: dict) -> None:
    for key, kind in schema.items():
        assert isinstance(row[key], kind), (key, row[key])
    assert row["device"] == "cpu" and row["threads"] >= 1
    assert math.isfinite(row["figure"]) and row["figure"] > 0, row
    assert math.isfinite(row["ceiling"]) and row["ceiling"] > 0, row
    assert row["ratio"] == pytest.approx(row["figure"] / row["ceiling"], rel=1e-2, abs=1e-3)


def _tiny_folder(root: Path) -> str:
    """A two-class image folder with train and test splits (8 + 4 images a class)."""
    from PIL import Image

    from mmsec.data import procedural_shapes

    ds = procedural_shapes(split="test", n=48)
    count: dict[tuple[str, int], int] = {}
    for i in range(len(ds)):
        x, y = ds.load(i)
        if int(y) > 1:
            continue
        split = "train" if count.get(("train", int(y)), 0) < 8 else "test"
        key = (split, int(y))
        if count.get(key, 0) >= (8 if split == "train" else 4):
            continue
        count[key] = count.get(key, 0) + 1
        folder = root / split / ds.classnames[int(y)]
        folder.mkdir(parents=True, exist_ok=True)
        arr = (x.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(arr).save(folder / f"{i}.png")
    return f"imagefolder:{root}"


def test_every_benchmark_runs_tiny_and_prints_the_schema(suite, tmp_path, capsys,
                                                         monkeypatch):
    import torch

    run_all, common = suite
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    seen = []
    with torch.random.fork_rng():  # the scripts seed torch; the tests after them keep theirs
        try:
            for name, script, extra in run_all.SUITE:
                argv = [*extra, *run_all.TINY[name], "--repeat", "1"]
                if name == "main_job":
                    argv += ["--data", _tiny_folder(tmp_path / "folder")]
                module = importlib.import_module(script[:-3])
                row = module.main(argv)
                assert row["benchmark"] == name
                _check(row, common.SCHEMA)
                seen.append(row)
        finally:
            torch.set_num_threads(threads)
    table = run_all.table(seen)
    assert table.count("\n") == len(run_all.SUITE) + 1
    assert "| advclip |" in table and "%" in table
    assert '"benchmark"' in capsys.readouterr().out


def test_the_gpu_script_runs_every_suite_entry():
    text = (BENCH / "gpu.sh").read_text()
    assert "run_all.py\" --device cuda" in text and "$OUT" in text


def test_the_training_loop_itself_makes_no_host_device_sync_per_step(suite):
    # benchmarks/syncs.py counts item()/float()/bool()/tolist()/cpu() inside train(); UAP's
    # step has none of its own, so what is left is the loop's read-back every READ_EVERY
    # steps and at the epoch's end
    import torch

    threads = torch.get_num_threads()
    try:
        row = importlib.import_module("syncs").main(["--only", "uap"])
    finally:
        torch.set_num_threads(threads)
    uap = row["details"]["loops"]["uap"]
    assert uap["steps"] >= 4 and uap["per_step"].get("step", 0) == 0, uap
    assert uap["syncs_per_step"] <= 0.5, uap
