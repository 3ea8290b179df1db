"""The advclip plugin: patch geometry, G and D, topology terms, training, resume, transfer."""

from __future__ import annotations

import json

import pytest
import torch
from mmsec_plugins.advclip import AdvCLIP
from mmsec_plugins.advclip.attack import _neighbours
from mmsec_plugins.advclip.nets import Discriminator, PatchGenerator
from mmsec_plugins.advclip.patch import fixed_box, paste, patch_side, random_boxes
from mmsec_plugins.advclip.topology import (
    batch_graph,
    fuzzy_cross_entropy,
    knn_rows,
    topology_terms,
)

from mmsec.attacks import Artifact
from mmsec.cache import EmbeddingCache
from mmsec.context import RunContext
from mmsec.data import TensorDataset, procedural_shapes
from mmsec.errors import UsageError
from mmsec.runs import Run

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _ctx(path, resume: bool = False, seed: int = 0) -> RunContext:
    run = Run.create(path, "attack", "advclip", resume=resume, quiet=True)
    return RunContext(run, device=torch.device("cpu"), seed=seed, cache=EmbeddingCache())


@pytest.fixture(scope="module")
def shapes_train():
    """The first 2,000 items of the procedural train split (the 20k split takes ~30 s to render)."""
    return procedural_shapes(split="train", n=2000)


# ------------------------------------------------------------------ options
def test_defaults_are_the_paper_values():
    o = AdvCLIP().options
    assert (o.area, o.position, o.margin) == (0.03, "bottom-right", 14 / 224)
    assert (o.a, o.b, o.c, o.w, o.tau) == (10, 5, 5, 1, 0.1)
    assert (o.epochs, o.batch_size, o.lr, o.beta1, o.beta2) == (20, 16, 2e-4, 0.5, 0.999)
    assert (o.topology, o.k, o.d_clip, o.z_dim) == ("knn", 10, 0.01, 100)


def test_bad_options_are_one_readable_error():
    with pytest.raises(UsageError, match="position"):
        AdvCLIP({"position": "middle"})
    with pytest.raises(UsageError, match="topology"):
        AdvCLIP({"topology": "graph"})
    assert AdvCLIP({"area": "1/20", "train_items": "none"}).options.train_items is None


# ------------------------------------------------------------------ geometry
def test_patch_size_and_place_follow_the_image_size():
    assert patch_side(0.03, 224, 224) == 39 and patch_side(0.03, 32, 32) == 6
    assert fixed_box("bottom-right", 224, 224, 39, 14 / 224) == (171, 171)  # 14 px margin
    assert fixed_box("bottom-right", 32, 32, 6, 14 / 224) == (24, 24)
    assert fixed_box("top-left", 32, 32, 6, 14 / 224) == (2, 2)
    assert fixed_box("center", 32, 48, 6, 0.1) == (13, 21)
    patch = torch.rand(3, 6, 6)
    art = Artifact("advclip", tensors={"patch": patch},
                   meta={"area": 0.03, "position": "bottom-right", "margin": 14 / 224})
    atk = AdvCLIP()
    for size in (28, 32, 64, 224):
        x = torch.zeros(2, 3, size, size)
        out = atk.apply(art, x)
        side = patch_side(0.03, size, size)
        top, left = fixed_box("bottom-right", size, size, side, 14 / 224)
        changed = (out != 0).any(1)[0].nonzero()
        assert changed.min(0).values.tolist() >= [top, left]
        assert changed.max(0).values.tolist() <= [top + side - 1, left + side - 1]
        assert out.shape == x.shape and not x.any()  # the input is not modified


def test_paste_is_differentiable_and_takes_grey_images():
    patch = torch.rand(3, 4, 4, requires_grad=True)
    out = paste(torch.rand(5, 1, 16, 16), patch, (10, 10))
    assert out.shape == (5, 3, 16, 16)
    out.sum().backward()
    assert torch.allclose(patch.grad, torch.full_like(patch, 5.0))
    boxes = random_boxes(5, 16, 16, 4, torch.Generator().manual_seed(0))
    assert all(0 <= t <= 12 and 0 <= s <= 12 for t, s in boxes)
    out = paste(torch.zeros(5, 3, 16, 16), patch.detach(), boxes)
    assert all(torch.equal(out[i, :, t:t + 4, s:s + 4], patch.detach())
               for i, (t, s) in enumerate(boxes))


