"""The scan defense: local outlier scores, the backdoor plugin's export, the defense itself."""

from __future__ import annotations

import csv
import importlib
import math

import numpy as np
import pytest
import torch
from mmsec_plugins.backdoor import Backdoor, trigger_from_artifact
from mmsec_plugins.scan import Scan
from mmsec_plugins.scan.scores import (
    Neighbourhoods,
    auroc,
    misalignment,
    neighbourhoods,
    recall_at,
    score_all,
)

from mmsec import UsageError, load_images
from mmsec.testing import run_context

# the module (the package re-exports its function ``implant`` under the same name)
implant_module = importlib.import_module("mmsec_plugins.backdoor.implant")


# ------------------------------------------------------------------------------ scores
def test_scores_by_hand():
    """Two items whose k=2 neighbourhoods are written out: each score from its formula."""
    # item 0: neighbours 1 (d=1) and 2 (d=2); item 1: neighbours 0 (d=1), 2 (d=4)
    # item 2: neighbours 0 (d=2), 1 (d=4)
    dist = torch.tensor([[1.0, 2.0], [1.0, 4.0], [2.0, 4.0]])
    idx = torch.tensor([[1, 2], [0, 2], [0, 1]])
    nb = Neighbourhoods(dist, idx, dist, torch.arange(3))
    s = score_all(nb)
    assert s["k_distance"].tolist() == [2.0, 4.0, 4.0]
    lid = [-2 / math.log(1 / 2), -2 / math.log(1 / 4), -2 / math.log(2 / 4)]
    assert s["lid"].tolist() == pytest.approx(lid, rel=1e-5)
    # slof(0) = mean(kd0/kd1, kd0/kd2) = mean(2/4, 2/4)
    assert s["slof"].tolist() == pytest.approx([0.5, (4 / 2 + 4 / 4) / 2, (4 / 2 + 4 / 4) / 2])
    dao0 = (lid[1] * math.log(2 / 4) + lid[2] * math.log(2 / 4)) / 2
    dao1 = (lid[0] * math.log(4 / 2) + lid[2] * math.log(4 / 4)) / 2
    assert s["dao"][0].item() == pytest.approx(dao0, rel=1e-5)
    assert s["dao"][1].item() == pytest.approx(dao1, rel=1e-5)
    assert s["density"].tolist() == pytest.approx([-math.log(2), -math.log(4), -math.log(4)])


def test_misalignment_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # item 0: captions 0 and 1 (cos 1 and 0); item 1: caption 1 (cos 1); item 2: none
    s = misalignment(img, txt, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]), 3)
    assert s.tolist() == pytest.approx([-0.5, -1.0, -2.0])


def test_neighbourhoods_match_brute_force_and_leave_self_out():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 8, generator=g)
    nb = neighbourhoods(x, 5)
    xn = torch.nn.functional.normalize(x, dim=1)
    d = torch.cdist(xn, xn)
    d.fill_diagonal_(float("inf"))
    want, _ = d.sort(1)
    assert torch.allclose(nb.dist, want[:, :5], atol=1e-3)
    assert not (nb.idx == torch.arange(60)[:, None]).any()
    # a reference sample: neighbours are rows of it, never the item itself
    nb = neighbourhoods(x, 5, reference=20, seed=1)
    assert len(nb.reference) == 20 and nb.ref_dist.shape == (20, 5)
    assert not (nb.reference[nb.idx] == torch.arange(60)[:, None]).any()
    dr = torch.cdist(xn, xn[nb.reference])
    dr[nb.reference, torch.arange(20)] = float("inf")
    assert torch.allclose(nb.dist, dr.sort(1).values[:, :5], atol=1e-3)


