"""Plugin platform v2: each defect a new plugin author found, reproduced and kept fixed.

Wrapped models never reuse the unwrapped model's cache and keep their wrapper when saved;
defenses receive attack artifacts; dict options from the CLI; apply gets a run context;
errors name the plugin, its distribution and the phase; recipes name a failing step and
still write their summary; config.yaml is the resolved configuration; plugins declare the
API they are written for; MMSEC_TRACE_PLUGINS logs hook calls.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml
from pydantic import Field

from mmsec import Attack, ClipModel, Defense, InputTransform, Options, TransformedModel
from mmsec.errors import MmsecError
from mmsec.model import load_model
from mmsec.registry import Registry, load_plugins
from mmsec.testing import hook_module, invoke, make_registry, use_registry

pytestmark = pytest.mark.usefixtures("one_thread")


def registering(kind: str, *items):
    def hook(register):
        for item in items:
            register(item)
    return hook_module(f"test_{items[0].name.replace('-', '_')}", **{f"register_{kind}": hook})


# ------------------------------------------------------------------ wrapped models
class Blur(ClipModel):
    """A purifying wrapper written the way a plugin author first writes one: a subclass
    that changes the forward pass and declares nothing about it."""

    def forward(self, images=None, texts=None, **kw):
        if images is not None:
            images = torch.nn.functional.avg_pool2d(images, 3, 1, 1)
        return super().forward(images, texts, **kw)


class BlurDefense(Defense):
    name = "test-blur"
    description = "returns a wrapper around the model"

    def apply(self, model, data, run):
        wrapped = Blur(model.clip, model.tokenizer, name=model.name, pretrained=model.pretrained,
                       image_size=model.image_size, mean=model.mean.flatten().tolist(),
                       std=model.std.flatten().tolist())
        return wrapped


class Squeeze(InputTransform):
    name = "test-squeeze"
    description = "bit-depth reduction"

    class Options(Options):
        bits: int = Field(2, ge=1, le=8, description="bits per channel")

    def transform(self, artifact, images):
        levels = 2 ** self.options.bits - 1
        return torch.round(images * levels) / levels


def test_a_wrapper_without_a_declared_fingerprint_is_never_served_from_the_cache(tmp_path):
    """Before: after == before and 0 images encoded (the unwrapped model's cache)."""
    with use_registry(make_registry(registering("defenses", BlurDefense), builtins=False)):
        r = invoke("defend", "-p", "test-blur", "--clean-items", "8", "--limit", "200",
                   "--out", tmp_path / "run", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["images_encoded"] >= 200  # the wrapped model's images were encoded
    m = res["metrics"]
    assert m["after_clean_top1"] != m["before_clean_top1"]
    # a model saved from an unknown wrapper is refused, never loaded without it
    with pytest.raises(MmsecError, match="wrapped model.*Blur"):
        load_model(pretrained=str(tmp_path / "run" / "artifacts" / "model.safetensors"),
                   device="cpu")


def test_an_input_transform_defense_is_cached_under_its_own_fingerprint_and_reloads(tmp_path):
    reg = make_registry(registering("defenses", Squeeze), builtins=False)
    with use_registry(reg):
        r = invoke("defend", "-p", "test-squeeze", "--clean-items", "8", "--limit", "200",
                   "--out", tmp_path / "run", "--json")
        assert r.exit_code == 0, r.output
        res = json.loads(r.stdout)
        assert res["images_encoded"] >= 200
        m = res["metrics"]
        assert m["after_clean_top1"] < m["before_clean_top1"]  # 2 bits: a visible cost
        saved = tmp_path / "run" / "artifacts" / "model.safetensors"
        again = reg.load_model(pretrained=str(saved), device="cpu")
        assert isinstance(again, TransformedModel) and again.defense.options.bits == 2
        second = json.loads(invoke("eval", "--pretrained", saved, "--limit", "200",
                                   "--knn-bank", "0", "--out", tmp_path / "e", "--json").stdout)
    assert second["metrics"]["clean_top1"] == pytest.approx(m["after_clean_top1"])
    assert second["images_encoded"] == 0  # its own cache entries, reused
    base = load_model(device="cpu")
    wrapped = TransformedModel(base, Squeeze({"bits": 2}))
    assert wrapped.cacheable and wrapped.fingerprint != base.fingerprint
    assert TransformedModel(base, Squeeze({"bits": 3})).fingerprint != wrapped.fingerprint


# ------------------------------------------------------------------ artifacts reach defenses
class Sees(Defense):
    name = "test-sees"
    description = "records what it was given"
    seen: list = []

    def apply(self, model, data, run):
        Sees.seen.append(run.inputs.attack_artifact)
        return model


def test_defend_receives_an_attack_artifact_from_cli_and_recipe(tmp_path):
    import mmsec_plugins.uap as uap

    reg = make_registry(uap, registering("defenses", Sees), builtins=False)
    with use_registry(reg):
        r = invoke("attack", "-p", "uap", "-o", "epochs", "1", "-o", "train_items", "64",
                   "--limit", "100", "--knn-bank", "0", "--out", tmp_path / "uap", "-q")
        assert r.exit_code == 0, r.output
        art = tmp_path / "uap" / "artifacts" / "uap.safetensors"
        r = invoke("defend", "-p", "test-sees", "--attack-artifact", art, "--clean-items", "8",
                   "--limit", "100", "--out", tmp_path / "d", "--json")
        assert r.exit_code == 0, r.output
        m = json.loads(r.stdout)["metrics"]
        assert Sees.seen[-1].plugin == "uap"
        assert "before_fooling_rate" in m and "after_fooling_rate" in m
        recipe = tmp_path / "r.yaml"
        recipe.write_text(
            "steps:\n"
            "  - {id: patch, kind: attack, plugin: uap, limit: 50, knn_bank: 0,\n"
            "     options: {epochs: 1, train_items: 32}}\n"
            "  - {id: guard, kind: defend, plugin: test-sees, artifact_from: patch,\n"
            "     limit: 50, clean_items: 8}\n")
        r = invoke("run", recipe, "--out", tmp_path / "rec", "--json")
        assert r.exit_code == 0, r.output
    steps = json.loads(r.stdout)["steps"]
    assert Sees.seen[-1].plugin == "uap" and steps[1]["attack_artifact"].endswith(
        "uap.safetensors")
    config = yaml.safe_load((tmp_path / "rec" / "guard" / "config.yaml").read_text())
    assert config["limit"] == 50 and config["clean_items"] == 8


# ------------------------------------------------------------------ options and run context
def test_dict_options_from_the_cli_in_yaml_flow_syntax():
    from mmsec_plugins.invertune import InverTune

    from mmsec.options import parse_cli_pairs

    opts = parse_cli_pairs([("simulator_options", "{epochs: 2, area: 1/10}")])
    assert InverTune(opts).options.simulator_options == {"epochs": 2, "area": "1/10"}


class Records(Attack):
    name = "test-records"
    description = "universal identity; remembers the run apply got"
    runs: list = []

    def fit(self, model, data, run):
        return self.artifact()

    def apply(self, artifact, images, labels=None, *, victim=None, run=None):
        Records.runs.append(run)
        return images


def test_apply_gets_the_run_context(tmp_path):
    with use_registry(make_registry(registering("attacks", Records), builtins=False)):
        r = invoke("attack", "-p", "test-records", "--limit", "20", "--knn-bank", "0",
                   "--out", tmp_path / "a", "-q")
    assert r.exit_code == 0, r.output
    assert Records.runs and all(run is not None and hasattr(run, "progress")
                                for run in Records.runs)


# ------------------------------------------------------------------ errors name the culprit
class Crashes(Attack):
    name = "test-crashes"
    description = "raises inside fit"

    def fit(self, model, data, run):
        raise KeyError("no such layer: visual.blocks.99")


def test_an_exception_in_fit_names_plugin_distribution_and_phase(tmp_path):
    with use_registry(make_registry(registering("attacks", Crashes), builtins=False)):
        r = invoke("attack", "-p", "test-crashes", "--limit", "20", "--out", tmp_path / "a")
    assert r.exit_code == 1
    line = r.stderr.strip()
    assert 'plugin "test-crashes"' in line and "failed in fit" in line and "KeyError" in line
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["status"] == "failed" and "test-crashes" in results["error"]


def test_a_failing_recipe_step_is_named_and_the_summary_written(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: broken\nsteps:\n"
                      "  - {id: clean, kind: eval, limit: 20, knn_bank: 0}\n"
                      "  - {id: boom, kind: attack, plugin: test-crashes, limit: 20}\n"
                      "  - {id: never, kind: eval, limit: 20}\n")
    with use_registry(make_registry(registering("attacks", Crashes), builtins=False)):
        r = invoke("run", recipe, "--out", tmp_path / "out")
    assert r.exit_code == 1
    assert 'steps[1] "boom" failed (1 of 3 steps done' in r.stderr and "KeyError" in r.stderr
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "clean" in summary and "failed" in summary
    assert not (tmp_path / "out" / "never").exists()


def test_an_ill_typed_default_fails_the_plugin_at_load():
    class BadDefault(Attack):
        name = "test-bad-default"
        description = "steps defaults to a word"

        class Options(Options):
            steps: int = Field("ten", description="iterations")

    reg = make_registry(registering("attacks", BadDefault), builtins=False)
    error = reg.plugins["test_test_bad_default"].error
    assert "invalid default" in error and '"steps"' in error and "ten" in error


def test_a_raising_hook_says_what_was_not_registered():
    def metrics_hook(register):
        raise RuntimeError("probe weights missing")

    module = hook_module("mixed", register_attacks=lambda register: register(Records),
                           register_metrics=metrics_hook)
    reg = make_registry(module, builtins=False)
    error = reg.plugins["mixed"].error
    assert "register_metrics raised RuntimeError" in error
    assert "dropped: attack test-records" in error and "test-records" not in reg.attacks


def test_a_plugin_without_an_api_version_is_skipped():
    old = hook_module("old_plugin", register_attacks=lambda register: register(Records))
    del old.mmsec_api_version
    reg = make_registry(old, builtins=False)
    assert "no mmsec_api_version" in reg.plugins["old_plugin"].error
    assert "test-records" not in reg.attacks


def test_plugins_for_another_api_version_are_skipped_with_a_reason():
    future = hook_module("future", register_attacks=lambda register: register(Records))
    future.mmsec_api_version = 3
    reg = Registry()
    from mmsec.registry import PluginInfo

    assert not reg.add_plugin(future, PluginInfo(name="future", module="future"))
    assert "mmsec_api_version = 3" in reg.plugins["future"].error
    assert "API 2" in reg.plugins["future"].error


def test_trace_logs_every_hook_call(monkeypatch, caplog):
    monkeypatch.setenv("MMSEC_TRACE_PLUGINS", "1")
    monkeypatch.setenv("MMSEC_LOAD_PLUGINS", "pgd")
    with caplog.at_level(logging.INFO, logger="mmsec.plugins"):
        load_plugins()
    traced = [r.getMessage() for r in caplog.records if r.getMessage().startswith("trace:")]
    assert 'trace: plugin "mmsec" register_datasets' in traced
    assert 'trace: plugin "pgd" register_attacks' in traced


def test_config_yaml_is_the_resolved_configuration(tmp_path):
    r = invoke("attack", "-p", "pgd", "-o", "steps", "1", "--limit", "10", "--knn-bank", "0",
               "--out", tmp_path / "a", "-q")
    assert r.exit_code == 0, r.output
    config = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert config["model"] == "zoo:shapes" and config["pretrained"] == "zoo:shapes"
    assert config["device"] == "cpu" and config["data"] == "procedural"
    assert config["options"]["steps"] == 1 and config["limit"] == 10