def test_random_position_is_per_image_and_reproducible():
    atk = AdvCLIP({"position": "random"})
    art = Artifact("advclip", tensors={"patch": torch.ones(3, 6, 6)},
                   meta={"area": 0.03, "position": "random", "seed": 3})
    x = torch.zeros(16, 3, 32, 32)
    out = atk.apply(art, x)
    assert torch.equal(out, atk.apply(art, x))
    places = {tuple((o.sum(0) > 0).nonzero().min(0).values.tolist()) for o in out}
    assert len(places) > 8
    ctrl = atk.control(art, seed=1)
    assert ctrl.tensors["patch"].shape == (3, 6, 6) and ctrl.meta["position"] == "random"
    assert torch.equal((atk.apply(ctrl, x).sum(1) > 0), (out.sum(1) > 0))  # same places


# ------------------------------------------------------------------ networks and losses
@pytest.mark.parametrize("side", [1, 5, 6, 39])
def test_generator_makes_one_patch_whatever_the_batch(side):
    g = PatchGenerator(side, generator=torch.Generator().manual_seed(0))
    p = g()
    assert p.shape == (3, side, side) and 0 <= p.min() and p.max() <= 1
    g.eval()
    assert torch.equal(p, g())  # no running statistics: eval gives the trained patch


@pytest.mark.parametrize("size", [(28, 28), (32, 32), (40, 56), (224, 224)])
def test_discriminator_takes_any_size_and_batch_one(size):
    d = Discriminator(*size)
    assert d(torch.rand(1, 3, *size)).shape == (1,)
    assert d(torch.rand(3, 3, *size)).shape == (3,)
    d.clip_weights(0.01)
    assert all(p.abs().max() <= 0.01 for p in d.parameters())


def test_topology_graphs_and_divergence():
    emb = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    g = batch_graph(emb)
    assert g.shape == (8, 8) and torch.allclose(g.sum(1), torch.ones(8))
    assert fuzzy_cross_entropy(g, g).abs() < 1e-5
    other = batch_graph(torch.randn(8, 16))
    assert fuzzy_cross_entropy(other, g) > 1e-3
    nb = torch.randn(8, 5, 16)
    rows = knn_rows(emb, nb)
    assert rows.shape == (8, 5) and torch.allclose(rows.sum(1), torch.ones(8))
    img, txt = topology_terms("knn", emb, emb, emb, nb, nb)
    assert img.abs() < 1e-5 and txt.abs() < 1e-5
    img, txt = topology_terms("batch", emb, torch.randn(8, 16), None)
    assert img > 0 and txt == 0
    one = topology_terms("batch", emb[:1], emb[:1], emb[:1])  # a batch of one
    assert all(torch.isfinite(t) for t in one)


def test_knn_neighbours_never_include_the_item_itself():
    from mmsec.cache import VectorIndex

    emb = torch.nn.functional.normalize(torch.randn(50, 8), dim=-1)
    emb[1] = emb[0]  # a duplicate may rank before the item itself
    nb = _neighbours(VectorIndex(emb, kind="exact"), emb[:10], torch.arange(10), 4)
    assert nb.shape == (10, 4)
    assert not (nb == torch.arange(10)[:, None]).any()
    assert 1 in nb[0].tolist() and 0 in nb[1].tolist()


# ------------------------------------------------------------------ training
def _fit(model, data, path, **options):
    ctx = _ctx(path)
    try:
        return AdvCLIP(options).fit(model, data, ctx), ctx
    finally:
        ctx.run.close()


def test_batch_topology_with_a_short_last_batch(zoo_model, shapes_train, tmp_path):
    # 33 images in batches of 16: the last batch holds one image (the official G crashes)
    art, ctx = _fit(zoo_model, shapes_train, tmp_path / "r", topology="batch", epochs=1,
                    train_items=33, val_items=0)
    assert art.meta["topology"] == "batch" and art.meta["steps"] == 3
    assert art.tensors["patch"].shape == (3, 6, 6)
    assert all(p.requires_grad for p in zoo_model.parameters())  # the model is given back


def test_captions_come_from_templates_when_the_data_has_only_labels(zoo_model, tmp_path):
    base = procedural_shapes(split="train", n=64)
    data = TensorDataset(base.images, base.labels(), name="labels-only", split="train",
                         classnames=base.classnames, templates=base.templates)
    assert not data.has_captions
    art, ctx = _fit(zoo_model, data, tmp_path / "r", epochs=1, train_items=48, k=3,
                    val_items=16)
    history = json.dumps(ctx.run.sections)
    assert "nce_txt" in history and art.meta["k"] == 3


