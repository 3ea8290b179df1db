"""The cpgc plugin: C-PGC's loss as the official code computes it, generators independent of
the batch size, and on the embedded model a perturbation and a word that really break
image-text alignment, far beyond their controls."""

from __future__ import annotations

import math

import mmsec_plugins.cpgc as cpgc_plugin
import pytest
import torch
from mmsec_plugins.cpgc import CPGC
from mmsec_plugins.cpgc.attack import _contrastive, _scaled_views
from mmsec_plugins.cpgc.nets import ImageGenerator, WordGenerator
from mmsec_plugins.cpgc.words import STOP_WORDS, important_words

from mmsec import Artifact, Evaluation, Subset, Victim
from mmsec.testing import make_registry, run_context, use_registry

pytestmark = pytest.mark.usefixtures("one_thread")


def test_defaults_are_the_papers():
    o = CPGC().options
    assert (o.eps, o.epochs, o.batch_size, o.lr, o.beta1, o.beta2) == (12 / 255, 40, 4, 2e-4,
                                                                       0.5, 0.999)
    assert (o.tau, o.alpha, o.scales, o.noise_std, o.target, o.target_batch) == (
        0.1, 0.1, [0.5, 0.75, 1.25, 1.5], 0.05, "batch", 4)


def test_contrastive_loss_matches_a_hand_computed_value():
    """log(S_own / (S_own + S_tgt)), the batch mean inside the log (the official formula)."""
    adv = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    own = [torch.tensor([0, 2]), torch.tensor([1])]
    tgt = [torch.tensor([1]), torch.tensor([0, 2])]
    tau = 0.1
    e = math.exp
    s_own = (e(1.0 / tau) + e(0.8 / tau) + e(0.8 / tau)) / 2
    s_tgt = (e(0.0 / tau) + e(0.6 / tau) + e((0.48 + 0.48) / tau)) / 2
    expected = math.log(s_own / (s_own + s_tgt))
    assert float(_contrastive(adv, text, own, tgt, tau)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("n", [1, 3, 7])
def test_generators_give_one_output_whatever_the_batch(n):
    g = ImageGenerator(32, 16, z_dim=8, width=16, generator=torch.Generator().manual_seed(0))
    delta = g(torch.randn(n, 16), 12 / 255)
    assert delta.shape == (3, 32, 32) and delta.abs().max() <= 12 / 255
    w = WordGenerator(24, 16, generator=torch.Generator().manual_seed(0))
    e = w(torch.randn(n, 16), 0.5, 0.9)
    assert e.shape == (24,) and 0.5 - 1e-6 <= float(e.detach().norm()) <= 0.9 + 1e-6


def test_scaled_views_are_the_original_plus_each_scale():
    x = torch.rand(2, 3, 32, 32)
    views = _scaled_views(x, 12 / 255, [0.5, 1.5], 0.05, torch.Generator().manual_seed(0))
    assert len(views) == 3 and all(v.shape == x.shape for v in views)
    assert (views[0] - x).abs().max() <= 12 / 255 + 1e-6  # uniform pre-noise on the original
    assert all(0 <= v.min() and v.max() <= 1 for v in views)


def test_important_word_is_a_content_word(zoo_model):
    texts = ["a photo of a red circle.", "the of and"]
    spans = important_words(zoo_model, texts)
    start, end = spans[0]
    assert texts[0][start:end].lower() not in STOP_WORDS and spans[1] is None


@pytest.fixture(scope="module")
def fitted(zoo_model, tmp_path_factory):
    from mmsec.data import procedural_shapes

    train = procedural_shapes(split="train", n=400)
    reg = make_registry(cpgc_plugin, builtins=False)
    attack = CPGC({"epochs": 3, "train_items": 320, "batch_size": 8})
    with use_registry(reg), run_context(tmp_path_factory.mktemp("cpgc") / "run",
                                        plugin="cpgc", registry=reg) as run:
        art = attack.fit(zoo_model, train, run)
        steps = run.metrics["cpgc_steps"]
    return attack, art, steps


def test_fools_far_more_than_its_control_and_the_word_beats_a_random_one(zoo_model, shapes_test,
                                                                        fitted):
    attack, art, steps = fitted
    assert steps == 3 * 40
    test = Subset(shapes_test, range(300))
    ev = Evaluation(zoo_model, test, _cache())
    rows = ev.measure([ev.clean(), *ev.attacked(attack, art),
                       *ev.attacked(attack, attack.control(art, 0), condition="control")])
    m = {r.key: r.value for r in rows}
    print({k: round(v, 3) for k, v in m.items() if "r1" in k or "fool" in k})
    assert m["adv_image_fooling_rate"] > 3 * m["control_image_fooling_rate"] + 0.05, m
    assert m["adv_image_retrieval_asr_i2t_r1"] > 3 * m["control_image_retrieval_asr_i2t_r1"]
    word = art.meta["word"]
    assert word in zoo_model.vocabulary().words and word not in STOP_WORDS
    # the learned word lowers text->image recall more than a random word at the same place
    assert m["adv_text_t2i_r1"] < m["control_text_t2i_r1"] < m["clean_t2i_r1"], m
    assert m["retrieval_asr_t2i_r1"] > m["adv_image_retrieval_asr_t2i_r1"]  # both > one


def test_saved_artifact_reapplies_identically_at_another_size(zoo_model, fitted, tmp_path):
    attack, art, _ = fitted
    again = Artifact.load(art.save(tmp_path / "cpgc.safetensors"))
    rebuilt = CPGC(again.options)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(rebuilt.apply(again, x), attack.apply(art, x))
    big = torch.full((2, 3, 64, 48), 0.5)
    out = rebuilt.apply(again, big)
    assert out.shape == big.shape and (out - 0.5).abs().max() <= 12 / 255 + 1e-6
    texts = ["a photo of a red circle."]
    victim = Victim(zoo_model)
    assert rebuilt.apply_text(again, texts, victim=victim) == attack.apply_text(
        art, texts, victim=victim)
    assert art.meta["word"] in rebuilt.apply_text(again, texts, victim=victim)[0]


def test_farthest_target_and_no_text(zoo_model, shapes_test, tmp_path):
    """Data without captions (Fashion-MNIST-like): the image generator alone still trains
    and fools far more than its control; no text conditions are reported."""
    from mmsec.data import TensorDataset, procedural_shapes

    base = procedural_shapes(split="train", n=200)
    labels_only = TensorDataset(base.images, base.labels(), name="labels", split="train",
                                classnames=base.classnames, templates=base.templates)
    attack = CPGC({"epochs": 2, "train_items": 160, "batch_size": 8, "target": "farthest"})
    with run_context(tmp_path / "run", plugin="cpgc",
                     registry=make_registry(builtins=False)) as run:
        art = attack.fit(zoo_model, labels_only, run)
    assert "word" not in art.meta and art.meta["text"] is False  # no real captions: image only
    assert attack.apply_text(art, ["a circle"], victim=Victim(zoo_model)) == ["a circle"]
    ev = Evaluation(zoo_model, Subset(shapes_test, range(300)), _cache())
    rows = ev.measure([*ev.attacked(attack, art),
                       *ev.attacked(attack, attack.control(art, 0), condition="control")])
    m = {r.key: r.value for r in rows}
    assert not any(k.startswith(("adv_text", "adv_image")) for k in m)
    assert m["fooling_rate"] > 3 * m["control_fooling_rate"] + 0.05, m


def _cache():
    from mmsec import EmbeddingCache

    return EmbeddingCache()


def test_resume_after_a_kill_gives_the_same_perturbation(zoo_model, tmp_path, monkeypatch):
    from mmsec.data import procedural_shapes
    from mmsec.runs import Run

    train = procedural_shapes(split="train", n=40)
    opts = {"epochs": 2, "train_items": 32, "batch_size": 8}
    reg = make_registry(builtins=False)
    with run_context(tmp_path / "a", plugin="cpgc", registry=reg) as run:
        straight = CPGC(opts).fit(zoo_model, train, run)
    save = Run.save_checkpoint

    def save_then_die(self, state, meta, *, slot="main", rng=True):
        save(self, state, meta, slot=slot, rng=rng)
        raise KeyboardInterrupt  # killed after the first epoch's checkpoint

    monkeypatch.setattr(Run, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt), run_context(tmp_path / "b", plugin="cpgc",
                                                       registry=reg) as run:
        CPGC(opts).fit(zoo_model, train, run)
    monkeypatch.setattr(Run, "save_checkpoint", save)
    with run_context(tmp_path / "b", plugin="cpgc", registry=reg, resume=True) as run:
        resumed = CPGC(opts).fit(zoo_model, train, run)
    assert "resumed at epoch 2" in (tmp_path / "b" / "run.log").read_text()
    assert torch.allclose(resumed.tensors["delta"], straight.tensors["delta"], atol=1e-6)
    assert resumed.meta["word"] == straight.meta["word"]
