"""The uap plugin: a universal L-inf perturbation that really fools the embedded model."""

from __future__ import annotations

import contextlib

import pytest
import torch
from mmsec_plugins.uap import UAP

from mmsec.attacks import Artifact
from mmsec.cache import EmbeddingCache
from mmsec.context import RunContext
from mmsec.data import load_images, procedural_shapes
from mmsec.errors import UsageError
from mmsec.runs import Run

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@contextlib.contextmanager
def _ctx(path, resume: bool = False):
    with Run.create(path, "attack", "uap", resume=resume, quiet=True) as run:
        yield RunContext(run, device=torch.device("cpu"), seed=0, cache=EmbeddingCache())


def test_options():
    o = UAP().options
    assert (o.eps, o.loss, o.epochs, o.batch_size, o.train_items) == (16 / 255, "embedding",
                                                                      10, 64, 1000)
    assert UAP({"eps": "8/255"}).options.eps == pytest.approx(8 / 255)
    with pytest.raises(UsageError, match="loss"):
        UAP({"loss": "cosine"})
    with pytest.raises(UsageError, match="eps"):
        UAP({"eps": 0})


@pytest.fixture(scope="module")
def fitted(zoo_model, tmp_path_factory):
    train = procedural_shapes(split="train", n=512)
    attack = UAP({"epochs": 4, "train_items": 512})
    path = tmp_path_factory.mktemp("uap") / "run"
    with _ctx(path) as run:
        art = attack.fit(zoo_model, train, run)
    return attack, art, path


def _fooling(model, head, x, adv):
    with torch.no_grad():
        p0 = (model.encode_image(x) @ head.t()).argmax(1)
        p1 = (model.encode_image(adv) @ head.t()).argmax(1)
    return float((p0 != p1).float().mean())


def test_fools_held_out_images_far_above_its_control(zoo_model, shapes_test, fitted):
    attack, art, path = fitted
    x, _ = load_images(shapes_test, range(400))
    head = zoo_model.zero_shot_head(shapes_test.classnames, shapes_test.templates)
    adv = attack.apply(art, x)
    assert (adv - x).abs().max() <= 16 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    fool = _fooling(zoo_model, head, x, adv)
    ctrl = _fooling(zoo_model, head, x, attack.apply(attack.control(art, seed=1), x))
    assert fool > 0.6 and fool > 3 * ctrl, (fool, ctrl)
    assert (path / "artifacts" / "uap-delta.png").exists()


def test_saved_artifact_reapplies_identically_at_any_size(fitted, tmp_path):
    attack, art, _ = fitted
    art.save(tmp_path / "uap.safetensors")
    again = Artifact.load(tmp_path / "uap.safetensors")
    assert again.options == attack.options_dict() and "eps" not in again.meta  # one copy
    assert UAP(again.options).options == attack.options
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(attack.apply(art, x), attack.apply(again, x))
    big = attack.apply(again, torch.full((2, 3, 64, 48), 0.5))
    assert big.shape == (2, 3, 64, 48) and (big - 0.5).abs().max() <= 16 / 255 + 1e-6
    ctrl = attack.control(again, seed=3).tensors["delta"]
    assert torch.allclose(ctrl.abs(), torch.full_like(ctrl, 16 / 255))
