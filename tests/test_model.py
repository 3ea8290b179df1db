"""ClipModel: loading, preprocessing, zero-shot, layer-wise features, checkpoints, precision."""

from __future__ import annotations

import json

import pytest
import torch

from mmsec.errors import MmsecError, UsageError
from mmsec.model import ZOO_DIR, ClipModel, build_zoo_model, load_model, read_zoo_spec
from mmsec.zoo.train import zero_shot_top1


def test_zoo_model_really_works(zoo_model, shapes_test):
    """The shipped default model must classify the held-out split zero-shot (>= 90%)."""
    acc = zero_shot_top1(zoo_model, shapes_test)
    spec = read_zoo_spec("shapes")
    assert acc >= 0.90
    assert abs(acc - spec["metrics"]["zero_shot_top1"]) < 0.01  # the figure it ships with


def test_zoo_weights_small_and_checksummed():
    import hashlib

    spec = read_zoo_spec("shapes")
    path = ZOO_DIR / spec["weights"]
    assert path.stat().st_size <= 10 * 2**20
    assert hashlib.sha256(path.read_bytes()).hexdigest() == spec["sha256"]


def test_preprocess_any_size_is_differentiable(zoo_model):
    x = torch.rand(2, 3, 45, 70, requires_grad=True)
    emb = zoo_model.encode_image(x)
    assert emb.shape == (2, 64)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    emb.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_preprocess_uses_the_models_own_normalisation(zoo_model):
    spec = read_zoo_spec("shapes")
    x = torch.full((1, 3, 32, 32), 0.5)
    out = zoo_model.preprocess(x)
    expected = (0.5 - torch.tensor(spec["mean"])) / torch.tensor(spec["std"])
    assert torch.allclose(out[0, :, 0, 0], expected, atol=1e-6)


def test_zero_shot_head_is_computed_once(zoo_model, monkeypatch):
    calls = []
    orig = ClipModel.encode_text

    def counting(self, texts, *a, **k):
        calls.append(len(texts))
        return orig(self, texts, *a, **k)

    monkeypatch.setattr(ClipModel, "encode_text", counting)
    h1 = zoo_model.zero_shot_head(["circle", "square"], ["a {}."])
    h2 = zoo_model.zero_shot_head(["circle", "square"], ["a {}."])
    assert h1 is h2 and len(calls) == 1
    assert h1.shape == (2, 64)


