"""Smoke tests of mmsec-example-plugin, the way a plugin author writes them.

The plugin is registered by a fixture into a fresh registry (mmsec's built-ins
plus this plugin only: installed third-party plugins are never auto-loaded in
tests) and unregistered in ``finally``. Runs on the CPU with the embedded zoo
model and a few hundred procedural images, in seconds.
"""

from __future__ import annotations

import click
import pytest
import torch
from click.testing import CliRunner
from mmsec import Artifact, RunContext, UsageError, default_plugins, load_dataset, load_model
from mmsec.registry import PluginInfo, Registry, reset_registry
from mmsec.runs import Run

import mmsec_example
from mmsec_example import NoisePatch
from mmsec_example.patch import patch_side

FAST = {"steps": 3, "batch_size": 16}


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("MMSEC_PROGRESS", "0")
    monkeypatch.setenv("MMSEC_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def registry():
    """mmsec's built-ins plus this plugin, installed as the process-wide registry."""
    reg = Registry()
    reg.add_plugin(default_plugins, PluginInfo(name="mmsec", module="mmsec.default_plugins",
                                               distribution="mmsec", builtin=True))
    reg.add_plugin(mmsec_example, PluginInfo(name="example", module="mmsec_example"))
    reg.collect()
    reset_registry(reg)
    try:
        yield reg
    finally:
        reset_registry(None)


@pytest.fixture(scope="module")
def model():
    return load_model(device="cpu")


@pytest.fixture(scope="module")
def data():
    return load_dataset("procedural", split="train", n=256)


@pytest.fixture
def run(tmp_path):
    with Run.create(tmp_path / "run", "attack", NoisePatch.name, quiet=True) as folder:
        yield RunContext(folder, device=torch.device("cpu"), seed=0)


def test_registers_attack_and_command(registry):
    assert registry.failures() == []
    assert registry.attack("example-noise-patch") is NoisePatch
    assert registry.plugins["example"].items == {"attacks": ["example-noise-patch"]}
    group = click.Group()
    registry.add_commands(group)
    result = CliRunner().invoke(group, ["example-hello", "--name", "tests"])
    assert result.exit_code == 0, result.output
    assert "Hello, tests!" in result.output


def test_options_validated():
    assert NoisePatch({"area": "1/16"}).options.area == pytest.approx(0.0625)
    with pytest.raises(UsageError, match='did you mean "steps"'):
        NoisePatch({"stpes": 3})
    with pytest.raises(UsageError, match='option "corner"'):
        NoisePatch({"corner": "middle"})


def test_fit_apply_control(model, data, run):
    attack = NoisePatch(FAST)
    artifact = attack.fit(model, data, run)
    patch = artifact.tensors["patch"]
    side = artifact.meta["side"]
    assert patch.shape == (3, side, side)
    assert 0 <= patch.min() and patch.max() <= 1
    assert (run.artifacts_dir / "patch.png").is_file()

    images = torch.stack([data[i][0] for i in range(8)])
    before = images.clone()
    adv = attack.apply(artifact, images)
    assert adv.shape == images.shape and torch.equal(images, before)  # input untouched
    assert torch.equal(adv[:, :, -side:, -side:], patch.expand(8, -1, -1, -1))  # bottom-right
    assert torch.equal(adv[:, :, :-side], images[:, :, :-side])

    control = attack.control(artifact, seed=1)
    assert control.tensors["patch"].shape == patch.shape
    assert not torch.equal(control.tensors["patch"], patch)

    bigger = attack.apply(artifact, torch.zeros(2, 3, 64, 64))  # the patch scales with the image
    big_side = patch_side(artifact.options["area"], 64, 64)
    assert big_side > side
    assert bigger[:, :, -big_side:, -big_side:].amin(dim=(0, 1)).gt(0).all()
    assert bigger[:, :, :-big_side].abs().sum() == 0


def test_artifact_round_trip(model, data, run, tmp_path):
    attack = NoisePatch(FAST)
    artifact = attack.fit(model, data, run)
    loaded = Artifact.load(artifact.save(tmp_path / "patch.safetensors"))
    images = torch.rand(4, 3, 32, 32)
    assert torch.equal(attack.apply(loaded, images), attack.apply(artifact, images))