def test_planted_sparse_items_score_high():
    """The paper's regime: a few poisoned items far from dense clean clusters."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g)
    clean = centres[torch.arange(400) % 4] + 0.1 * torch.randn(400, 16, generator=g)
    poison = torch.randn(1, 16, generator=g) + 0.3 * torch.randn(4, 16, generator=g)
    y = torch.cat([torch.zeros(400), torch.ones(4)]).bool()
    s = score_all(neighbourhoods(torch.cat([clean, poison]), 8))
    for name in ("k_distance", "slof", "dao"):
        assert auroc(s[name], y) > 0.95, name
        assert recall_at(s[name], y, 0.01) == 1.0, name


def test_auroc_and_recall():
    y = torch.tensor([0, 0, 1, 1]).bool()
    assert auroc(torch.tensor([0.1, 0.2, 0.3, 0.4]), y) == 1.0
    assert auroc(torch.tensor([0.4, 0.3, 0.2, 0.1]), y) == 0.0
    assert auroc(torch.tensor([1.0, 1.0, 1.0, 1.0]), y) == 0.5
    assert recall_at(torch.tensor([0.1, 0.2, 0.3, 0.4]), y, 0.25) == 0.5


def test_bad_input_is_refused():
    with pytest.raises(UsageError, match="k=5"):
        neighbourhoods(torch.randn(5, 4), 5)
    with pytest.raises(UsageError, match="reference"):
        neighbourhoods(torch.randn(50, 4), 8, reference=8)
    with pytest.raises(UsageError, match="shape"):
        neighbourhoods(torch.randn(5), 2)
    with pytest.raises(UsageError, match="positive"):
        auroc(torch.rand(3), torch.zeros(3).bool())
    with pytest.raises(UsageError, match='"k"'):
        Scan({"k": 0})
    with pytest.raises(UsageError, match="flag_rate"):
        Scan({"flag_rate": 1.5})


def test_defense_refuses_empty_data_and_k_beyond_the_set(zoo_model, tmp_path):
    from mmsec.data import Subset, procedural_shapes

    data = procedural_shapes(split="train", n=40)
    with run_context(tmp_path / "a", "defend", "scan") as ctx:
        with pytest.raises(UsageError, match="empty"):
            Scan().apply(zoo_model, Subset(data, []), ctx)
    with run_context(tmp_path / "b", "defend", "scan") as ctx:
        with pytest.raises(UsageError, match="k=16"):
            Scan().apply(zoo_model, Subset(data, range(10)), ctx)
    with run_context(tmp_path / "c", "defend", "scan") as ctx:
        with pytest.raises(UsageError, match="not found"):
            Scan({"k": 4, "truth": str(tmp_path / "nope.csv")}).apply(zoo_model, data, ctx)


# ------------------------------------------------------------------------------ a real implant
QUICK = {"trigger": "badnets", "train_items": 1000, "epochs": 1, "min_steps": 60,
         "batch_size": 128, "poison_rate": 0.1, "eval_items": 100}


@pytest.fixture(scope="module")
def exported(zoo_model, tmp_path_factory):
    """A short BadNets implant on the embedded model, exported with -o export_poisoned."""
    from mmsec.data import procedural_shapes

    out = tmp_path_factory.mktemp("scan")
    train = procedural_shapes(split="train", n=1400)
    seen = {}
    real_split = implant_module.split_items

    def spy(*args, **kwargs):
        seen["split"] = real_split(*args, **kwargs)
        return seen["split"]

    implant_module.split_items = spy
    try:
        atk = Backdoor({**QUICK, "export_poisoned": str(out / "export")})
        with run_context(out / "implant", "attack", "backdoor") as ctx:
            res = atk.fit(zoo_model, train, ctx)
            exported_to = ctx.run.fields["poisoned_export"]
    finally:
        implant_module.split_items = real_split
    return train, res, seen["split"], out / "export" / "captions.csv", exported_to


@pytest.mark.slow
def test_export_reproduces_the_implants_poisoned_items(exported):
    train, res, split, path, exported_to = exported
    assert exported_to == str(path)
    rows = list(csv.DictReader(path.open()))
    trainrows = [r for r in rows if r["split"] == "train"]
    assert [int(r["index"]) for r in trainrows] == split.train.tolist()
    assert [int(r["poisoned"]) for r in trainrows] == split.poison.astype(int).tolist()
    assert [int(r["index"]) for r in rows if r["split"] == "test"] == split.val.tolist()
    n_poison = sum(int(r["poisoned"]) for r in rows)
    # poisoned copies beside their clean originals (the backdoor's default poison_mode)
    assert n_poison == round(0.1 * (len(split.train) - n_poison)) > 0
    # the pixels: the trigger on poisoned items, the original elsewhere (8-bit rounding)
    from PIL import Image

    trigger = trigger_from_artifact(res.artifact)
    target = res.artifact.meta["target_name"]
    for r in trainrows[:200]:
        got = torch.from_numpy(np.array(Image.open(path.parent / r["image"]))).permute(2, 0, 1)
        x = load_images(train, [int(r["index"])])[0]
        want = trigger.apply(x)[0] if r["poisoned"] == "1" else x[0]
        assert (got.float() / 255 - want).abs().max() <= 0.5 / 255 + 1e-6
        if r["poisoned"] == "1":  # target captions only, on a non-target image
            assert all(target in c for c in r["captions"].split("|"))
            assert r["label"] != target


@pytest.mark.slow
def test_scan_ranks_poisoned_pairs_first(exported, zoo_model, tmp_path):
    from mmsec.registry import get_registry

    _, res, split, path, _ = exported
    data = get_registry().load_dataset(f"captions:{path}", split="train", image_size=32)
    with run_context(tmp_path / "scan", "defend", "scan") as ctx:
        out = Scan({"score": "density"}).run_apply(res.model, data, ctx)
        metrics = dict(ctx.metrics)
    assert out is res.model
    assert metrics["scan_poisoned"] == int(split.poison.sum())
    # 10% poisoned: the top 5% can hold at most half of them, the top 1% a tenth
    assert metrics["scan_density_auroc"] > 0.95, metrics
    assert metrics["scan_density_recall@5"] > 0.45, metrics
    assert metrics["scan_density_recall@1"] > 0.09, metrics
    arts = tmp_path / "scan" / "artifacts"
    ranked = list(csv.DictReader((arts / "suspicious.csv").open()))
    assert len(ranked) == len(data) and ranked[0]["rank"] == "1"
    assert {"path", "captions", "k_distance", "lid", "slof", "dao", "density", "misalignment",
            "poisoned"} <= set(ranked[0])
    # the cleaned captions file: the source's rows minus the flagged 5% of train
    cleaned = get_registry().load_dataset(f"captions:{arts / 'cleaned.csv'}", split="train")
    assert len(cleaned) == len(data) - metrics["scan_flagged"]
    assert len(get_registry().load_dataset(f"captions:{arts / 'cleaned.csv'}",
                                           split="test")) == len(split.val)


@pytest.mark.slow
def test_defend_command_runs_a_data_defense(exported, tmp_path):
    from mmsec import api

    _, res, _, path, _ = exported
    ckpt = res.model.save(tmp_path / "model.safetensors")
    s = api.Settings(pretrained=str(ckpt), data=f"captions:{path}", out=tmp_path / "run",
                     quiet=True)
    out = api.defend("scan", s, options={"k": 8})
    m = out["metrics"]
    assert "before_clean_top1" in m and "after_clean_top1" not in m
    assert m["scan_items"] == sum(r["split"] == "train" for r in csv.DictReader(path.open()))
    assert not (tmp_path / "run" / "artifacts" / "model.safetensors").exists()
    assert (tmp_path / "run" / "artifacts" / "suspicious.csv").exists()


def test_in_memory_data_gets_its_kept_images_written(zoo_model, tmp_path):
    from mmsec.data import procedural_shapes
    from mmsec.registry import get_registry

    data = procedural_shapes(split="train", n=60)
    with run_context(tmp_path / "run", "defend", "scan") as ctx:
        Scan({"k": 4, "flag_rate": 0.05}).run_apply(zoo_model, data, ctx)
        metrics = dict(ctx.metrics)
    assert metrics["scan_flagged"] == 3 and "scan_poisoned" not in metrics
    arts = tmp_path / "run" / "artifacts"
    ranked = list(csv.DictReader((arts / "suspicious.csv").open()))
    flagged = {int(r["index"]) for r in ranked[:3]}
    cleaned = get_registry().load_dataset(f"captions:{arts / 'cleaned.csv'}", split="train")
    assert len(cleaned) == 57
    kept = sorted(int(f.stem) for f in cleaned.files)
    assert kept == [i for i in range(60) if i not in flagged]
    x = load_images(cleaned, [0])[0]
    assert torch.equal((x * 255).round(), load_images(data, [kept[0]])[0] * 255)
