"""Fast checks of what a run shows a person: the headline, the scalar logger (JSONL
always, TensorBoard / W&B when asked), the plateau note, and the console's last lines."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from mmsec.errors import UsageError
from mmsec.headline import headline
from mmsec.runs import Run
from mmsec.scalars import SCALARS_FILE, read_scalars
from mmsec.training import Batches, Optim, train
from mmsec.training.stopping import flat_since

# ----------------------------------------------------------------------------- headline


def _res(kind, metrics, **extra):
    return {"kind": kind, "plugin": extra.pop("plugin", "x"), "model": "zoo:shapes",
            "dataset": "procedural", "status": "completed", "metrics": metrics, **extra}


def test_attack_headline_is_clean_attacked_control():
    h = headline(_res("attack", {"clean_top1": 0.982, "adv_top1": 0.106, "control_top1": 0.97,
                                 "fooling_rate": 0.85, "control_fooling_rate": 0.02,
                                 "clean_i2t_r1": 0.9, "adv_i2t_r1": 0.5, "clean_top5": 1.0},
                      plugin="pgd"))
    assert h.columns == ("clean", "attacked", "control")
    assert h.rows == [("zero-shot top-1", 0.982, 0.106, 0.97),
                      ("fooling rate", None, 0.85, 0.02)]  # retrieval: not an image attack's
    text = h.text()
    assert text.splitlines()[0] == "attack pgd on zoo:shapes / procedural"
    assert "98.2%" in text and "10.6%" in text and "top5" not in text


def test_text_attack_headline_has_retrieval():
    h = headline(_res("attack", {"clean_top1": 0.9, "adv_top1": 0.8, "clean_i2t_r1": 0.9,
                                 "adv_i2t_r1": 0.4, "adv_text_i2t_r1": 0.6,
                                 "control_i2t_r1": 0.88}, plugin="cpgc"))
    assert ("i2t R@1", 0.9, 0.4, 0.88) in h.rows


def test_backdoor_headlines_before_and_after():
    implant = headline(_res("attack", {"clean_top1": 0.95, "asr": 0.98, "control_asr": 0.03,
                                       "original_clean_top1": 0.97, "original_asr": 0.02}))
    assert implant.columns == ("implanted", "before implant", "random trigger")
    assert implant.rows == [("CA (clean top-1)", 0.95, 0.97, None), ("ASR", 0.98, 0.02, 0.03)]
    defend = headline(_res("defend", {"before_clean_top1": 0.95, "after_clean_top1": 0.93,
                                      "before_asr": 0.98, "after_asr": 0.02},
                           notes=["invertune: loss stayed flat"]))
    assert defend.columns == ("before", "after")
    assert defend.rows == [("CA (clean top-1)", 0.95, 0.93), ("ASR", 0.98, 0.02)]
    assert "note: invertune: loss stayed flat" in defend.text()


def test_robust_fine_tune_and_plain_eval_headlines():
    robust = headline(_res("eval", {"clean_top1": 0.9, "robust_top1": 0.4,
                                    "robust_fooling_rate": 0.55}, robust="pgd", plugin=None))
    assert robust.title.startswith("eval --robust pgd")
    assert robust.rows[0] == ("zero-shot top-1", 0.9, 0.4)
    tune = headline(_res("defend", {"before_clean_top1": 0.98, "after_clean_top1": 0.9}))
    assert tune.rows == [("clean top-1", 0.98, 0.9)]
    plain = headline(_res("eval", {"clean_top1": 0.97, "clean_knn_top1": 0.9},
                          unreliable={"zero_shot": "2 words unknown"}, status="failed",
                          error="boom"))
    assert plain.rows == [("zero-shot top-1", 0.97), ("kNN top-1", 0.9)]
    assert "[failed]" in plain.title
    assert any("unreliable" in n for n in plain.notes) and "note: error: boom" in plain.text()


# ----------------------------------------------------------------------------- logger


def _loop(run, loss_fn, epochs=5, monitor=None):
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    x = torch.randn(32, 2)

    def step(batch, ctx):
        return {"loss": loss_fn(model, batch), "aux": torch.tensor(2.0)}

    return train(step, Batches(lambda e: (x[i:i + 8] for i in range(0, 32, 8)), 4),
                 Optim(model, kind="sgd", lr=0.1, schedule="constant"), epochs=epochs,
                 run=run, slot="toy", monitor=monitor)


def test_scalars_jsonl_is_always_written_and_read_back(tmp_path):
    with Run.create(tmp_path / "run", "attack", "toy", loggers=()) as run:
        _loop(run, lambda m, b: (m(b) ** 2).mean(), epochs=2)
        res = run.finish({})
    lines = [json.loads(line) for line in (tmp_path / "run" / SCALARS_FILE).read_text()
             .splitlines()]
    steps = [r for r in lines if r["scope"] == "step"]
    epochs = [r for r in lines if r["scope"] == "epoch"]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert set(steps[0]["values"]) == {"loss", "aux", "lr"}
    assert [(r["epoch"], r["step"]) for r in epochs] == [(0, 4), (1, 8)]
    curves = read_scalars(tmp_path / "run")
    assert [s for s, _ in curves[("toy", "step")]["loss"]] == list(range(1, 9))
    assert curves[("toy", "epoch")]["aux"] == [(4, 2.0), (8, 2.0)]
    assert res["notes"] == []  # a falling loss; "aux" is not a monitored number
    if importlib.util.find_spec("matplotlib"):  # the curves figure, linked by report.md
        assert (tmp_path / "run" / "figures" / "curves.png").is_file()
        assert "![curves](figures/curves.png)" in (tmp_path / "run" / "report.md").read_text()


def test_a_flat_monitored_number_gets_a_note_in_the_headline(tmp_path):
    with Run.create(tmp_path / "run", "attack", "toy", loggers=()) as run:
        _loop(run, lambda m, b: (m(b) * 0).sum() + 1.0, epochs=5)  # never moves
        res = run.finish({})
    assert len(res["notes"]) == 1
    assert res["notes"][0].startswith("toy: loss stayed within 1% from epoch 1 to 5")
    assert "note: toy: loss" in headline(res).text()
    assert "- toy: loss stayed" in (tmp_path / "run" / "report.md").read_text()
    # a number the plugin names is watched instead of the losses
    with Run.create(tmp_path / "named", "attack", "toy", loggers=()) as run:
        _loop(run, lambda m, b: (m(b) * 0).sum() + 1.0, epochs=4, monitor=["aux"])
        assert [n.split(" stayed")[0] for n in run.finish({})["notes"]] == ["toy: aux"]
    # three flat epochs are not yet a plateau (patience 3 means four epochs)
    with Run.create(tmp_path / "short", "attack", "toy", loggers=()) as run:
        _loop(run, lambda m, b: (m(b) * 0).sum() + 1.0, epochs=3)
        assert run.finish({})["notes"] == []


def test_flat_since():
    assert flat_since([5.0, 1.0, 1.004, 0.999, 1.0]) == 1
    assert flat_since([1.0, 2.0, 3.0]) is None
    assert flat_since([1.0, float("nan")]) is None
    assert flat_since([0.0, 0.0, 0.0]) == 0


def test_unknown_or_missing_logger_is_a_one_line_error(tmp_path):
    with pytest.raises(UsageError, match="unknown logger"):
        Run.create(tmp_path / "a", "attack", "toy", loggers=("mlflow",))
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(UsageError, match=r"wandb package is not installed .*mmsec\[wandb\]"):
            Run.create(tmp_path / "b", "attack", "toy", loggers=("wandb",))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_tensorboard_back_end(tmp_path):
    pytest.importorskip("tensorboard")
    with Run.create(tmp_path / "run", "attack", "toy", loggers=("tensorboard",)) as run:
        _loop(run, lambda m, b: (m(b) ** 2).mean(), epochs=1)
        run.finish({})
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / SCALARS_FILE).is_file()


# ----------------------------------------------------------------------------- console


def test_a_command_ends_with_its_headline_and_report_path(tmp_path):
    from mmsec.cli import main

    out = tmp_path / "e"
    r = CliRunner().invoke(main, ["eval", "--limit", "40", "--knn-bank", "0", "--out",
                                  str(out), "--log", "none"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("eval on zoo:shapes / procedural, 40 items")
    assert lines[1].split() == ["clean"] and lines[2].startswith("zero-shot top-1")
    assert lines[-1].startswith(f"report: {out / 'report.md'}")
    n = len(json.loads((out / "results.json").read_text())["metrics"])
    assert len(lines) < n  # the headline, not every metric
    assert "## Headline" in (out / "report.md").read_text()


def test_data_defense_headline_shows_its_detection_figures():
    h = headline(_res("defend", {"before_clean_top1": 0.9, "scan_lid_auroc": 0.93,
                                 "scan_kdist_auroc": 0.8, "scan_lid_recall@flag": 0.7},
                      plugin="scan", options={"score": "lid"}))
    assert h.rows == [("clean top-1", 0.9), ("scan lid auroc", 0.93),
                      ("scan lid recall@flag", 0.7)]


def test_comparison_labels_settings_and_keeps_transfers_apart(tmp_path):
    from mmsec.compare import RunRecord, compare

    def run(name, **res):
        res.setdefault("model", "zoo:shapes")
        res.setdefault("dataset", "procedural")
        return RunRecord(tmp_path / name, res)

    runs = [
        run("p2", kind="attack", plugin="pgd", options={"eps": 2 / 255, "steps": 10},
            metrics={"clean_top1": 1.0, "adv_top1": 0.6}, attack_artifact="p2/a"),
        run("p4", kind="attack", plugin="pgd", options={"eps": 4 / 255, "steps": 10},
            metrics={"clean_top1": 1.0, "adv_top1": 0.2}, attack_artifact="p4/a"),
        run("patch", kind="attack", plugin="advclip", options={"area": 0.03},
            metrics={"clean_top1": 1.0, "adv_top1": 0.5}, attack_artifact="patch/a"),
        run("moved", kind="eval", model="zoo:fashion", dataset="fashion-mnist",
            attack_artifact="./patch/a", metrics={"clean_top1": 0.9, "adv_top1": 0.7}),
        run("tune", kind="defend", plugin="fare", options={"eps": 4 / 255},
            metrics={"before_clean_top1": 1.0, "after_clean_top1": 0.8},
            model_checkpoint="tune/model"),
        run("robust", kind="eval", robust="pgd", pretrained="tune/model",
            options={"eps": 4 / 255, "steps": 10},
            metrics={"clean_top1": 0.8, "robust_top1": 0.5}),
    ]
    comp = compare(runs)
    attacks, defenses, cells = comp.matrix()
    assert attacks == ["pgd eps=2/255", "pgd eps=4/255", "advclip",
                       "advclip -> zoo:fashion / fashion-mnist"]
    assert defenses == ["none", "fare"]
    assert cells[("advclip", "none")].value == 0.5  # the transfer did not overwrite it
    assert cells[("pgd eps=4/255", "fare")].value == 0.5
    assert cells[("pgd eps=4/255", "fare")].success == 0.5 and comp.has_matrix and comp.has_eps
    series = comp.eps_series
    assert series["pgd / none (zoo:shapes, procedural)"] == [(0.0, 1.0), (2 / 255, 0.6),
                                                            (4 / 255, 0.2)]
    # pgd also ran as --robust: its runs on the undefended model are robust points too
    assert [p[0] for p in comp.robust_points] == ["none (pgd eps=2/255)",
                                                  "none (pgd eps=4/255)",
                                                  "fare (pgd eps=4/255)"]


def test_wandb_back_end_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with Run.create(tmp_path / "run", "attack", "toy", loggers=("wandb",)) as run:
        run.set("options", {"eps": 0.1})
        _loop(run, lambda m, b: (m(b) ** 2).mean(), epochs=1)
        run.finish({})
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
