"""The backdoor plugin: triggers (deterministic, bounded, any size), the spec, the implant,
`mmsec eval --trigger` and resume."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from mmsec_plugins.backdoor import TRIGGERS, Backdoor, trigger_from_artifact
from mmsec_plugins.backdoor.implant import Target, resolve_target

from mmsec.attacks import Artifact
from mmsec.context import RunContext
from mmsec.errors import UsageError
from mmsec.runs import Run

KINDS = sorted(TRIGGERS)


def smooth_images(size: int, n: int = 2) -> torch.Tensor:
    """Low-frequency colour images, the same picture at every size."""
    u = (torch.arange(size) + 0.5) / size
    base = torch.stack([
        0.5 + 0.3 * torch.sin(2 * math.pi * u)[None, :] * torch.cos(2 * math.pi * u)[:, None],
        0.5 + 0.3 * torch.cos(2 * math.pi * u)[None, :].expand(size, size),
        0.4 + 0.4 * u[:, None].expand(size, size),
    ])
    return torch.stack([base * (0.6 + 0.4 * k / max(1, n - 1)) for k in range(n)])


def make_trigger(kind: str, seed: int = 0, **options):
    opts = Backdoor({"trigger": kind, **options}).options.model_dump()
    return TRIGGERS[kind].create(opts, seed)


@contextlib.contextmanager
def run_context(out, *, resume: bool = False, seed: int = 0):
    """A RunContext on a run folder at ``out`` (marked failed if the block raises)."""
    with Run.create(out, "attack", "backdoor", resume=resume, quiet=True) as run:
        yield RunContext(run, device=torch.device("cpu"), seed=seed)


# ------------------------------------------------------------------------------ triggers
@pytest.mark.parametrize("kind", KINDS)
def test_trigger_is_deterministic_and_bounded(kind):
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = make_trigger(kind)
    a, b = t.apply(x), make_trigger(kind).apply(x.clone())
    assert torch.equal(a, b)  # same seed, same pixels
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert (a - x).abs().mean() > 0.005  # it does something
    assert torch.equal(x, x.clamp(0, 1))  # the input is not modified in place
    edge = t.apply(torch.cat([torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32)]))
    assert edge.min() >= 0 and edge.max() <= 1


@pytest.mark.parametrize("kind", KINDS)
def test_trigger_is_size_independent(kind):
    t = make_trigger(kind)
    small = t.apply(smooth_images(32))
    large = F.avg_pool2d(t.apply(smooth_images(64)), 2)
    assert (small - large).abs().mean() < 0.02
    for h, w in ((28, 28), (224, 200), (7, 9)):
        out = t.apply(torch.rand(2, 3, h, w))
        assert out.shape == (2, 3, h, w) and out.min() >= 0 and out.max() <= 1


def test_badnets_patch_covers_the_same_fraction_and_random_places_vary():
    t = make_trigger("badnets")
    for size, side, margin in ((32, 6, 1), (64, 12, 2), (224, 42, 7), (28, 5, 1)):
        x = torch.full((1, 3, size, size), 0.5)
        changed = (t.apply(x) != x).any(1)[0]
        rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
        assert t.side(size, size) == side
        for idx in (rows, cols):  # bottom-right corner, the same relative margin
            assert int(idx.min()) >= size - side - margin and int(idx.max()) == size - 1 - margin
    rnd = make_trigger("badnets", patch_location="random")
    x = torch.full((8, 3, 32, 32), 0.5)
    a = rnd.apply(x)
    assert torch.equal(a, rnd.apply(x))  # seeded: deterministic
    places = {tuple((a[i] != 0.5).any(0).nonzero().min(0).values.tolist()) for i in range(8)}
    assert len(places) > 1


def pasted(x: torch.Tensor, trigger, top: int, left: int) -> torch.Tensor:
    """``x`` with ``trigger``'s BadNets pattern pasted at ``(top, left)``, written out by hand."""
    p = trigger.side(*x.shape[-2:])
    out = x.clone()
    out[:, :, top:top + p, left:left + p] = F.interpolate(trigger.tensors["pattern"][None],
                                                          size=(p, p))[0]
    return out


@pytest.mark.parametrize("location", ["bottom-right", "bottom-left", "top-left", "top-right",
                                      "center"])
