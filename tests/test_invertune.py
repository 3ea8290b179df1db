"""The InverTune defense: options, each stage on its own, a ViT tower, and the chain
backdoor implant -> InverTune -> CA/ASR with the real trigger on the embedded model."""

from __future__ import annotations

import contextlib
import copy
import json
import math

import mmsec_plugins.advclip as advclip_plugin
import mmsec_plugins.backdoor as backdoor_plugin
import mmsec_plugins.invertune as invertune_plugin
import mmsec_plugins.uap as uap_plugin
import pytest
import torch
from mmsec_plugins.backdoor import TRIGGERS, Backdoor, trigger_from_artifact
from mmsec_plugins.invertune import InverTune

from mmsec import default_plugins
from mmsec.attacks import Artifact
from mmsec.context import RunContext, RunInputs
from mmsec.data import load_dataset, load_images
from mmsec.errors import UsageError
from mmsec.model import build_zoo_model, load_model, read_zoo_spec
from mmsec.registry import PluginInfo, Registry, reset_registry
from mmsec.runs import Run

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def registry():
    reg = Registry()
    reg.add_plugin(default_plugins, PluginInfo(name="mmsec", module="mmsec.default_plugins",
                                               distribution="mmsec", builtin=True))
    for name, mod in (("advclip", advclip_plugin), ("backdoor", backdoor_plugin),
                      ("invertune", invertune_plugin), ("uap", uap_plugin)):
        reg.add_plugin(mod, PluginInfo(name=name, module=f"mmsec_plugins.{name}"))
    reg.collect()
    reset_registry(reg)
    try:
        yield reg
    finally:
        reset_registry(None)


@contextlib.contextmanager
def run_context(out, registry, kind="defend", plugin="invertune", trigger=None):
    inputs = RunInputs(trigger=Artifact.load(trigger) if trigger is not None else None)
    with Run.create(out, kind, plugin, quiet=True) as run:
        yield RunContext(run, device=torch.device("cpu"), seed=0, registry=registry,
                         inputs=inputs)


def test_registers_and_options(registry):
    assert registry.failures() == []
    assert registry.defense("invertune") is InverTune
    o = InverTune({"stages": "tune,identify,invert", "tune_lr": "1/1000"}).options
    assert o.stages == ["identify", "invert", "tune"] and o.tune_lr == pytest.approx(1e-3)
    d = InverTune().options  # the paper's values
    assert (d.invert_lr, d.invert_batch, d.invert_epochs) == (0.01, 64, 10)
    assert (d.w_ce, d.w_embed, d.w_ssim, d.w_mask, d.temperature) == (5, 0.5, 1, 0.01, 0.07)
    assert (d.tune_steps, d.tune_weight_decay, d.grad_clip, d.top_layers) == (200, 1e-4, 1.0, 3)
    with pytest.raises(UsageError, match="stage tune needs stage invert"):
        InverTune({"stages": "identify,tune"})
    with pytest.raises(UsageError, match="needs stage identify or a target"):
        InverTune({"stages": "invert"})
    with pytest.raises(UsageError, match="stages"):
        InverTune({"stages": "identfy"})
    assert InverTune({"stages": "invert", "target": "circle"}).options.stages == ["invert"]


def tiny_vit():
    spec = copy.deepcopy(read_zoo_spec("shapes"))
    spec["model_cfg"]["vision_cfg"] = {"image_size": 32, "patch_size": 8, "width": 64,
                                       "layers": 3, "head_width": 32}
    torch.manual_seed(0)
    return build_zoo_model(spec).eval()


def test_vit_tower_invert_and_tune(registry, tmp_path):
    """The official code handles ResNet stages only; ViT blocks go through the same path."""
    model = tiny_vit()
    assert model.layer_names() == ["block0", "block1", "block2"]
    data = load_dataset("procedural", split="train", n=96)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dfn = InverTune({"stages": "invert,tune", "target": "circle", "invert_epochs": 1,
                     "tune_steps": 3, "top_layers": 2, "clean_items": 96})
    with run_context(tmp_path / "run", registry) as run:
        repaired = dfn.apply(model, data, run)
        metrics = dict(run.metrics)
        tuned = run.get("tuned_layers")
    assert repaired is not model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    changed = [k for k, v in repaired.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.startswith("clip.visual.") for k in changed)
    assert metrics["tuned_layer_count"] == 2 and metrics["tune_steps_done"] == 3
    assert len(tuned) == 2 and set(tuned) <= {"block0", "block1", "block2"}
    for png in ("inverted-mask", "inverted-pattern", "inverted-trigger"):
        assert (tmp_path / "run" / "artifacts" / f"{png}.png").exists()


