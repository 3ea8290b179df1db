"""Robust and clean fine-tuning on the embedded model: FARE raises robust accuracy, TeCoA
and PMG-AFT train on their losses, CleanCLIP removes most of a backdoor; the robust
evaluators (mmsec's PGD, torchattacks' APGD) agree on the same images."""

from __future__ import annotations

import json

import mmsec_plugins.finetune as finetune
import pytest
import torch
from mmsec_plugins.finetune import FARE, PMGAFT, CleanCLIP, TeCoA

from mmsec import Subset, Victim, load_images
from mmsec.errors import UsageError
from mmsec.testing import invoke, make_registry, run_context, use_registry

pytestmark = pytest.mark.usefixtures("one_thread")


def test_defaults_are_the_papers():
    f = FARE().options
    assert (f.steps, f.batch_size, f.warmup_steps, f.lr, f.weight_decay) == (20000, 128, 1400,
                                                                             1e-5, 1e-4)
    assert (f.eps, f.attack_steps, f.step_size, f.momentum, f.tower) == (2 / 255, 10, 1 / 255,
                                                                          0.9, "image")
    t = TeCoA().options
    assert (t.optimizer, t.epochs, t.warmup_steps, t.eps, t.attack_steps) == ("sgd", 10, 1000,
                                                                              1 / 255, 2)
    assert t.template == "This is a photo of a {}"
    p = PMGAFT().options
    assert (p.optimizer, p.lr, p.epochs, p.eps, p.attack_steps) == ("sgd", 5e-5, 10, 1 / 255, 2)
    c = CleanCLIP().options
    assert (c.lr, c.weight_decay, c.batch_size, c.epochs, c.warmup_steps, c.tower) == (
        1e-5, 0.1, 64, 10, 50, "all")
    with pytest.raises(UsageError, match="loss"):
        TeCoA({"loss": "triplet"})


def _robust_top1(model, data, eps=4 / 255, steps=10) -> float:
    from mmsec_plugins.pgd import PGD

    attack = PGD({"eps": eps, "steps": steps})
    x, y = load_images(data, range(len(data)))
    victim = Victim(model, data.classnames, data.templates)
    adv = attack.perturb(attack.artifact(meta={"seed": 0}), x, y, victim=victim)
    with torch.no_grad():
        return float(((model.encode_image(adv) @ victim.head.t()).argmax(1) == y).float().mean())


@pytest.mark.slow
def test_fare_raises_robust_accuracy_well_above_the_originals(zoo_model, shapes_test, tmp_path):
    from mmsec.data import procedural_shapes

    clean = procedural_shapes(split="train", n=2000)
    test = Subset(shapes_test, range(300))
    fare = FARE({"steps": 150, "batch_size": 64, "lr": 2e-3, "warmup_steps": 15,
                 "eps": 4 / 255, "attack_steps": 5})
    with run_context(tmp_path / "run", "defend", "fare",
                     registry=make_registry(finetune, builtins=False)) as run:
        robust = fare.run_apply(zoo_model, clean, run)
    before, after = _robust_top1(zoo_model, test), _robust_top1(robust, test)
    print(f"FARE: PGD-10 robust top-1 at 4/255 {before:.3f} -> {after:.3f}")
    assert after > before + 0.15, (before, after)
    x, y = load_images(test, range(len(test)))
    head = robust.zero_shot_head(test.classnames, test.templates)
    with torch.no_grad():
        acc = float(((robust.encode_image(x) @ head.t()).argmax(1) == y).float().mean())
    assert acc > 0.8  # clean accuracy kept


@pytest.mark.parametrize("cls,extra", [(TeCoA, {}), (PMGAFT, {}),
                                       (TeCoA, {"loss": "focal", "preserve": "teacher"}),
                                       (PMGAFT, {"hard_class_reweight": 1.0})])
def test_supervised_defenses_train_on_their_losses(cls, extra, zoo_model, tmp_path):
    from mmsec.data import procedural_shapes

    data = procedural_shapes(split="train", n=64)
    dfn = cls({"steps": 2, "batch_size": 32, "warmup_steps": 0, **extra})
    with run_context(tmp_path / "run", "defend", dfn.name,
                     registry=make_registry(finetune, builtins=False)) as run:
        out = dfn.run_apply(zoo_model, data, run)
        metrics = dict(run.metrics)
    assert metrics[f"{dfn.name}_steps"] == 2 and out is not zoo_model
    changed = [k for k, v in out.state_dict().items()
               if not torch.equal(v, zoo_model.state_dict()[k])]
    assert changed and all(k.startswith("clip.visual.") for k in changed)  # image tower only


