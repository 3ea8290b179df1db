"""End-to-end CLI behaviour on the embedded model: the checks a new user would make."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from mmsec.cli import main

REPO = Path(__file__).resolve().parents[1]


def invoke(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def results_of(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


@pytest.mark.slow
def test_pgd_drops_zero_shot_accuracy_and_noise_does_not(tmp_path):
    out = tmp_path / "pgd"
    r = invoke("attack", "--plugin", "pgd", "--limit", "500", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["metrics"]
    assert m["clean_top1"] >= 0.9
    # measured: 98.2% -> 10.6% on these 500 items (97.7% -> 10.9% on all 2,000); ~10% of
    # the shapes stay robust at 4/255 whatever the loss (CE or margin) or step schedule
    assert m["adv_top1"] < 0.15
    assert m["fooling_rate"] > 0.8
    # uniform noise of the same eps is the control: it must not do the same
    assert m["control_top1"] > m["clean_top1"] - 0.05
    assert m["control_fooling_rate"] < 0.1
    res = results_of(out)
    assert res["plugin"] == "pgd" and res["plugin_version"]
    assert res["options"]["eps"] == pytest.approx(4 / 255)
    assert (out / "report.md").exists() and (out / "config.yaml").exists()


def test_eval_twice_encodes_nothing_the_second_time(tmp_path, monkeypatch):
    monkeypatch.setenv("MMSEC_CACHE_DIR", str(tmp_path / "cache"))  # start from an empty cache
    first = invoke("eval", "--limit", "300", "--knn-bank", "300", "--out", tmp_path / "a", "--json")
    assert first.exit_code == 0, first.output
    second = invoke("eval", "--limit", "300", "--knn-bank", "300", "--out", tmp_path / "b",
                    "--json")
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["images_encoded"] == 600 and b["images_encoded"] == 0  # 300 test + 300 kNN bank
    assert b["cache_hits"] >= 600
    assert a["metrics"]["clean_top1"] == b["metrics"]["clean_top1"] >= 0.9
    assert b["metrics"]["clean_knn_top1"] > 0.5
    assert "clean_i2t_r1" in b["metrics"]  # the procedural set has captions: retrieval too
    # long-form rows: one per (task, condition, metric), with the number of items measured
    rows = {(r["task"], r["condition"], r["metric"]): r for r in b["rows"]}
    top1 = rows["zero_shot", "clean", "top1"]
    assert top1["n_items"] == 300 and top1["split"] == "test" and top1["key"] == "clean_top1"
    assert rows["retrieval", "clean", "t2i_r1"]["n_items"] == 300 * 5  # five captions each


def test_a_registered_metric_appears_in_eval_results(tmp_path):
    """A plugin's probe runs in every evaluation, next to the built-in ones."""
    from mmsec.evaluation import Metric
    from mmsec.registry import PluginInfo, get_registry, reset_registry
    from mmsec.testing import hook_module

    seen = []

    def spread(view):
        seen.append(view.condition)
        return {"spread": float(view.images.std(0).mean())}

    module = hook_module("toy_metrics", register_metrics=lambda register: register(
        Metric("spread", spread, "mean per-dimension std of the embeddings")))
    reg = get_registry()
    try:
        reg.add_plugin(module, PluginInfo(name="toy_metrics", module="toy_metrics"))
        reg.collect()
        r = invoke("eval", "--limit", "50", "--knn-bank", "0", "--out", tmp_path / "e",
                   "--json")
    finally:
        reset_registry(None)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert 0 < res["metrics"]["clean_spread"] < 1 and seen == ["clean"]
    assert any(row["task"] == "spread" and row["n_items"] == 50 for row in res["rows"])


def test_unknown_option_is_one_line_exit_2(tmp_path):
    r = invoke("attack", "-p", "pgd", "-o", "epz", "0.1", "--out", tmp_path / "x")
    assert r.exit_code == 2
    assert 'unknown option "epz"' in r.stderr and "eps" in r.stderr
    assert "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()  # rejected before any work