def test_badnets_patch_goes_where_its_location_says(location):
    t = make_trigger("badnets", patch_location=location, patch_margin=2 / 32)
    for h, w in ((32, 32), (96, 64)):
        x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h))
        p, m = t.side(h, w), round(2 / 32 * min(h, w))
        vertical, _, horizontal = location.partition("-")
        top = {"top": m, "bottom": h - p - m, "center": (h - p) // 2}[vertical]
        left = {"left": m, "right": w - p - m, "": (w - p) // 2}[horizontal]
        assert torch.equal(t.apply(x), pasted(x, t, top, left)), (location, h, w)


def test_badnets_old_fixed_specs_apply_as_bottom_right(tmp_path):
    old = make_trigger("badnets", seed=3, patch_location="fixed")
    new = make_trigger("badnets", seed=3)
    assert new.params["patch_location"] == "bottom-right"
    art = Backdoor({"trigger": "badnets"}).spec(old, Target(0, "circle"), seed=3)
    loaded = trigger_from_artifact(str(art.save(tmp_path / "old.safetensors")))
    assert loaded.params["patch_location"] == "fixed"
    for size in ((32, 32), (28, 40)):
        x = torch.rand(3, 3, *size)
        assert torch.equal(loaded.apply(x), new.apply(x))
        # what mmsec <= 0.2 did for "fixed": bottom-right, the margin from both edges
        p, m = new.side(*size), round(new.params["patch_margin"] * min(size))
        assert torch.equal(loaded.apply(x), pasted(x, new, size[0] - p - m, size[1] - p - m))


@pytest.mark.parametrize("kind", KINDS)
def test_control_is_another_trigger_of_the_same_type(kind):
    atk = Backdoor({"trigger": kind})
    art = atk.spec(make_trigger(kind), Target(0, "circle"))
    ctl = atk.control(art, seed=0)  # the trigger's own seed still gives another pattern
    x = smooth_images(32, 4)
    assert ctl.meta["trigger"] == kind and ctl.meta["target_name"] == "circle"
    assert set(ctl.tensors) == set(art.tensors)
    assert all(ctl.tensors[k].shape == v.shape for k, v in art.tensors.items())
    assert not torch.allclose(atk.apply(ctl, x), atk.apply(art, x))
    assert torch.equal(atk.apply(ctl, x), atk.apply(atk.control(art, seed=0), x))


@pytest.mark.parametrize("kind", KINDS)
def test_saved_spec_reapplies_the_exact_pixels(kind, tmp_path):
    atk = Backdoor({"trigger": kind})
    art = atk.spec(make_trigger(kind, seed=5), Target(3, "star"), seed=5)
    path = art.save(tmp_path / "backdoor.safetensors")
    loaded = Artifact.load(path)
    assert loaded.plugin == "backdoor" and loaded.meta["target_name"] == "star"
    assert loaded.meta["trigger"] == kind and loaded.meta["params"]["seed"] == 5
    x = torch.rand(3, 3, 40, 40)
    again = Backdoor(loaded.options)  # how `mmsec eval --trigger` rebuilds it
    assert torch.equal(again.apply(loaded, x), atk.apply(art, x))
    assert torch.equal(trigger_from_artifact(str(path)).apply(x), atk.apply(art, x))


def test_options_are_validated():
    with pytest.raises(UsageError, match="trigger"):
        Backdoor({"trigger": "nope"})
    with pytest.raises(UsageError, match="poison_rate"):
        Backdoor({"poison_rate": 1.5})
    assert Backdoor({"blend_alpha": "1/5"}).options.blend_alpha == pytest.approx(0.2)


def test_target_from_name_index_caption_or_default(zoo_model, shapes_test):
    assert resolve_target(None, shapes_test, zoo_model) == Target(0, "circle")
    assert resolve_target("Star", shapes_test, zoo_model) == Target(3, "star")
    assert resolve_target("5", shapes_test, zoo_model) == Target(5, "ring")
    t = resolve_target("a photo of a red heart", shapes_test, zoo_model)
    assert t == Target(8, "heart", "a photo of a red heart")
    with pytest.raises(UsageError, match="out of range"):
        resolve_target("42", shapes_test, zoo_model)


def test_poisoned_copies_keep_their_clean_originals():
    from mmsec_plugins.backdoor.implant import split_items

    labels = torch.arange(1000) % 10
    copy = split_items(labels, 0, 0.1, 800, 100, seed=1)
    replace = split_items(labels, 0, 0.1, 800, 100, seed=1, mode="replace")
    for s in (copy, replace):
        assert int(s.poison.sum()) == 80 and (labels[s.train[s.poison]] != 0).all()
        assert not set(s.val) & set(s.train)
    assert len(copy.train) == 880 and len(replace.train) == 800
    clean = set(copy.train[~copy.poison].tolist())
    assert clean == set(replace.train.tolist())  # the same 800 items, all clean once
    assert set(copy.train[copy.poison].tolist()) <= clean
    assert not set(replace.train[replace.poison].tolist()) & set(replace.train[~replace.poison])


# ------------------------------------------------------------------------------ implants
# A short schedule on 3,000 training items: enough for a clear backdoor in well under a
# minute; the defaults (all 20,000 items, 4 epochs) are what the reported table uses.
QUICK = {"train_items": 3000, "epochs": 3, "poison_rate": 0.15, "batch_size": 128,
         "eval_items": 0, "min_steps": 150}


@pytest.fixture(scope="module")
def shapes_train():
    from mmsec.data import procedural_shapes

    return procedural_shapes(split="train", n=3300)


@pytest.fixture(scope="module")
def eval_set(shapes_test):
    from mmsec.data import Subset

    return Subset(shapes_test, range(400))  # what `--limit 400` evaluates on


def zero_shot_rates(model, data, atk, artifact) -> tuple[float, float]:
    """(clean accuracy, ASR on non-target items) of ``model`` with the trigger."""
    from mmsec.data import load_images

    x, y = load_images(data, range(len(data)))
    head = model.zero_shot_head(data.classnames, data.templates)
    with torch.no_grad():
        clean = (model.encode_image(x) @ head.t()).argmax(1).cpu()
        trig = (model.encode_image(atk.apply(artifact, x)) @ head.t()).argmax(1).cpu()
    t = artifact.meta["target"]
    return float((clean == y).float().mean()), float((trig[y != t] == t).float().mean())


def implant(kind, zoo_model, train, out, **options):
    atk = Backdoor({"trigger": kind, **QUICK, **options})
    fingerprint = zoo_model.fingerprint
    with run_context(out) as ctx:
        res = atk.fit(zoo_model, train, ctx)
        stats = dict(ctx.metrics)
    assert zoo_model.fingerprint == fingerprint  # the original model is left untouched
    return atk, res.artifact, res.model, stats


@pytest.fixture(scope="module")
def badnets_implant(zoo_model, shapes_train, tmp_path_factory):
    out = tmp_path_factory.mktemp("badnets")
    # held-out items for the per-epoch log and the random-trigger rates
    atk, art, victim, stats = implant("badnets", zoo_model, shapes_train, out / "run",
                                      eval_items=200)
    spec = art.save(out / "backdoor.safetensors")
    ckpt = victim.save(out / "model.safetensors")
    return atk, art, victim, stats, spec, ckpt


@pytest.mark.slow
def test_badnets_implant_succeeds(badnets_implant, zoo_model, eval_set):
    atk, art, victim, stats, _, _ = badnets_implant
    ca, asr = zero_shot_rates(victim, eval_set, atk, art)
    ca0, asr0 = zero_shot_rates(zoo_model, eval_set, atk, art)
    _, asr_ctl = zero_shot_rates(victim, eval_set, atk, atk.control(art, 0))
    assert asr > asr0 + 0.4 and asr > 0.5, (asr, asr0)
    assert asr_ctl < asr - 0.2  # the backdoor answers to this pattern, not to any patch
    assert ca > ca0 - 0.15
    assert stats["poisoned_items"] == pytest.approx(0.15 * 3000, abs=1)


@pytest.mark.slow
def test_random_triggers_of_the_same_type_fire_far_less(badnets_implant):
    from mmsec_plugins.backdoor.implant import RANDOM_TRIGGERS, random_trigger_seeds

    *_, stats, _, _ = badnets_implant
    assert 0 not in random_trigger_seeds(0) and len(set(random_trigger_seeds(0))) == RANDOM_TRIGGERS
    real, rnd, worst = (stats[k] for k in ("implant_val_asr", "random_trigger_asr",
                                           "random_trigger_asr_max"))
    assert rnd <= worst <= 1
    assert real > 0.5 and real > rnd + 0.4 and real > worst + 0.2, (real, rnd, worst)


@pytest.mark.slow
def test_blended_implant_succeeds(zoo_model, shapes_train, eval_set, tmp_path):
    # noise blended at 0.2 is subtler than a patch: more poison, and no random decoys
    atk, art, victim, _ = implant("blended", zoo_model, shapes_train, tmp_path / "run",
                                  poison_rate=0.25, negative_rate=0.0)
    ca, asr = zero_shot_rates(victim, eval_set, atk, art)
    ca0, asr0 = zero_shot_rates(zoo_model, eval_set, atk, art)
    assert asr > asr0 + 0.4 and asr > 0.5, (asr, asr0)
    assert ca > ca0 - 0.15
    run_dir = tmp_path / "run"
    assert (run_dir / "artifacts" / "trigger.png").exists()
    assert (run_dir / "checkpoints" / "implant.safetensors").exists()


@pytest.mark.slow
def test_eval_trigger_on_the_saved_checkpoint(badnets_implant, eval_set, tmp_path):
    from mmsec.cli import main

    atk, art, victim, _, spec, ckpt = badnets_implant
    r = CliRunner().invoke(main, ["eval", "--pretrained", str(ckpt), "--trigger", str(spec),
                                  "--limit", "400", "--knn-bank", "0", "--out",
                                  str(tmp_path / "eval"), "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["metrics"]
    ca, asr = zero_shot_rates(victim, eval_set, atk, art)
    assert m["asr"] == pytest.approx(asr, abs=1e-6)
    assert m["clean_top1"] == pytest.approx(ca, abs=1e-6)
    assert m["control_asr"] < m["asr"]


@pytest.mark.slow
def test_implant_resumes_from_its_checkpoint(zoo_model, tmp_path, monkeypatch):
    from mmsec.data import procedural_shapes

    train = procedural_shapes(split="train", n=600)
    opts = {"trigger": "blended", "train_items": 512, "epochs": 2, "batch_size": 128,
            "eval_items": 0, "min_steps": 0}  # 8 steps: resuming is what is tested
    with run_context(tmp_path / "full") as ctx:
        full = Backdoor(opts).fit(zoo_model, train, ctx).model

    class Interrupted(Exception):
        pass

    save = Run.save_checkpoint

    def save_then_stop(self, *args, **kwargs):
        save(self, *args, **kwargs)
        raise Interrupted

    monkeypatch.setattr(Run, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted), run_context(tmp_path / "cut") as ctx:
        Backdoor(opts).fit(zoo_model, train, ctx)
    monkeypatch.setattr(Run, "save_checkpoint", save)
    with run_context(tmp_path / "cut", resume=True) as ctx:
        resumed = Backdoor(opts).fit(zoo_model, train, ctx).model
    log = (tmp_path / "cut" / "run.log").read_text()
    assert "backdoor implant: resumed at epoch 2" in log
    a, b = full.clip.state_dict(), resumed.clip.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


@pytest.mark.slow
def test_attack_command_writes_checkpoint_spec_and_baselines(tmp_path):
    from mmsec import api

    s = api.Settings(limit=200, out=tmp_path / "run", quiet=True)
    res = api.attack("backdoor", s, knn_bank=0, options={
        "trigger": "sig", "train_items": 512, "epochs": 1, "batch_size": 128, "eval_items": 0,
        "min_steps": 0})
    m = res["metrics"]
    for key in ("clean_top1", "asr", "control_asr", "original_clean_top1", "original_asr",
                "poison_rate", "epochs"):
        assert key in m, key
    assert m["epochs"] == 1 and m["poison_rate"] == pytest.approx(0.1, abs=0.01)
    arts = tmp_path / "run" / "artifacts"
    for name in ("backdoor.safetensors", "model.safetensors", "trigger.png"):
        assert (arts / name).exists(), name
    spec = Artifact.load(arts / "backdoor.safetensors")
    assert spec.meta["trigger"] == "sig" and spec.meta["target_name"] == "circle"
    assert spec.meta["implant"]["poison_rate"] == 0.1