@pytest.mark.slow
def test_cleanclip_removes_most_of_a_badnets_backdoor(zoo_model, shapes_test, tmp_path):
    from mmsec_plugins.backdoor import Backdoor

    from mmsec.data import procedural_shapes

    train = procedural_shapes(split="train", n=3300)
    reg = make_registry(finetune, builtins=["backdoor"])
    with use_registry(reg), run_context(tmp_path / "implant", plugin="backdoor",
                                        registry=reg) as run:
        attack = Backdoor({"trigger": "badnets", "epochs": 3, "batch_size": 128,
                           "train_items": 3000, "eval_items": 0})
        res = attack.fit(zoo_model, train, run)
    spec, victim = res.artifact, res.model
    test = Subset(shapes_test, range(400))

    def ca_asr(model):
        x, y = load_images(test, range(len(test)))
        head = model.zero_shot_head(test.classnames, test.templates)
        t = spec.meta["target"]
        with torch.no_grad():
            clean = (model.encode_image(x) @ head.t()).argmax(1)
            trig = (model.encode_image(attack.apply(spec, x[y != t])) @ head.t()).argmax(1)
        return float((clean == y).float().mean()), float((trig == t).float().mean())

    ca0, asr0 = ca_asr(victim)
    assert asr0 > 0.7, asr0
    clean = procedural_shapes(split="train", n=1000, seed=1)
    dfn = CleanCLIP({"epochs": 8, "lr": 2e-3, "batch_size": 64, "warmup_steps": 10})
    with run_context(tmp_path / "defend", "defend", "cleanclip", registry=reg) as run:
        repaired = dfn.run_apply(victim, clean, run)
    ca1, asr1 = ca_asr(repaired)
    print(f"CleanCLIP: CA {ca0:.3f} -> {ca1:.3f}, ASR {asr0:.3f} -> {asr1:.3f}")
    assert asr1 < 0.5 * asr0, (asr0, asr1)
    assert ca1 > ca0 - 0.1, (ca0, ca1)


def test_pgd_agrees_with_torchattacks_on_the_same_images(zoo_model, shapes_test):
    """mmsec's PGD and torchattacks' PGD (no random start, same eps and steps) reach the same
    robust accuracy on the same images, and APGD-CE is at least as strong."""
    ta = pytest.importorskip("torchattacks")
    from mmsec_plugins.pgd import PGD
    from mmsec_plugins.robust import APGD, ZeroShotClassifier

    test = Subset(shapes_test, range(200))
    x, y = load_images(test, range(len(test)))
    victim = Victim(zoo_model, test.classnames, test.templates)
    ours = PGD({"eps": 2 / 255, "steps": 10, "random_start": False})
    adv = ours.perturb(ours.artifact(meta={"seed": 0}), x, y, victim=victim)
    classifier = ZeroShotClassifier(zoo_model, victim.head).eval()
    theirs = ta.PGD(classifier, eps=2 / 255, alpha=1 / 255, steps=10, random_start=False)(x, y)

    def acc(images):
        with torch.no_grad():
            return float((classifier(images).argmax(1) == y).float().mean())

    a_ours, a_theirs = acc(adv), acc(theirs)
    print(f"robust top-1 at 2/255: mmsec PGD {a_ours:.3f}, torchattacks PGD {a_theirs:.3f}")
    assert abs(a_ours - a_theirs) <= 0.04 and a_ours < acc(x) - 0.3
    apgd = APGD({"eps": 2 / 255, "steps": 20})
    a_apgd = acc(apgd.perturb(apgd.artifact(meta={"seed": 0}), x, y, victim=victim))
    assert a_apgd <= a_ours + 0.02


def test_eval_robust_reports_clean_and_robust_top1(tmp_path):
    r = invoke("eval", "--robust", "pgd", "-o", "eps", "2/255", "-o", "steps", "3",
               "--limit", "50", "--knn-bank", "0", "--out", tmp_path / "e", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    m = res["metrics"]
    assert m["robust_top1"] < m["clean_top1"] and res["options"]["steps"] == 3
    assert any(p["name"] == "pgd" for p in res["plugins"])
    bad = invoke("eval", "--robust", "uap", "--out", tmp_path / "x")
    assert bad.exit_code == 2 and "per-image" in bad.stderr


def test_a_recipe_fine_tunes_then_measures_robust_accuracy_of_the_saved_model(tmp_path):
    recipe = tmp_path / "robust.yaml"
    recipe.write_text(
        "steps:\n"
        "  - {id: fare, kind: defend, plugin: fare, clean_items: 32, limit: 20,\n"
        "     options: {steps: 2, batch_size: 16, warmup_steps: 0, attack_steps: 1}}\n"
        "  - {id: robust, kind: eval, model_from: fare, robust: pgd, limit: 40, knn_bank: 0,\n"
        "     options: {eps: 4/255, steps: 2}}\n")
    r = invoke("run", recipe, "--out", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.output
    fare, robust = json.loads(r.stdout)["steps"]
    assert fare["model_checkpoint"].endswith("model.safetensors")
    m = robust["metrics"]
    assert robust["options"]["eps"] == pytest.approx(4 / 255)
    assert m["robust_top1"] < m["clean_top1"]


@pytest.mark.slow
def test_autoattack_is_at_least_as_strong_as_its_apgd_ce_alone(tmp_path):
    """AutoAttack (torchattacks, standard version) runs APGD-CE first and then more attacks
    on what survives, so its robust top-1 can only be lower or equal."""
    out = {}
    for name, extra in (("autoattack", []), ("apgd", ["-o", "steps", "100"])):
        r = invoke("eval", "--robust", name, "-o", "eps", "1/255", *extra, "--limit", "24",
                   "--knn-bank", "0", "--out", tmp_path / name, "--json")
        assert r.exit_code == 0, r.output
        out[name] = json.loads(r.stdout)["metrics"]
    assert out["autoattack"]["clean_top1"] == out["apgd"]["clean_top1"]
    assert out["autoattack"]["robust_top1"] < out["autoattack"]["clean_top1"]
    assert out["autoattack"]["robust_top1"] <= out["apgd"]["robust_top1"]