def test_ill_typed_option(tmp_path):
    r = invoke("attack", "-p", "pgd", "-o", "steps", "ten", "--out", tmp_path / "x")
    assert r.exit_code == 2 and 'option "steps"' in r.stderr


def test_wrong_checkpoint_is_one_line_exit_1(tmp_path):
    bad = tmp_path / "bad.pt"
    import torch

    torch.save({"foo.weight": torch.zeros(2)}, bad)
    r = invoke("eval", "-m", "zoo:shapes", "--pretrained", bad, "--out", tmp_path / "x")
    assert r.exit_code == 1
    assert "does not fit this model" in r.stderr and "foo.weight" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_data_path(tmp_path):
    r = invoke("eval", "-d", f"imagefolder:{tmp_path / 'nowhere'}", "--out", tmp_path / "x")
    assert r.exit_code == 1 and "not found" in r.stderr


def _folder_with_a_corrupt_image(root: Path) -> Path:
    for cls, colour in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        d = root / "train" / cls
        d.mkdir(parents=True)
        t = root / "test" / cls
        t.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), colour).save(d / f"{i}.png")
            Image.new("RGB", (40, 40), colour).save(t / f"{i}.png")
    (root / "test" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return root


def test_corrupt_image_skipped_and_counted_or_strict(tmp_path):
    data = _folder_with_a_corrupt_image(tmp_path / "imgs")
    r = invoke("eval", "-d", f"imagefolder:{data}", "--knn-bank", "0", "--out", tmp_path / "a",
               "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["skipped_count"] == 1
    r = invoke("eval", "-d", f"imagefolder:{data}", "--strict", "--out", tmp_path / "b")
    assert r.exit_code == 1 and "broken.png" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_recipe_names_the_path(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("steps:\n  - id: a\n    kind: attack\n    plugin: pgd\n    optoins: {}\n")
    r = invoke("run", recipe)
    assert r.exit_code == 2
    assert "steps[0].optoins" in r.stderr and "bad.yaml" in r.stderr
    recipe.write_text("steps:\n  - id: a\n    kind: attack\n    plugin: pgd\n"
                      "    options: {epz: 1}\n")
    r = invoke("run", recipe)
    assert r.exit_code == 2 and 'unknown option "epz"' in r.stderr


def test_shipped_recipes_validate():
    from mmsec.options import validate_options
    from mmsec.recipes import load_recipe
    from mmsec.registry import get_registry

    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes
    reg = get_registry()
    for path in recipes:
        recipe = load_recipe(path)
        for st in recipe.resolved_steps():
            if st.kind == "attack" or st.robust:
                validate_options(reg.attack(st.robust or st.plugin).Options, st.options,
                                 owner=st.label)
            elif st.kind == "defend":
                validate_options(reg.defense(st.plugin).Options, st.options, owner=st.label)
        assert yaml.safe_load(path.read_text())["steps"]


@pytest.mark.slow
def test_recipe_chain_and_report(tmp_path):
    recipe = tmp_path / "chain.yaml"
    recipe.write_text(
        "name: chain\nsteps:\n"
        "  - {id: clean, kind: eval}\n"
        "  - {id: weak, kind: attack, plugin: pgd, options: {eps: 1/255, steps: 3}}\n")
    r = invoke("run", recipe, "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "summary.csv").exists()
    rep = invoke("report", tmp_path / "out" / "clean", tmp_path / "out" / "weak")
    assert rep.exit_code == 0 and "pgd" in rep.stdout and "clean_top1" in rep.stdout


def test_plugins_models_datasets_cache_listings():
    r = invoke("plugins", "--json")
    assert r.exit_code == 0
    rows = {p["name"]: p for p in json.loads(r.stdout)}
    assert rows["pgd"]["distribution"] == "mmsec" and rows["pgd"]["version"]
    assert "attacks" in rows["pgd"]["items"]
    r = invoke("models", "--json")
    assert r.exit_code == 0 and "zoo:shapes" in r.stdout
    r = invoke("datasets")
    assert r.exit_code == 0 and "procedural" in r.stdout and "fashion-mnist" in r.stdout
    r = invoke("cache", "info", "--json")
    assert r.exit_code == 0 and "items" in json.loads(r.stdout)