def test_vit_tower_and_any_input_size(tiny_vit, tmp_path):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 256, (40, 3, 40, 40), dtype=torch.uint8, generator=g),
                         torch.arange(40) % 4, name="noise", split="train",
                         classnames=["cat", "dog", "bird", "fish"])
    art, _ = _fit(tiny_vit, data, tmp_path / "r", epochs=1, train_items=24, k=3, val_items=8,
                  position="random")
    side = patch_side(0.03, 40, 40)
    assert art.tensors["patch"].shape == (3, side, side) and art.meta["image_size"] == [40, 40]
    out = AdvCLIP().apply(art, torch.rand(3, 3, 64, 48))
    assert out.shape == (3, 3, 64, 48)


@pytest.mark.slow
def test_resume_continues_a_killed_run_exactly(zoo_model, shapes_train, tmp_path):
    opts = dict(epochs=2, train_items=32, val_items=0, k=3)
    straight, _ = _fit(zoo_model, shapes_train, tmp_path / "a", **opts)
    # "killed" after its first epoch: the checkpoint of epoch 1 is on disk
    _fit(zoo_model, shapes_train, tmp_path / "b", **{**opts, "epochs": 1})
    ctx = _ctx(tmp_path / "b", resume=True)
    try:
        resumed = AdvCLIP(opts).fit(zoo_model, shapes_train, ctx)
    finally:
        ctx.run.close()
    assert "advclip: resumed at epoch 2" in (tmp_path / "b" / "run.log").read_text()
    assert resumed.meta["steps"] == straight.meta["steps"] == 4
    assert torch.equal(resumed.tensors["patch"], straight.tensors["patch"])


@pytest.mark.slow
def test_cli_attack_beats_the_noise_control_resumes_and_transfers(zoo_model, shapes_train,
                                                                  monkeypatch, tmp_path):
    """`mmsec attack -p advclip` on the embedded model, a short schedule: a real drop, well
    beyond a noise patch of the same size and place; `--resume`; the patch on another model."""
    import copy

    from click.testing import CliRunner

    from mmsec import data as mdata
    from mmsec.cli import main

    monkeypatch.setitem(mdata.PROCEDURAL_SIZES, "train", 2000)  # the 20k split renders in ~30 s
    run = tmp_path / "attack"
    args = ["attack", "-p", "advclip", "-o", "train_items", "500", "-o", "area", "0.02",
            "-o", "val_items", "0", "--limit", "500", "--out", str(run), "-q"]
    res = CliRunner().invoke(main, [*args, "-o", "epochs", "2"])
    assert res.exit_code == 0, res.output
    m = json.loads((run / "results.json").read_text())["metrics"]
    assert m["clean_top1"] > 0.9
    assert m["adv_top1"] < m["clean_top1"] - 0.4, m
    assert m["fooling_rate"] > 2.5 * m["control_fooling_rate"], m
    assert m["knn_fooling_rate"] > 2 * m["control_knn_fooling_rate"], m
    assert m["adv_i2t_r1"] < m["control_i2t_r1"] < m["clean_i2t_r1"], m
    assert m["advclip_steps"] == 2 * 32
    files = {p.name for p in (run / "artifacts").iterdir()}
    assert {"advclip.safetensors", "patch.png", "patch_large.png", "generator.safetensors"} <= files
    assert "artifacts/patch.png" in (run / "report.md").read_text()

    # --resume continues the run from its last epoch checkpoint
    res = CliRunner().invoke(main, [*args, "-o", "epochs", "3", "--resume"])
    assert res.exit_code == 0, res.output
    assert "advclip: resumed at epoch 3" in (run / "run.log").read_text()
    assert json.loads((run / "results.json").read_text())["metrics"]["advclip_steps"] == 3 * 32

    # the saved patch on another model is one command (here: a perturbed copy of the model)
    other = copy.deepcopy(zoo_model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in other.clip.visual.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05 * p.std().nan_to_num())
    other.save(tmp_path / "other.safetensors")
    res = CliRunner().invoke(main, [
        "eval", "--pretrained", str(tmp_path / "other.safetensors"), "--limit", "300",
        "--knn-bank", "0", "--attack-artifact", str(run / "artifacts" / "advclip.safetensors"),
        "--out", str(tmp_path / "transfer"), "-q"])
    assert res.exit_code == 0, res.output
    t = json.loads((tmp_path / "transfer" / "results.json").read_text())["metrics"]
    assert t["fooling_rate"] > t["control_fooling_rate"], t