def _ca_asr(model, x, y, spec, head, target):
    trigger = trigger_from_artifact(spec)
    with torch.no_grad():
        clean = (model.encode_image(x) @ head.t()).argmax(1)
        keep = y != target
        trig = (model.encode_image(trigger.apply(x[keep])) @ head.t()).argmax(1)
    return float((clean == y).float().mean()), float((trig == target).float().mean())


@pytest.fixture(scope="module")
def short_implants(registry, tmp_path_factory):
    """Short implants on the embedded model (3,000 training items, 250 steps; the backdoor
    plugin's defaults otherwise, decoys included), each trained the first time a test asks
    for it: ``short_implants("sig")`` -> ``(model, artifact, path)``.

    SIG: at 150 steps (ASR 98%) the target's lead (1.68, L-inf probe) tied with a natural
    patch sink's ("ring", 1.74) and was missed; at 250 it leads 2.27 to 1.58. BadNets: the
    decoy-trained 6-px code is found from about 1 random start of the patch probe in 3,
    hence ``probe_patch_starts`` 16, halved by training loss (probes.py)."""
    model = load_model(device="cpu")
    train = load_dataset("procedural", split="train", n=3000)
    out = {}

    def get(trigger):
        if trigger not in out:
            tmp = tmp_path_factory.mktemp(trigger)
            attack = Backdoor({"trigger": trigger, "epochs": 3, "batch_size": 128,
                               "train_items": 3000, "eval_items": 0, "min_steps": 250})
            with run_context(tmp / "implant", registry, "attack", "backdoor") as run:
                fitted = attack.fit(model, train, run)
            fitted.artifact.save(tmp / "backdoor.safetensors")
            out[trigger] = (fitted.model, fitted.artifact, tmp / "backdoor.safetensors")
        return out[trigger]

    return get


def _short_implant(short_implants, trigger: str):
    """A short implant, the test split's images, labels and head, the implant's target and
    the defense's clean set (another seed); checks that the implant took."""
    victim, spec, path = short_implants(trigger)
    test = load_dataset("procedural", split="test", n=500)
    x, y = load_images(test, range(len(test)))
    head = victim.zero_shot_head(test.classnames, test.templates)
    target = spec.meta["target"]
    _, asr = _ca_asr(victim, x, y, spec, head, target)
    assert asr > 0.7, f"the short {trigger} implant did not take (ASR {asr:.2f})"
    clean = load_dataset("procedural", split="train", n=1000, seed=1)
    return victim, spec, path, (x, y, head, target, clean)


def _chain(registry, tmp_path, short_implants, trigger: str):
    """Implant (backdoor plugin, short schedule) -> InverTune with its defaults (no simulator
    and no target given: the probes identify it) -> CA/ASR with the real trigger, which the
    defense never sees."""
    victim, spec, path, (x, y, head, target, clean) = _short_implant(short_implants, trigger)
    ca0, asr0 = _ca_asr(victim, x, y, spec, head, target)
    with run_context(tmp_path / "defend", registry, trigger=path) as run:
        repaired = InverTune().apply(victim, clean, run)
        metrics = dict(run.metrics)
        suspects = run.run.fields.get("suspects")
    ca1, asr1 = _ca_asr(repaired, x, y, spec, head, target)
    ranking = json.loads((tmp_path / "defend" / "artifacts" / "target_ranking.json").read_text())
    print(f"{trigger} chain: CA {ca0:.3f} -> {ca1:.3f}, ASR {asr0:.3f} -> {asr1:.3f}; "
          f"ranking {[(r['name'], round(r['lead'], 2), r['family']) for r in ranking[:3]]}; "
          f"suspects {suspects}; target {target}")
    assert metrics["true_target_suspected"] == 1.0  # inverted and tuned away ...
    assert asr1 <= 0.2 * asr0, (asr0, asr1)  # ... so most of the ASR is gone ...
    assert ca1 >= ca0 - 0.04, (ca0, ca1)  # ... at a small cost of CA
    assert (tmp_path / "defend" / "artifacts" / "real-trigger.png").exists()
    return metrics, ranking, target


@pytest.mark.slow
def test_chain_removes_a_sig_backdoor_on_embedded_model(registry, tmp_path, short_implants):
    """SIG: the L-inf probe reaches the target; a natural patch sink ("ring") can lead the
    patch family by more (16 starts per place lift it), and both are then suspects."""
    metrics, ranking, target = _chain(registry, tmp_path, short_implants, "sig")
    top2 = [r["class"] for r in ranking[:2]]
    assert target in top2, ranking[:3]
    assert metrics["suspect_count"] >= 1 + (ranking[0]["class"] != target)


