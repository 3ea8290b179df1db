"""AVQI (hand-checked values, invariances, the eval probe) and the GRACE defense on the
embedded model: a detector that generalises to a family it never saw, a restorer, the
hardened model's checkpoint and ``mmsec eval --detector``."""

from __future__ import annotations

import pytest
import torch
from mmsec_plugins.grace import Grace, family_name, parse_family

from mmsec.avqi import avqi, avqi_components, layer_avqi
from mmsec.errors import UsageError
from mmsec.metrics import auroc

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# --------------------------------------------------------------------------- AVQI
def test_avqi_of_two_separated_pairs_by_hand():
    # clean (-2, +-1), attacked (2, +-1): centroids 4 apart, each point 1 from its centroid
    c = torch.tensor([[-2.0, 1], [-2, -1]])
    a = torch.tensor([[2.0, 1], [2, -1]])
    m = avqi_components(c, a)
    assert m["davies_bouldin"] == pytest.approx(0.5)  # (1 + 1) / 4
    assert m["dunn"] == pytest.approx(2.0)  # nearest other 4 / nearest own 2
    assert m["xie_beni"] == pytest.approx(1 / 16)  # 4 / (4 * 16)
    assert m["calinski_harabasz"] == pytest.approx(8.0)  # (B=16 / 1) / (W=4 / 2)
    expected = (1 / 3 + 1 / 2 + 1 / 17 + 1 / 5) / 4
    assert m["avqi"] == pytest.approx(expected) == pytest.approx(0.2730392)


def test_avqi_is_one_when_the_clusters_share_a_centre():
    c = torch.tensor([[1.0, 0], [-1, 0]])
    a = torch.tensor([[0.0, 1], [0, -1]])
    m = avqi_components(c, a)
    assert m["avqi"] == 1.0 and m["dunn"] == pytest.approx(2 ** -0.5)


def test_avqi_direction_invariances_and_layers():
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(400, 32, generator=g)
    mixed = torch.randn(400, 32, generator=g)
    far = mixed + 3.0
    v_mixed, v_far = avqi(clean, mixed), avqi(clean, far)
    assert v_mixed > 0.95 and v_far < 0.35 and avqi(clean, mixed + 1.0) > v_far
    # translation and uniform scale change nothing; the result is deterministic
    assert avqi(5 * clean + 2, 5 * far + 2) == pytest.approx(v_far)
    assert avqi(clean, far) == v_far
    per = layer_avqi({"a": clean, "b": clean[:, :8]}, {"a": far, "b": mixed[:, :8]})
    assert list(per) == ["a", "b"] and per["a"] == pytest.approx(v_far) and per["b"] > 0.9
    with pytest.raises(ValueError, match="at least 2"):
        avqi(clean[:1], far)


def test_auroc_by_hand():
    s = torch.tensor([0.1, 0.4, 0.35, 0.8, 0.8])
    y = torch.tensor([0, 0, 1, 1, 0]).bool()
    assert auroc(s, y) == pytest.approx(3.5 / 6)  # ties count half


# --------------------------------------------------------------------------- options
def test_family_specs():
    assert parse_family("uap") == ("uap", {})
    assert parse_family("backdoor:trigger=sig+sig_delta=0.2") == (
        "backdoor", {"trigger": "sig", "sig_delta": 0.2})
    assert family_name("backdoor:trigger=wanet") == "backdoor_wanet"
    assert family_name("/x/my-patch.safetensors") == "my_patch"
    with pytest.raises(UsageError, match="key=value"):
        parse_family("backdoor:sig")
    o = Grace({"train_families": "uap,advclip"}).options
    assert o.train_families == ["uap", "advclip"]


# --------------------------------------------------------------------------- the defense
@pytest.fixture(scope="module")
def grace_run(tmp_path_factory):
    """GRACE trained on UAPs only (short), held out: PGD and a BadNets trigger."""
    from mmsec import api

    out = tmp_path_factory.mktemp("grace") / "run"
    s = api.Settings(out=out, quiet=True, limit=300)
    res = api.defend("grace", s, clean_items=400, options={
        "train_families": ["uap"], "heldout_families": ["pgd:steps=5", "backdoor:trigger=badnets"],
        "family_options": {"uap": {"epochs": 3}}, "steps": 300, "adaptive_steps": 5})
    return out, res


