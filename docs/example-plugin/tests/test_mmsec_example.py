"""Smoke tests of mmsec-example-plugin, the way a plugin author writes them.

mmsec's testing fixtures (``mmsec.testing``, loaded in conftest.py) give a registry with
mmsec's built-ins plus this plugin only (installed third-party plugins are never
auto-loaded), the embedded zoo model, a few hundred procedural images and a run context.
Runs on the CPU in seconds.
"""

from __future__ import annotations

import click
import pytest
import torch
from click.testing import CliRunner
from mmsec import Artifact, UsageError

import mmsec_example
from mmsec_example import NoisePatch
from mmsec_example.patch import patch_side

FAST = {"steps": 3, "batch_size": 16}


@pytest.fixture
def registry(mmsec_registry):
    return mmsec_registry(mmsec_example)


@pytest.fixture
def model(tiny_model):
    return tiny_model


@pytest.fixture
def data(tiny_data):
    return tiny_data


@pytest.fixture
def run(run_context):
    return run_context


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