@pytest.mark.slow
def test_chain_removes_a_short_badnets_backdoor_on_embedded_model(registry, tmp_path,
                                                                  short_implants):
    """BadNets: a 6-px code at the bottom-right corner, trained with decoys (other codes at
    the same place, true captions), so only the exact code fires it; the patch probe's 16
    random starts per place (the default) find it, and it ranks first by far."""
    metrics, ranking, target = _chain(registry, tmp_path, short_implants, "badnets")
    assert metrics["identified_target"] == target and metrics["target_identified"] == 1.0
    assert ranking[0]["family"] == "patch" and ranking[0]["rate_patch"] > 0.9
    assert metrics["target_confident"] == 1.0
    assert metrics["target_lead"] >= metrics["target_lead_second"] + 0.5, metrics


def test_the_simulator_runs_in_its_own_child_run(registry, tmp_path):
    """The simulator InverTune fits is a plugin run by a plugin: its artifacts, metrics,
    report sections and checkpoints go under its own name, never over the caller's."""
    model = load_model(device="cpu")
    data = load_dataset("procedural", split="train", n=96)
    dfn = InverTune({"stages": "identify", "simulator": "uap", "clean_items": 96,
                     "simulator_options": {"epochs": 1}})
    with run_context(tmp_path / "run", registry) as run:
        dfn.apply(model, data, run)
        metrics, sections = dict(run.metrics), [t for t, _ in run.run.sections]
    arts = tmp_path / "run" / "artifacts"
    assert (arts / "simulator" / "uap-delta.png").is_file() and not (arts / "uap-delta.png").exists()
    assert (tmp_path / "run" / "checkpoints" / "simulator" / "uap.safetensors").is_file()
    assert metrics["simulator.uap_steps"] == 2 and "uap_steps" not in metrics
    assert "identified_target" in metrics and (arts / "simulator.safetensors").is_file()
    assert "InverTune 1: target identification" in sections


class Killed(Exception):
    pass


@pytest.mark.parametrize("kill_at", ["simulator/uap", "invert", "tune"])
def test_resume_in_each_stage_matches_an_uninterrupted_run(registry, tmp_path, monkeypatch,
                                                           kill_at):
    """Killed in the simulator's loop (a child run), in the inversion or in the tuning, a
    resumed run ends with exactly the model an uninterrupted one makes."""
    model = load_model(device="cpu")
    data = load_dataset("procedural", split="train", n=96)
    opts = {"simulator": "uap", "simulator_options": {"epochs": 2, "batch_size": 48},
            "clean_items": 96, "invert_epochs": 2, "invert_batch": 48, "tune_steps": 60,
            "tune_batch": 16, "rounds": 1}

    def repaired_weights(out):
        with run_context(out, registry) as run:
            return {k: v.clone() for k, v in InverTune(opts).apply(model, data, run)
                    .state_dict().items()}

    straight = repaired_weights(tmp_path / "straight")
    save = Run.save_checkpoint

    def save_then_die(self, state, meta, *, slot="main", rng=True):
        path = save(self, state, meta, slot=slot, rng=rng)
        if slot == kill_at and not meta.get("done"):
            raise Killed(slot)  # killed right after the stage's first checkpoint
        return path

    monkeypatch.setattr(Run, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        repaired_weights(tmp_path / "killed")
    monkeypatch.setattr(Run, "save_checkpoint", save)
    with Run.create(tmp_path / "killed", "defend", "invertune", resume=True, quiet=True) as run:
        ctx = RunContext(run, device=torch.device("cpu"), seed=0, registry=registry)
        resumed = InverTune(opts).apply(model, data, ctx).state_dict()
    log = (tmp_path / "killed" / "run.log").read_text()
    assert "resumed at epoch 2" in log
    assert all(torch.allclose(resumed[k], straight[k], atol=1e-6) for k in straight)
    changed = [k for k in straight if not torch.equal(straight[k], model.state_dict()[k])]
    assert changed  # the stages did something


def test_defend_command_measures_the_real_trigger_before_and_after(tmp_path):
    """`mmsec defend --trigger SPEC` (CLI wiring): CA/ASR before and after, the repaired
    checkpoint, the report; a short schedule on the clean zoo model (no backdoor in it)."""
    from click.testing import CliRunner
    from mmsec_plugins.backdoor.implant import resolve_target

    from mmsec.cli import main

    b = Backdoor({"trigger": "badnets"})
    opts = b.settings()
    data = load_dataset("procedural", split="train", n=16)
    trig = TRIGGERS["badnets"].create(opts, 0)
    b.spec(trig, resolve_target(None, data, None), 0).save(tmp_path / "spec.safetensors")
    out = tmp_path / "run"
    r = CliRunner().invoke(main, [
        "defend", "-p", "invertune", "-o", "stages", "invert,tune", "-o", "target", "circle",
        "-o", "invert_epochs", "1", "-o", "tune_steps", "2", "-o", "rounds", "1",
        "--clean-items", "64", "--limit", "100", "--trigger", str(tmp_path / "spec.safetensors"),
        "--out", str(out), "--json", "-q"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "results.json").read_text())["metrics"]
    for k in ("before_asr", "after_asr", "before_clean_top1", "after_clean_top1", "inverted_asr"):
        assert 0 <= m[k] <= 1, k
    assert m["before_asr"] < 0.1  # the clean model has no backdoor
    assert (out / "artifacts" / "model.safetensors").exists()
    assert "InverTune 2: trigger inversion" in (out / "report.md").read_text()
    bad = CliRunner().invoke(main, ["defend", "-p", "invertune", "--trigger",
                                    str(tmp_path / "missing.safetensors"), "--out",
                                    str(tmp_path / "r2")])
    assert bad.exit_code != 0 and "missing.safetensors" in bad.output


def test_probe_families_are_bounded_and_placed_where_they_say():
    from mmsec_plugins.invertune import probes

    g = torch.Generator().manual_seed(0)
    x = torch.rand(10, 3, 32, 32)
    patch = probes.PatchProbe(32, 32, 0.3, 2, g)
    s = patch.s
    assert s == 10 and patch.places == [(0, 0), (0, 22), (22, 0), (22, 22), (11, 11)]
    for k, (t, left) in enumerate(patch.places):
        out = patch.paste(x, k)
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[t:t + s, left:left + s] = True
        assert torch.equal(out[..., inside], patch.patterns[k].expand(10, -1, -1, -1)
                           .flatten(2).detach().view_as(out[..., inside]))
        assert torch.equal(out[..., ~inside], x[..., ~inside])
    mixed = patch(x)  # a batch spread over the places, image i at place i % 5
    assert torch.equal(mixed[7], patch.paste(x[7:8], 2)[0])
    add = probes.AdditiveProbe(32, 32, 8 / 255)
    add.delta.data.uniform_(-1, 1)
    add.project()
    assert (add(x) - x).abs().max() <= 8 / 255 + 1e-6
    warp = probes.WarpProbe(32, 32, 4, 0.1, g)
    warp.offsets.data.fill_(10.0)
    warp.project()
    ident = probes.WarpProbe(32, 32, 4, 0.1, g).flow()
    ident_grid = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32),
                                            indexing="xy"), dim=-1)[None]
    # at most strength x side per axis (x2 in grid_sample's [-1, 1] units)
    assert ((warp.flow() - ident_grid).abs().max() <= 2 * 0.1 + 1e-5)
    assert ident.shape == (1, 32, 32, 2)


