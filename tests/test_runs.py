"""Run folders: atomic writes, results.json, report, checkpoints, resume and merging runs."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import random
import re
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from mmsec import io as io_module
from mmsec.errors import MmsecError, UsageError
from mmsec.io import atomic_open, load_tensors, write_atomic, write_json_atomic
from mmsec.report import merge_runs, write_report_table
from mmsec.runs import Run

RESULT_KEYS = {
    "mmsec_version", "kind", "plugin", "plugin_version", "model", "pretrained", "dataset",
    "split", "options", "seed", "metrics", "durations", "device", "precision", "environment",
    "skipped_items", "artifacts", "status", "started", "finished", "rows",
}  # fmt: skip


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMSEC_PROGRESS", "0")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------- atomic writes


def test_write_atomic_writes_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"
    write_atomic(target, "first")
    write_atomic(target, b"second")
    assert target.read_text() == "second"
    assert _leftovers(target.parent) == []
    assert target.stat().st_mode & 0o777 == 0o666 & ~io_module.UMASK  # not mkstemp's 0600


def test_interrupted_write_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    write_json_atomic(target, {"status": "old"})
    with pytest.raises(RuntimeError), atomic_open(target, "w") as handle:
        handle.write('{"status": "ha')
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"status": "old"}
    assert _leftovers(tmp_path) == []


def test_failed_replace_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "data.bin"
    write_atomic(target, b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_write_json_atomic_is_strict_json(tmp_path: Path) -> None:
    path = write_json_atomic(
        tmp_path / "x.json", {"a": float("nan"), "b": (1, 2), "c": Path("p"), "d": torch.tensor(2)}
    )
    assert json.loads(path.read_text()) == {"a": None, "b": [1, 2], "c": "p", "d": 2}


# ----------------------------------------------------------------------------- the run folder


def test_default_folder_name(tmp_path: Path) -> None:
    with Run.create(None, "attack", "pgd", root=tmp_path) as run:
        assert run.dir.parent == tmp_path
        assert re.fullmatch(r"\d{8}T\d{6}Z-attack-pgd", run.dir.name)
        assert run.artifacts_dir == run.dir / "artifacts" and run.artifacts_dir.is_dir()
        assert json.loads((run.dir / "results.json").read_text())["status"] == "running"
    with Run.create(None, "attack", "pgd", root=tmp_path) as second:
        assert second.dir != run.dir


def test_finish_writes_results_report_and_config(tmp_path: Path) -> None:
    with Run.create(tmp_path / "run", "attack", "pgd") as run:
        run.set("model", "zoo:shapes")
        run.set("options", {"eps": 4 / 255, "steps": 10})
        run.set("seed", 0)
        run.set("config", {"kind": "attack", "plugin": "pgd", "options": {"eps": "4/255"}})
        with run.timer("fit"):
            pass
        with run.timer("fit"):
            pass
        assert list(run.progress(range(3), desc="noop")) == [0, 1, 2]
        image = run.save_image("patch", torch.rand(3, 4, 4), scale=3, report=True)
        run.save_tensors("patch", {"patch": torch.zeros(3, 4, 4)}, {"size": 4})
        run.add_section("Notes", "a *note*")
        run.skipped_items.append({"item": "bad.png", "reason": "unreadable"})
        results = run.finish({"fooling_rate": torch.tensor(0.75), "acc": {"clean": 0.9}})

    on_disk = json.loads((run.dir / "results.json").read_text())
    assert on_disk == results
    assert RESULT_KEYS <= set(on_disk)
    assert on_disk["status"] == "completed"
    assert on_disk["metrics"] == {"fooling_rate": 0.75, "acc.clean": 0.9}
    assert on_disk["options"] == {"eps": 4 / 255, "steps": 10}
    assert on_disk["artifacts"] == ["artifacts/patch.png", "artifacts/patch.safetensors"]
    assert on_disk["skipped_items"] == [{"item": "bad.png", "reason": "unreadable"}]
    assert set(on_disk["durations"]) == {"fit", "total"}
    assert on_disk["environment"]["torch"] and on_disk["environment"]["python"]
    report = (run.dir / "report.md").read_text()
    assert "![patch](artifacts/patch.png)" in report
    assert "## Notes" in report and "| fooling_rate | 0.75 |" in report
    assert yaml.safe_load((run.dir / "config.yaml").read_text())["options"] == {"eps": "4/255"}
    assert "run folder" in (run.dir / "run.log").read_text()
    with Image.open(image) as png:
        assert png.size == (12, 12) and png.mode == "RGB"
    tensors, meta = load_tensors(run.artifacts_dir / "patch.safetensors")
    assert torch.equal(tensors["patch"], torch.zeros(3, 4, 4)) and meta["size"] == "4"
    assert not run.log.handlers  # closed on exit


def test_failure_is_recorded(tmp_path: Path) -> None:
    with pytest.raises(ValueError), Run.create(tmp_path / "run", "eval", None) as run:
        raise ValueError("boom")
    results = json.loads((run.dir / "results.json").read_text())
    assert results["status"] == "failed"
    assert results["error"] == "ValueError: boom"


def test_non_numeric_metric_is_refused(tmp_path: Path) -> None:
    with Run.create(tmp_path / "run", "eval", None) as run, pytest.raises(TypeError, match="'x'"):
        run.finish({"x": "high"})


def test_existing_run_needs_resume(tmp_path: Path) -> None:
    with Run.create(tmp_path / "run", "attack", "pgd") as run:
        run.finish({})
    with pytest.raises(UsageError, match="already holds a run"):
        Run.create(run.dir, "attack", "pgd")
    with pytest.raises(UsageError, match="cannot resume"):
        Run.create(run.dir, "attack", "advclip", resume=True)
    with pytest.raises(UsageError, match="--resume needs --out"):
        Run.create(None, "attack", "pgd", resume=True)


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip_and_resume(tmp_path: Path) -> None:
    state = {"weight": torch.randn(4, 3), "step_count": torch.tensor([7])}
    meta = {"epoch": 2, "step": 70, "history": [0.5, 0.25]}
    with Run.create(tmp_path / "run", "defend", "invertune") as run:
        assert run.load_checkpoint() is None
        torch.manual_seed(123)
        random.seed(5)
        run.save_checkpoint(state, meta)
        expected_torch, expected_python = torch.rand(3), random.random()
    assert _leftovers(run.dir) == []

    with Run.create(tmp_path / "run", "defend", "invertune", resume=True) as resumed:
        assert resumed.resumed and resumed.resume
        torch.manual_seed(999)
        random.seed(999)
        loaded = resumed.load_checkpoint()
        assert loaded is not None
        loaded_state, loaded_meta = loaded
        assert loaded_meta == meta
        assert set(loaded_state) == set(state)
        assert all(torch.equal(loaded_state[k], state[k]) for k in state)
        assert torch.equal(torch.rand(3), expected_torch)  # RNG restored
        assert random.random() == expected_python
        results = resumed.finish({"asr": 0.01})
    assert results["resumed"] is True


def test_resume_without_checkpoint_starts_fresh(tmp_path: Path) -> None:
    with Run.create(tmp_path / "new", "attack", "pgd", resume=True) as run:
        assert not run.resumed and run.resume
        assert run.load_checkpoint() is None
    assert "starting fresh" in (run.dir / "run.log").read_text()


def test_checkpoint_meta_must_be_json(tmp_path: Path) -> None:
    with Run.create(tmp_path / "run", "attack", "pgd") as run, pytest.raises(TypeError):
        run.save_checkpoint({"w": torch.zeros(1)}, {"bad": object()})


def test_pickle_checkpoint_is_not_loaded(tmp_path: Path) -> None:
    with Run.create(tmp_path / "run", "attack", "pgd") as run:
        run.checkpoint_path().parent.mkdir(parents=True)
        run.checkpoint_path().write_bytes(pickle.dumps({"w": [1, 2]}))
        with pytest.raises(MmsecError, match="main.safetensors"):
            run.load_checkpoint()


def test_each_stage_has_its_own_checkpoint_slot(tmp_path: Path) -> None:
    with Run.create(tmp_path / "run", "defend", "invertune") as run:
        run.save_checkpoint({"w": torch.zeros(1)}, {"stage": "invert"}, slot="invert")
        run.save_checkpoint({"w": torch.ones(1)}, {"stage": "tune"}, slot="simulator/uap")
    assert (tmp_path / "run" / "checkpoints" / "simulator" / "uap.safetensors").is_file()
    with Run.create(tmp_path / "run", "defend", "invertune", resume=True) as run:
        assert run.load_checkpoint("invert")[1] == {"stage": "invert"}
        assert float(run.load_checkpoint("simulator/uap")[0]["w"]) == 1.0
        assert run.load_checkpoint("tune") is None
        with pytest.raises(ValueError, match="relative path"):
            run.checkpoint_path("../escape")


# ----------------------------------------------------------------------------- merging runs


def _fake_run(folder: Path, plugin: str, metrics: dict[str, float]) -> Path:
    folder.mkdir(parents=True)
    results = {
        "kind": "attack", "plugin": plugin, "model": "zoo:shapes", "pretrained": None,
        "dataset": "procedural", "split": "test", "seed": 0, "status": "completed",
        "options": {"eps": 4 / 255, "steps": 10}, "metrics": metrics,
    }  # fmt: skip
    write_json_atomic(folder / "results.json", results)
    return folder


def test_merge_two_runs_into_one_table(tmp_path: Path) -> None:
    a = _fake_run(tmp_path / "a", "pgd", {"fooling_rate": 0.9, "acc": 0.1})
    b = _fake_run(tmp_path / "b", "advclip", {"fooling_rate": 0.8, "asr": 0.5})
    rows, columns = merge_runs([a, b])
    assert len(rows) == 2
    assert [r["plugin"] for r in rows] == ["pgd", "advclip"]
    assert columns[-3:] == ["fooling_rate", "acc", "asr"]
    assert rows[0]["options"] == "eps=0.01569 steps=10"

    csv_path = tmp_path / "table.csv"
    markdown = write_report_table(rows, csv_path, md=True)
    parsed = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert len(parsed) == 2 and parsed[1]["asr"] == "0.5" and parsed[0]["asr"] == ""
    lines = markdown.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| run | kind | plugin |")
    assert write_report_table(rows, None, md=False).splitlines()[0].startswith("run,kind")
    assert len(merge_runs([tmp_path])[0]) == 2  # a folder of runs expands


def test_merge_rejects_non_runs_and_corrupt_results(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="empty"):
        merge_runs([empty])
    with pytest.raises(UsageError, match="missing"):
        merge_runs([tmp_path / "missing"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text("{not json")
    with pytest.raises(MmsecError, match="broken") as info:
        merge_runs([broken])
    assert not isinstance(info.value, UsageError)
