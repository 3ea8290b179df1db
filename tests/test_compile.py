"""``torch.compile`` of the image tower (``ClipModel.torch_compile``, ``--compile``) and its
channels-last option (``ClipModel.channels_last``, ``--channels-last``).

Compiling itself takes over a minute on one CPU core (inductor builds C++), so the compiled
embeddings are compared with eager ones in ``benchmarks/compile.py`` (``max_abs_diff``);
these tests cover the option's plumbing and the fallback when compiling fails."""

from __future__ import annotations

import copy

import pytest
import torch

from mmsec import load_model


@pytest.fixture()
def model():
    return load_model("zoo:shapes", device="cpu")


def test_a_failed_compilation_warns_once_and_runs_eager(model, caplog, monkeypatch):
    x = torch.rand(4, 3, 32, 32)
    eager = model.encode_image(x)
    fingerprint = model.fingerprint
    calls = []

    def broken_compile(fn, **_):
        def run(*a, **k):
            calls.append(1)
            raise RuntimeError("InductorError: no working C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model.torch_compile = True
    assert model.fingerprint == fingerprint  # compiled is the same function
    with caplog.at_level("WARNING", logger="mmsec.model"):
        first = model.encode_image(x)
        second = model.encode_image(x)
    assert torch.equal(first, eager) and torch.equal(second, eager)
    assert len(calls) == 1 and not model.torch_compile  # tried once, then eager
    lines = [r.getMessage() for r in caplog.records if "torch.compile" in r.getMessage()]
    assert len(lines) == 1 and "no working C++ compiler" in lines[0] and "\n" not in lines[0]


def test_the_compiled_function_is_used_and_not_part_of_the_state(model, monkeypatch):
    seen = []

    def fake_compile(fn, **_):
        def run(*a, **k):
            seen.append(a[0].shape)
            return fn(*a, **k)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    keys = set(model.state_dict())
    model.torch_compile = True
    x = torch.rand(2, 3, 32, 32)
    model.encode_image(x)
    model.encode_image(x)
    assert len(seen) == 2 and set(model.state_dict()) == keys
    twin = copy.deepcopy(model)
    assert twin.torch_compile and twin._compiled_image is None  # compiles its own
    # layer-wise features stay eager
    model(x, image_layers=True)
    assert len(seen) == 2


def test_load_model_settings_and_recipes_take_the_option():
    from mmsec.api import Settings
    from mmsec.recipes import parse_recipe

    assert load_model("zoo:shapes", device="cpu", compile=True).torch_compile
    assert not load_model("zoo:shapes", device="cpu").torch_compile
    assert Settings(compile=True).compile
    recipe = parse_recipe("defaults: {compile: true}\nsteps:\n  - {id: a, kind: eval}\n"
                          "  - {id: b, kind: eval, compile: false, channels_last: true}\n")
    assert [s.compile for s in recipe.resolved_steps()] == [True, False]
    assert [s.channels_last for s in recipe.resolved_steps()] == [False, True]


def test_the_cli_has_the_flag():
    from click.testing import CliRunner

    from mmsec.cli import main

    for command in ("attack", "defend", "eval"):
        out = CliRunner().invoke(main, [command, "--help"])
        assert "--compile" in out.output and "--channels-last" in out.output, command


def test_channels_last_keeps_the_embeddings_the_fingerprint_and_the_pixel_gradient(model):
    # (the option itself; benchmarks/channels_last.py measures whether it pays)
    x = torch.rand(4, 3, 40, 40, requires_grad=True)
    emb = model.encode_image(x)
    (grad,) = torch.autograd.grad(emb.square().sum(), x)
    fingerprint = model.fingerprint
    model.channels_last = True
    assert model.fingerprint == fingerprint
    emb2 = model.encode_image(x)
    (grad2,) = torch.autograd.grad(emb2.square().sum(), x)
    assert torch.allclose(emb, emb2, atol=1e-5) and torch.allclose(grad, grad2, atol=1e-5)
    assert grad2.is_contiguous()  # the caller's layout, whatever the tower's
    assert copy.deepcopy(model).channels_last
    model.channels_last = False
    assert torch.equal(model.encode_image(x), emb)
    assert load_model("zoo:shapes", device="cpu", channels_last=True).channels_last
