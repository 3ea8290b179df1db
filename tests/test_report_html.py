"""The HTML report of real runs on the embedded model: a short recipe (clean eval, PGD at two
budgets, a UAP, a BadNets implant, FARE against it, robust PGD of the FARE model) runs once
for the module; its report is checked as files, as data, and in headless Chromium (Debian's
chromium + chromium-driver driven by Selenium; skipped without them).

The browser test keeps a screenshot of the page and of its plots under pytest's tmp path,
copied to ``$MMSEC_TEST_ARTIFACTS`` when that is set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mmsec.compare import compare
from mmsec.htmlreport import load_runs

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = """\
name: report-test
defaults: {seed: 0, split: test, limit: 100, knn_bank: 0, clean_items: 128}
steps:
  - {id: clean, kind: eval}
  - {id: pgd-1, kind: attack, plugin: pgd, options: {eps: 1/255, steps: 2}}
  - {id: pgd-2, kind: attack, plugin: pgd, options: {eps: 2/255, steps: 2}}
  - {id: uap, kind: attack, plugin: uap, options: {epochs: 4, train_items: 128, batch_size: 32}}
  - id: implant
    kind: attack
    plugin: backdoor
    options: {trigger: badnets, steps: 12, min_steps: 0, train_items: 256, batch_size: 64,
              early_stop: false, eval_items: 64}
  - id: fare
    kind: defend
    plugin: fare
    model_from: implant
    trigger_from: implant
    options: {steps: 4, warmup_steps: 0, attack_steps: 1, batch_size: 32, lr: 1e-3}
  - {id: fare-pgd, kind: eval, model_from: fare, robust: pgd, options: {eps: 2/255, steps: 2}}
"""
PLOTS = ("matrix", "accuracy-vs-eps", "asr-before-after", "robust-vs-clean")


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory):
    """The recipe's folder (about 25 s on one core)."""
    pytest.importorskip("matplotlib")
    from mmsec import api

    base = tmp_path_factory.mktemp("report")
    (base / "report-test.yaml").write_text(RECIPE)
    res = api.run_recipe(base / "report-test.yaml", out=base / "out", quiet=True)
    assert res["html"] == str(base / "out" / "report.html")
    return base / "out"


def test_the_recipe_writes_its_html_report_and_summary_links_the_same_plots(recipe_dir):
    summary = (recipe_dir / "summary.md").read_text()
    for stem in PLOTS:
        assert (recipe_dir / "figures" / f"{stem}.png").stat().st_size > 1000
        assert f"](figures/{stem}.png)" in summary
    assert "[report.html](report.html)" in summary
    for step in ("uap", "implant", "fare"):  # every training loop left curves and a figure
        assert (recipe_dir / step / "scalars.jsonl").is_file()
        assert "figures/curves.png" in (recipe_dir / step / "report.md").read_text()


def test_the_page_is_self_contained(recipe_dir):
    page = (recipe_dir / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "default-src 'none'" in page  # the browser itself refuses any fetch
    alts = re.findall(r'alt="([^"]+)"', page)
    for expected in ("uap: artifacts/uap-delta.png", "implant: artifacts/trigger.png",
                     "uap: figures/curves.png", *PLOTS):
        assert expected in alts, expected
    assert page.count('<section class="run"') == 7


def test_the_matrix_links_runs_through_their_files(recipe_dir):
    runs = load_runs([recipe_dir])  # a recipe folder: its steps in the order they ran
    assert [r.name for r in runs] == ["clean", "pgd-1", "pgd-2", "uap", "implant", "fare",
                                      "fare-pgd"]
    assert [r.name for r in load_runs([recipe_dir.parent])] == [r.name for r in runs]
    metrics = {r.name: r.results["metrics"] for r in runs}
    attacks, defenses, cells = compare(runs).matrix()
    assert defenses == ["none", "fare"]
    assert sorted(attacks) == ["backdoor", "pgd eps=1/255", "pgd eps=2/255", "uap"]
    assert cells[("backdoor", "fare")].value == metrics["fare"]["after_asr"]
    assert cells[("backdoor", "none")].value == metrics["fare"]["before_asr"]
    assert cells[("pgd eps=2/255", "none")].value == metrics["pgd-2"]["adv_top1"]
    # the robust eval of the FARE model: a pgd cell in the fare column
    assert cells[("pgd eps=2/255", "fare")].metric == "robust_top1"
    assert cells[("pgd eps=2/255", "fare")].value == metrics["fare-pgd"]["robust_top1"]


def test_report_cli_writes_html_and_names_bad_input(recipe_dir, tmp_path):
    from mmsec.cli import main

    out = tmp_path / "two.html"
    r = CliRunner().invoke(main, ["report", str(recipe_dir / "clean"), str(recipe_dir / "pgd-1"),
                                  "--html", str(out), "--title", "two runs"])
    assert r.exit_code == 0, r.output
    assert f"html report: {out} (2 runs)" in r.stdout
    page = out.read_text()
    assert "<title>two runs</title>" in page
    assert 'id="plots"' not in page  # one attack at one budget: nothing to plot across runs
    for bad, message in ((tmp_path / "nope", "no such run folder"),
                         (tmp_path, "not a run folder")):
        r = CliRunner().invoke(main, ["report", str(bad), "--html", str(out)])
        assert r.exit_code == 2 and message in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1300,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_bin), options=options)


def test_the_page_in_headless_chromium(recipe_dir, tmp_path):
    from selenium.webdriver.common.by import By

    driver = _browser()
    try:
        driver.get((recipe_dir / "report.html").resolve().as_uri())
        assert driver.execute_script("return document.readyState") == "complete"
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        assert len(images) >= 10
        assert all(ok and width > 0 for _, ok, width in images), images

        table = driver.find_element(By.ID, "runs-table")
        heads = table.find_elements(By.CSS_SELECTOR, "thead th")
        names = [h.text for h in heads]
        col = names.index("clean_top1")

        def column(index):
            return [row.find_elements(By.TAG_NAME, "td")[index].get_attribute("data-v")
                    for row in table.find_elements(By.CSS_SELECTOR, "tbody tr")]

        heads[col].click()
        values = [float(v) for v in column(col) if v]
        assert values == sorted(values) and len(values) >= 5
        assert heads[col].get_attribute("aria-sort") == "ascending"
        heads[col].click()
        values = [float(v) for v in column(col) if v]
        assert values == sorted(values, reverse=True)
        heads[names.index("#")].click()  # back to the recipe's order
        assert column(0) == [str(i) for i in range(1, 8)]

        shots = {"report-page.png": None, "report-plots.png": "plots"}
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1300, min(int(height), 12000))
        for name, element in shots.items():
            path = tmp_path / name
            if element:
                driver.find_element(By.ID, element).screenshot(str(path))
            else:
                driver.save_screenshot(str(path))
            assert path.stat().st_size > 10_000
            if os.environ.get("MMSEC_TEST_ARTIFACTS"):
                keep = Path(os.environ["MMSEC_TEST_ARTIFACTS"])
                keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, keep / name)
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        driver.quit()


def test_headlines_of_the_real_runs(recipe_dir):
    from mmsec.headline import headline

    res = {p.parent.name: json.loads(p.read_text()) for p in recipe_dir.glob("*/results.json")}
    assert headline(res["pgd-2"]).columns == ("clean", "attacked", "control")
    assert headline(res["implant"]).columns == ("implanted", "before implant", "random trigger")
    fare = headline(res["fare"])
    assert [r[0] for r in fare.rows] == ["CA (clean top-1)", "ASR"]
    assert headline(res["fare-pgd"]).columns == ("clean", "robust")