def test_leads_hand_checked():
    from mmsec_plugins.invertune.probes import leads

    def logit(p):
        return math.log(p / (1 - p))

    rates = torch.tensor([[0.996, 0.83, 0.70],    # a patch family: class 0 far ahead
                          [0.66, 0.88, 0.25]])    # an additive one: class 1 ahead
    got = leads(rates)
    assert got[0, 0] == pytest.approx(logit(0.996) - logit(0.83), rel=1e-4)  # +3.93
    assert got[1, 1] == pytest.approx(logit(0.88) - logit(0.66), rel=1e-4)    # +1.33
    assert got[0, 1] == pytest.approx(logit(0.83) - logit(0.996), rel=1e-4)   # behind
    assert got[0, 0] > got[1, 1] > 0 > got[0, 2]
    assert leads(torch.tensor([[1.0, 1.0]]))[0, 0] == pytest.approx(0.0)  # a tie leads by 0
    assert leads(torch.tensor([[1.0, 0.0]]))[0, 0] == pytest.approx(2 * logit(0.998), rel=1e-3)


def test_many_classes_are_screened_to_candidates(registry, tmp_path):
    """More classes than ``candidates``: untargeted probes pick which ones get targeted
    probes; the ranking lists every class, the unprobed ones without rates."""
    model = load_model(device="cpu")
    data = load_dataset("procedural", split="train", n=96)
    dfn = InverTune({"stages": "identify", "candidates": 3, "probe_steps": 2, "probe_batch": 4,
                     "clean_items": 96})
    with run_context(tmp_path / "run", registry) as run:
        dfn.apply(model, data, run)
        metrics = dict(run.metrics)
    rows = json.loads((tmp_path / "run" / "artifacts" / "target_ranking.json").read_text())
    assert len(rows) == 10 and sum(r["lead"] is not None for r in rows) == 3
    assert rows[0]["lead"] is not None and metrics["identified_target"] == rows[0]["class"]
    assert all(r["rate_patch"] is None for r in rows if r["lead"] is None)