def test_head_cache_recomputes_only_when_the_text_tower_changes(monkeypatch):
    """The head cache is keyed by a cheap weights version of the text tower: no weight is
    hashed on access, image-tower training keeps the heads, a text-tower step drops them."""
    model = load_model(device="cpu")
    calls = []
    orig = ClipModel.encode_text
    monkeypatch.setattr(ClipModel, "encode_text",
                        lambda self, t, *a, **k: calls.append(1) or orig(self, t, *a, **k))
    monkeypatch.setattr(ClipModel, "fingerprint", property(lambda self: 1 / 0))  # never read
    names = ["circle", "square"]
    h1 = model.zero_shot_head(names)
    opt = torch.optim.SGD(model.tower_parameters("image"), lr=0.1)
    model.encode_image(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert model.zero_shot_head(names) is h1 and len(calls) == 1  # image tower only
    opt = torch.optim.SGD(model.tower_parameters("text"), lr=0.1)
    model.encode_text(["a circle"]).sum().backward()
    opt.step()
    h2 = model.zero_shot_head(names)
    assert h2 is not h1 and not torch.allclose(h1, h2)
    for i in range(20):  # bounded
        model.zero_shot_head(names, [f"a {{}} {i}."])
    assert len(model._heads) <= 16


def test_forward_gives_both_towers_and_their_layers(zoo_model):
    x = torch.rand(3, 3, 32, 32)
    texts = ["a photo of a circle.", "a red star in the centre"]
    out = zoo_model(images=x, texts=texts, image_layers=True, text_layers=["text_block1"])
    assert out["image_features"].shape == (3, 64) and out["text_features"].shape == (2, 64)
    assert torch.allclose(out["image_features"], zoo_model.encode_image(x), atol=1e-5)
    assert torch.allclose(out["text_features"], zoo_model.encode_text(texts), atol=1e-5)
    assert set(out["image_layers"]) == {"layer1", "layer2", "layer3", "layer4"}
    assert out["text_layers"]["text_block1"].shape == (2, 128)
    assert zoo_model.layer_names("text") == ["text_block0", "text_block1"]
    assert float(out["logit_scale"].detach()) > 1


def test_encode_text_from_token_embeddings_and_the_vocabulary(zoo_model):
    tokens = zoo_model.tokenize(["a photo of a circle.", "a blue square"])
    emb = zoo_model.token_embedding(tokens).detach().requires_grad_(True)
    out = zoo_model.encode_text(tokens, embeddings=emb)
    assert torch.allclose(out, zoo_model.encode_text(tokens), atol=1e-6)
    out[0, 0].backward()  # differentiable in the embeddings (a learned word)
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    vocab = zoo_model.vocabulary()
    assert {"circle", "square", "red"} <= set(vocab.words)
    i = vocab.words.index("circle")
    assert int(vocab.ids[i]) in zoo_model.tokenize(["circle"])[0].tolist()


def test_towers_lock_and_their_parameters(zoo_model):
    import copy

    model = copy.deepcopy(zoo_model)
    image, text = model.tower_parameters("image"), model.tower_parameters("text")
    assert {id(p) for p in image}.isdisjoint(id(p) for p in text)
    assert len(image) + len(text) + 1 == len(list(model.parameters()))  # + logit_scale
    model.lock("image")
    assert not any(p.requires_grad for p in image) and all(p.requires_grad for p in text)
    model.unlock()
    assert all(p.requires_grad for p in model.parameters())
    assert model.tower_modules("image") == [model.clip.visual]


def test_layer_features_resnet(zoo_model):
    names = zoo_model.layer_names()
    assert names == ["layer1", "layer2", "layer3", "layer4"]
    x = torch.rand(3, 3, 32, 32)
    emb, acts = zoo_model.forward_features(x)
    assert emb.shape == (3, 64)
    assert [a.shape[0] for a in acts.values()] == [3] * 4
    assert all(a.ndim == 2 for a in acts.values())
    # the hooked pass is the same forward pass as encode_image
    assert torch.allclose(emb, zoo_model.encode_image(x), atol=1e-5)
    _, raw = zoo_model.forward_features(x, layers=["layer2"], pooled=False)
    assert raw["layer2"].ndim == 4


def test_layer_features_vit(tiny_vit):
    names = tiny_vit.layer_names()
    assert names == ["block0", "block1", "block2"]
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    _, acts = tiny_vit.forward_features(x)
    assert all(a.shape == (2, 64) for a in acts.values())
    acts["block1"].sum().backward()  # activations are differentiable (InverTune tunes on them)
    assert x.grad is not None
    _, raw = tiny_vit.forward_features(x.detach(), layers=["block0"], pooled=False)
    assert raw["block0"].shape == (2, 17, 64)  # batch first: 16 patches + class token
    with pytest.raises(UsageError, match="unknown image layer"):
        tiny_vit.forward_features(x, layers=["block9"])


def test_save_and_reload_safetensors(zoo_model, tmp_path):
    path = zoo_model.save(tmp_path / "copy.safetensors")
    again = load_model(pretrained=str(path), device="cpu")  # architecture from the metadata
    assert again.fingerprint == zoo_model.fingerprint
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(again.encode_image(x), zoo_model.encode_image(x), atol=1e-6)


def test_torch_state_dict_loads_with_weights_only(zoo_model, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": zoo_model.clip.state_dict()}, path)
    again = load_model("zoo:shapes", str(path), device="cpu")
    assert again.fingerprint == zoo_model.fingerprint


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": object()}, path)
    with pytest.raises(MmsecError, match="weights_only=True"):
        load_model("zoo:shapes", str(path), device="cpu")


def test_wrong_checkpoint_lists_offending_keys(zoo_model, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in zoo_model.clip.state_dict().items()}
    state.pop("logit_scale")
    state["visual.extra.weight"] = torch.zeros(2)
    state["text_projection"] = torch.zeros(3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(MmsecError) as err:
        load_model("zoo:shapes", str(path), device="cpu")
    msg = str(err.value)
    assert "missing keys: logit_scale" in msg
    assert "unexpected keys: visual.extra.weight" in msg
    assert "shape mismatch: text_projection" in msg
    assert "\n" not in msg


def test_missing_and_garbage_checkpoints(tmp_path):
    with pytest.raises(MmsecError, match="not found"):
        load_model("zoo:shapes", str(tmp_path / "nope.safetensors"), device="cpu")
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(MmsecError, match="not a readable safetensors"):
        load_model("zoo:shapes", str(bad), device="cpu")


def test_unknown_model_and_precision():
    with pytest.raises(UsageError, match="unknown model"):
        load_model("NoSuchNet-7", device="cpu")
    with pytest.raises(UsageError, match="unknown zoo model"):
        load_model("zoo:nope", device="cpu")
    with pytest.raises(UsageError, match="precision"):
        load_model(precision="fp8", device="cpu")


def test_fingerprint_changes_with_weights():
    spec = read_zoo_spec("shapes")
    m = build_zoo_model(json.loads(json.dumps(spec)))
    fp = m.fingerprint
    assert m.fingerprint == fp  # cached
    with torch.no_grad():
        next(m.clip.parameters()).add_(1.0)
    assert m.fingerprint != fp


def test_reduced_precision_on_cpu_falls_back_to_fp32(zoo_model, caplog):
    x = torch.rand(4, 3, 32, 32)
    fp32 = zoo_model.encode_image(x)
    zoo_model.precision = "bf16"
    try:
        with caplog.at_level("WARNING", logger="mmsec.model"):
            again = zoo_model.encode_image(x)
    finally:
        zoo_model.precision = "fp32"
    assert torch.equal(fp32, again)
    assert "running fp32" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_autocast_on_cuda(precision):
    model = load_model(device="cuda")
    x = torch.rand(8, 3, 32, 32)
    fp32 = model.encode_image(x)
    model.precision = precision
    low = model.encode_image(x)
    assert low.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(fp32, low).min() > 0.97


def test_open_clip_architecture_random_init():
    """Any open_clip architecture loads by name (no download without a tag)."""
    m = load_model("RN50", device="cpu")
    assert m.image_size == 224 and m.layer_names()[0] == "layer1"
    emb = m.encode_image(torch.rand(1, 3, 64, 64))
    assert emb.shape == (1, 1024)