@pytest.mark.slow
def test_grace_detects_a_held_out_family_and_restores(grace_run):
    out, res = grace_run
    m = res["metrics"]
    # the family it trained on, on held-out clean images and their attacked versions
    assert m["detect_auroc_uap"] > 0.95 and m["detect_tpr_uap"] > 0.8
    assert m["detector_clean_fpr"] <= 0.1
    # PGD was never seen: still far above chance (0.5)
    assert m["detect_auroc_pgd_5"] > 0.65, m
    # GRACE's latent separates attacked from clean better than the model's own embedding
    assert m["avqi_after_uap"] < m["avqi_before_uap"]
    # the restorer gives back part of what the UAP took, clean top-1 stays
    assert m["top1_restored_uap"] > m["top1_attacked_uap"] + 0.1
    assert m["clean_top1_after"] >= m["clean_top1_before"] - 0.02
    # the adaptive attack is reported (and lowers detection: said, not hidden)
    assert 0 <= m["adaptive_detect_tpr"] <= 1 and "pgd_detect_tpr" in m
    profile = [m[k] for k in m if k.startswith("attention_")]
    assert len(profile) == 4 and sum(profile) == pytest.approx(1, abs=1e-4)
    assert "GRACE" in (out / "report.md").read_text()


@pytest.mark.slow
def test_hardened_model_and_detector_through_eval(grace_run, tmp_path):
    from mmsec import api
    from mmsec.registry import get_registry

    out, _ = grace_run
    arts = out / "artifacts"
    uap_art = arts / "family-uap.safetensors"
    # the hardened model reloads as the adapter it was, and restores the UAP's images
    model = get_registry().load_model(None, str(arts / "model.safetensors"))
    assert type(model).__name__ == "AdaptedModel" and model.adapter_layers
    base = api.eval(api.Settings(out=tmp_path / "base", quiet=True, limit=200),
                    attack_artifact=str(uap_art))["metrics"]
    hard = api.eval(api.Settings(out=tmp_path / "hard", quiet=True, limit=200,
                                 pretrained=str(arts / "model.safetensors")),
                    attack_artifact=str(uap_art))["metrics"]
    assert hard["adv_top1"] > base["adv_top1"] + 0.1
    assert hard["clean_top1"] >= base["clean_top1"] - 0.03
    assert 0 <= base["avqi"] <= 1 and "avqi_layer1" in base
    # the detector as an eval probe on the base model
    det = api.eval(api.Settings(out=tmp_path / "det", quiet=True, limit=200),
                   attack_artifact=str(uap_art),
                   detector=str(arts / "grace-detector.safetensors"))["metrics"]
    assert det["detect_auroc"] > 0.95 and det["adv_detect_rate"] > 0.8
    assert det["clean_detect_rate"] < 0.15
    with pytest.raises(UsageError, match="no such file"):
        api.eval(api.Settings(out=tmp_path / "x", quiet=True, limit=10),
                 detector=str(tmp_path / "missing.safetensors"))


def test_adapter_on_a_vit_tower(tiny_vit):
    """The adapter reads every ViT block; the wrapped model's embeddings change, its layer
    outputs and the base model do not, and its cache fingerprint is its own."""
    from mmsec_plugins.grace.net import GraceNet

    from mmsec import AdaptedModel

    torch.manual_seed(0)
    tiny_vit.eval()
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        emb, layers = tiny_vit.forward_features(x)
    assert list(layers) == ["block0", "block1", "block2"]
    net = GraceNet({k: v.shape[1] for k, v in layers.items()}, emb.shape[1], dim=8, hidden=16)
    net.set_stats(layers)
    with torch.no_grad():  # a zero-initialised restorer changes nothing: give it weights
        assert torch.allclose(net(emb, layers), emb, atol=1e-6)
        net.restorer[2].weight.normal_()
    model = AdaptedModel(tiny_vit, Grace(), net, list(layers), net.spec())
    with torch.no_grad():
        out, again = model.forward_features(x)
    assert not torch.allclose(out, emb)
    assert all(torch.allclose(again[k], layers[k]) for k in layers)
    assert torch.allclose(tiny_vit.encode_image(x), emb, atol=1e-5)
    assert model.cacheable and model.fingerprint != tiny_vit.fingerprint
    spec = model.wrapper_spec()
    assert spec["kind"] == "embedding-adapter" and spec["defense"] == "grace"
    rebuilt = Grace().build_adapter(spec["adapter"])
    rebuilt.load_state_dict(model.wrapper_tensors())
    with torch.no_grad():
        assert torch.allclose(rebuilt(emb, layers), net(emb, layers))
