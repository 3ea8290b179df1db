"""The plugin host: every hook registers, broken plugins are named, the CLI answers in one line.

No test here auto-loads the user's installed third-party plugins: registries are built
directly (``Registry()``), or ``load_plugins`` runs with ``mmsec.registry.entry_points``
replaced by :class:`FakeSite`, which sees mmsec's own ``pgd`` entry point plus fake
distributions written to ``tmp_path``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import sys
import textwrap
import types
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import mmsec.registry
from mmsec import hookspecs
from mmsec.attacks import Attack
from mmsec.cli import MmsecGroup, main
from mmsec.data import DatasetSource
from mmsec.defenses import Defense
from mmsec.errors import PluginError, UsageError
from mmsec.evaluation import Metric
from mmsec.model import ModelSource
from mmsec.registry import (
    GROUP,
    KINDS,
    PluginInfo,
    Registry,
    load_plugins,
    reset_registry,
)
from mmsec.testing import hook_module

HOOKS = sorted(name for name, obj in vars(hookspecs).items()
               if callable(obj) and hasattr(obj, "mmsec_spec"))

PREFIX = "mmsec_testplugin_"  # module names written to tmp_path; removed from sys.modules after


# --------------------------------------------------------------------------- helpers
class DummyAttack(Attack):
    name = "dummy-attack"
    description = "does nothing"


class OtherDummyAttack(Attack):
    name = "dummy-attack"  # same name as DummyAttack: a clash
    description = "does nothing either"


class DummyDefense(Defense):
    name = "dummy-defense"
    description = "returns the model unchanged"

    def apply(self, model, data, run):
        return model


class NotAnAttack:
    name = "impostor"
    description = "has a name but does not subclass Attack"


def plugin(name: str, **hooks) -> types.ModuleType:
    """A plugin module whose attributes are the given hook implementations."""
    return hook_module(name, **hooks)


def registry_of(*plugins: types.ModuleType) -> Registry:
    """Register ``plugins`` in order (as the host does) and collect what they register."""
    reg = Registry()
    for module in plugins:
        reg.add_plugin(module, PluginInfo(name=module.__name__, module=module.__name__))
    reg.collect()
    return reg


def registers(*items):
    """A ``register_*`` hook implementation that registers ``items``."""

    def hook(register):
        for item in items:
            register(item)

    return hook


def raises(exc: Exception):
    def hook(register):
        raise exc

    return hook


class FakeSite:
    """A fake site-packages in ``tmp_path``: plugin modules, distributions, entry points.

    ``entry_points(group=...)`` (patched into ``mmsec.registry``) returns mmsec's own ``pgd``
    entry point, the entry points of the distributions written here, and bare
    ``EntryPoint`` objects (no distribution), so nothing else installed is ever loaded.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: list[str] = []
        self.bare_eps: list[importlib.metadata.EntryPoint] = []

    def module(self, name: str, source: str) -> str:
        name = PREFIX + name
        source = textwrap.dedent(source)
        if "mmsec_api_version" not in source:  # a plugin for this mmsec unless a test says not
            source = "mmsec_api_version = 2\n" + source
        (self.root / f"{name}.py").write_text(source)
        self.modules.append(name)
        importlib.invalidate_caches()
        return name

    def dist(self, name: str, version: str, eps: dict[str, str]) -> None:
        info = self.root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        lines = [f"[{GROUP}]"] + [f"{ep} = {value}" for ep, value in eps.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")

    def bare(self, name: str, value: str) -> None:
        self.bare_eps.append(importlib.metadata.EntryPoint(name, value, GROUP))

    def entry_points(self, *, group: str):
        own = [ep for ep in importlib.metadata.distribution("mmsec").entry_points
               if ep.group == group and ep.name == "pgd"]
        fake = [ep for dist in importlib.metadata.distributions(path=[str(self.root)])
                for ep in dist.entry_points if ep.group == group]
        return own + fake + [ep for ep in self.bare_eps if ep.group == group]


GOOD_PLUGIN = """
    from mmsec import Attack, hookimpl

    class Good(Attack):
        name = "good"
        description = "a healthy third-party attack"

    @hookimpl
    def register_attacks(register):
        register(Good)
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    root = tmp_path / "site-packages"
    root.mkdir()
    fake = FakeSite(root)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(mmsec.registry, "entry_points", fake.entry_points)
    try:
        yield fake
    finally:
        for name in fake.modules:
            sys.modules.pop(name, None)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """Tests decide MMSEC_LOAD_PLUGINS / MMSEC_DEBUG themselves; the global registry is restored."""
    monkeypatch.delenv("MMSEC_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("MMSEC_DEBUG", raising=False)
    saved = mmsec.registry._REGISTRY
    try:
        yield
    finally:
        reset_registry(saved)


@pytest.fixture(scope="module")
def pgd_registry() -> Registry:
    """mmsec's own plugin plus pgd, loaded through its entry point (and nothing else)."""
    reg = load_plugins(selection="pgd")
    assert not reg.failures(), [p.error for p in reg.failures()]
    return reg


def invoke(registry: Registry, args: list[str], **kw):
    """Run the ``mmsec`` CLI against ``registry`` (the process-wide one is put back after)."""
    saved = mmsec.registry._REGISTRY
    reset_registry(registry)
    try:
        return CliRunner().invoke(main, args, **kw)
    finally:
        reset_registry(saved)


# --------------------------------------------------------------------------- every hook is tested
@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    assert f"test_hook_{hook}" in globals(), f"hook {hook} has no test_hook_{hook} in {__file__}"


def test_no_stale_hook_tests():
    assert HOOKS, "no hook specifications found in mmsec.hookspecs"
    stale = [n for n in globals() if n.startswith("test_hook_") and n[len("test_hook_"):] not in HOOKS]
    assert not stale


def test_every_hook_is_collected_by_the_host():
    # a hook missing from KINDS would be declared but never called
    assert {f"register_{kind}" for kind in KINDS} == set(HOOKS)


def test_hook_register_attacks():
    reg = registry_of(plugin("p", register_attacks=registers(DummyAttack)))
    assert reg.attack("dummy-attack") is DummyAttack
    assert reg.plugins["p"].items == {"attacks": ["dummy-attack"]}
    assert reg.owner[("attacks", "dummy-attack")] == "p"
    assert reg.plugins["p"].error is None


def test_hook_register_defenses():
    reg = registry_of(plugin("p", register_defenses=registers(DummyDefense)))
    assert reg.defense("dummy-defense") is DummyDefense
    assert reg.plugins["p"].items == {"defenses": ["dummy-defense"]}
    assert reg.owner[("defenses", "dummy-defense")] == "p"


def test_hook_register_datasets():
    source = DatasetSource("toy-data", lambda arg, **kw: None, "a toy source", plugin="someone")
    reg = registry_of(plugin("p", register_datasets=registers(source)))
    registered = reg.datasets["toy-data"]
    assert registered.factory is source.factory
    assert registered.plugin == "p"  # the host records who registered it, not what it claims
    assert reg.plugins["p"].items == {"datasets": ["toy-data"]}


def test_hook_register_models():
    source = ModelSource("toy-zoo", lambda: [("toy", ["tag"])], "toy models")
    reg = registry_of(plugin("p", register_models=registers(source)))
    assert reg.models["toy-zoo"] == source and reg.models["toy-zoo"].plugin == "p"
    assert reg.plugins["p"].items == {"models": ["toy-zoo"]}


def test_model_specs_resolve_through_registered_model_sources(zoo_model):
    """``-m toy:anything`` reaches the plugin's loader; zoo: and bare names keep theirs."""
    import copy

    import mmsec.default_plugins as defaults

    asked = []

    def load(name, pretrained, state, meta):
        asked.append((name, pretrained))
        return copy.deepcopy(zoo_model)

    toy = ModelSource("toy", lambda: [("toy:small", [])], "toy models", load=load, prefix="toy")
    reg = Registry()
    reg.add_plugin(defaults, PluginInfo(name="mmsec", module="mmsec.default_plugins"))
    reg.add_plugin(plugin("p", register_models=registers(toy)), PluginInfo(name="p", module="p"))
    reg.collect()
    model = reg.load_model("toy:small", "v1", device="cpu")
    assert asked == [("small", "v1")] and model.fingerprint == zoo_model.fingerprint
    assert reg.load_model("zoo:shapes", device="cpu").name == "zoo:shapes"
    with pytest.raises(UsageError, match="not an open_clip architecture"):
        reg.load_model("no-such-arch", device="cpu")

    def broken(*_):
        raise RuntimeError("weights server down")

    reg.models["toy"] = ModelSource("toy", toy.list_fn, load=broken, prefix="toy", plugin="p")
    with pytest.raises(Exception, match='model source "toy" .plugin p. failed.*server down'):
        reg.load_model("toy:small", device="cpu")


def test_hook_register_metrics():
    def toy_metric(*args):
        return 0.0

    def hook(register):
        register("toy_metric", toy_metric, "always zero")

    reg = registry_of(plugin("p", register_metrics=hook))
    assert reg.metrics["toy_metric"] == Metric("toy_metric", toy_metric, "always zero",
                                                     plugin="p")
    assert reg.plugins["p"].items == {"metrics": ["toy_metric"]}


def test_hook_register_commands():
    def hook(cli):
        @cli.command("hello")
        def hello():
            click.echo("hello from a plugin")

    reg = registry_of(plugin("p", register_commands=hook))
    group = MmsecGroup(name="mmsec")  # a fresh group: the real `main` is left alone
    saved = mmsec.registry._REGISTRY
    reset_registry(reg)
    try:
        result = CliRunner().invoke(group, ["hello"])
    finally:
        reset_registry(saved)
    assert result.exit_code == 0, result.output
    assert result.output == "hello from a plugin\n"
    assert reg.plugins["p"].items == {"commands": ["hello"]}


def test_raising_register_commands_is_named_and_the_group_still_works():
    def bad(cli):
        raise RuntimeError("no commands today")

    def good(cli):
        cli.add_command(click.Command("ok", callback=lambda: click.echo("ok")))

    reg = registry_of(plugin("bad", register_commands=bad), plugin("good", register_commands=good))
    group = click.Group("mmsec")
    reg.add_commands(group)
    assert "register_commands raised RuntimeError: no commands today" in reg.plugins["bad"].error
    assert list(group.commands) == ["ok"]
    assert reg.plugins["good"].items == {"commands": ["ok"]} and reg.plugins["good"].error is None


# --------------------------------------------------------------------------- broken plugins
@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import mmsec_no_such_dependency\n", "ModuleNotFoundError"),
        ("def broken(:\n", "SyntaxError"),
        ("raise RuntimeError('needs a GPU at import time')\n", "needs a GPU at import time"),
        ("import sys\nsys.exit(3)\n", "SystemExit (called sys.exit(3))"),
    ],
    ids=["missing-dependency", "syntax-error", "raises", "sys-exit"],
)
def test_import_failure_is_named_with_its_distribution(site, caplog, source, expected):
    broken = site.module("broken", source)
    good = site.module("good", GOOD_PLUGIN)
    site.dist("mmsec-broken", "0.3.1", {"broken": broken})
    site.dist("mmsec-good", "1.0", {"good": good})
    with caplog.at_level(logging.WARNING, logger="mmsec.plugins"):
        reg = load_plugins(selection=None)

    info = reg.plugins["broken"]
    assert info.error.startswith("import failed: ") and expected in info.error
    assert (info.distribution, info.version, info.module) == ("mmsec-broken", "0.3.1", broken)
    assert 'Error importing plugin "broken" (distribution mmsec-broken 0.3.1)' in caplog.text
    assert [p.name for p in reg.failures()] == ["broken"]
    # the others keep working
    assert reg.attack("good").__module__ == good and reg.plugins["good"].distribution == "mmsec-good"
    assert reg.attack("pgd").name == "pgd"
    assert "procedural" in reg.datasets


def test_import_failure_without_a_distribution_is_named(site, caplog):
    site.bare("loose", site.module("loose", "raise ImportError('libfoo.so not found')\n"))
    with caplog.at_level(logging.WARNING, logger="mmsec.plugins"):
        reg = load_plugins(selection="loose")
    info = reg.plugins["loose"]
    assert info.distribution is None
    assert info.error == "import failed: ImportError: libfoo.so not found"
    assert 'Error importing plugin "loose": import failed' in caplog.text


def test_misspelt_hook_is_rejected_and_the_rest_keep_working(site, caplog):
    typo = site.module("typo", """
        from mmsec import Attack, hookimpl

        class Typo(Attack):
            name = "typo"

        @hookimpl
        def register_atacks(register):
            register(Typo)
    """)
    site.dist("mmsec-typo", "2.0", {"typo": typo})
    site.dist("mmsec-good", "1.0", {"good": site.module("good", GOOD_PLUGIN)})
    with caplog.at_level(logging.WARNING, logger="mmsec.plugins"):
        reg = load_plugins(selection=None)

    error = reg.plugins["typo"].error
    assert error.startswith("PluginValidationError: ") and "register_atacks" in error
    assert 'Error loading plugin "typo" (distribution mmsec-typo 2.0)' in caplog.text
    assert not reg.pm.is_registered(sys.modules[typo])
    assert "typo" not in reg.attacks
    assert set(reg.attacks) == {"good", "pgd"}
    assert [p.name for p in reg.failures()] == ["typo"]


def test_wrong_hook_argument_names_are_rejected():
    def register_attacks(reg):  # the spec's argument is `register`
        reg(DummyAttack)

    reg = registry_of(plugin("wrong", register_attacks=register_attacks),
                      plugin("fine", register_defenses=registers(DummyDefense)))
    assert reg.plugins["wrong"].error.startswith("PluginValidationError: ")
    assert reg.attacks == {} and reg.defense("dummy-defense") is DummyDefense


def test_sys_exit_in_a_hook_is_named_and_others_keep_working():
    reg = registry_of(plugin("quitter", register_attacks=raises(SystemExit(3))),
                      plugin("calm", register_defenses=registers(DummyDefense)))
    error = reg.plugins["quitter"].error
    assert error.startswith("register_attacks raised SystemExit (called sys.exit(3))")
    assert reg.defense("dummy-defense") is DummyDefense


def test_raising_hook_is_named_and_others_keep_working(caplog):
    with caplog.at_level(logging.WARNING, logger="mmsec.plugins"):
        reg = registry_of(
            plugin("angry", register_attacks=raises(ValueError("missing weights file"))),
            plugin("calm", register_attacks=registers(DummyAttack),
                   register_defenses=registers(DummyDefense)),
        )
    assert reg.plugins["angry"].error == ("register_attacks raised ValueError: missing weights "
                                          "file; nothing of this plugin is registered")
    assert 'Error in plugin "angry"' in caplog.text and "missing weights file" in caplog.text
    assert reg.attack("dummy-attack") is DummyAttack and reg.defense("dummy-defense") is DummyDefense
    assert [p.name for p in reg.failures()] == ["angry"]


def test_two_third_party_plugins_with_one_name_leave_it_ambiguous(caplog):
    """Neither wins silently: the bare name is an error that lists both qualified names."""
    with caplog.at_level(logging.WARNING, logger="mmsec.plugins"):
        reg = registry_of(plugin("first", register_attacks=registers(DummyAttack)),
                          plugin("second", register_attacks=registers(OtherDummyAttack)))
    with pytest.raises(UsageError, match="first:dummy-attack or -p second:dummy-attack"):
        reg.attack("dummy-attack")
    assert reg.attack("first:dummy-attack") is DummyAttack
    assert reg.attack("second:dummy-attack") is OtherDummyAttack
    assert reg.plugins["second"].error is None and reg.plugins["second"].refused
    assert any("first" in r.getMessage() and "second" in r.getMessage() for r in caplog.records)


def test_attack_that_does_not_subclass_attack_is_an_error_of_its_plugin():
    reg = registry_of(plugin("impostor", register_attacks=registers(NotAnAttack)),
                      plugin("honest", register_attacks=registers(DummyAttack)))
    error = reg.plugins["impostor"].error
    assert error.startswith("register_attacks raised TypeError: ")
    assert "'impostor' must subclass mmsec.Attack" in error
    assert "impostor" not in reg.attacks and reg.attack("dummy-attack") is DummyAttack


def test_defense_that_does_not_subclass_defense_is_an_error_of_its_plugin():
    reg = registry_of(plugin("mixup", register_defenses=registers(DummyAttack)))
    assert "must subclass mmsec.Defense" in reg.plugins["mixup"].error
    assert reg.defenses == {}


def test_item_without_a_name_is_an_error_of_its_plugin():
    class Nameless(Attack):
        pass  # name = "" inherited

    reg = registry_of(plugin("nameless", register_attacks=registers(Nameless)))
    assert "registered without a valid `name`" in reg.plugins["nameless"].error
    assert reg.attacks == {}


# --------------------------------------------------------------------------- MMSEC_LOAD_PLUGINS
@pytest.fixture
def site_with_extra(site):
    site.dist("mmsec-good", "1.0", {"good": site.module("good", GOOD_PLUGIN)})
    return site


def test_load_plugins_empty_loads_no_entry_point(site_with_extra, monkeypatch):
    monkeypatch.setenv("MMSEC_LOAD_PLUGINS", "")
    reg = load_plugins()
    assert list(reg.plugins) == ["mmsec"]
    assert reg.attacks == {} and reg.defenses == {}
    # mmsec's own default plugin is always there
    assert {"procedural", "imagefolder", "captions"} <= set(reg.datasets)
    assert all(d.plugin == "mmsec" for d in reg.datasets.values())
    assert {"zoo", "open_clip"} <= set(reg.models) and "zero_shot" in reg.metrics
    assert reg.plugins["mmsec"].builtin and reg.plugins["mmsec"].distribution == "mmsec"


def test_load_plugins_selects_by_name(site_with_extra, monkeypatch):
    monkeypatch.setenv("MMSEC_LOAD_PLUGINS", "pgd")
    reg = load_plugins()
    assert set(reg.plugins) == {"mmsec", "pgd"}
    assert list(reg.attacks) == ["pgd"]
    assert reg.plugins["pgd"].distribution == "mmsec" and reg.plugins["pgd"].builtin


def test_load_plugins_unset_loads_every_entry_point(site_with_extra):
    reg = load_plugins()
    assert set(reg.plugins) == {"mmsec", "pgd", "good"}
    assert not reg.plugins["good"].builtin


def test_selection_argument_overrides_the_variable(site_with_extra, monkeypatch):
    monkeypatch.setenv("MMSEC_LOAD_PLUGINS", "")
    assert set(load_plugins(selection=" good , pgd ").plugins) == {"mmsec", "pgd", "good"}


def test_selecting_an_unknown_plugin_warns(site, caplog):
    with caplog.at_level(logging.WARNING, logger="mmsec.plugins"):
        reg = load_plugins(selection="pgd,pgdd")
    assert set(reg.plugins) == {"mmsec", "pgd"}
    assert 'names "pgdd", but no installed plugin has that name' in caplog.text


# --------------------------------------------------------------------------- lookups
def test_unknown_attack_lists_the_available_ones(pgd_registry):
    with pytest.raises(UsageError) as err:
        pgd_registry.attack("nope")
    assert "'nope'" in str(err.value) and "available: pgd" in str(err.value)
    assert err.value.exit_code == 2


def test_unknown_defense_with_none_available():
    with pytest.raises(UsageError, match=r"unknown defense plugin 'nope' \(available: none\)"):
        Registry().defense("nope")


def test_failed_plugin_asked_for_by_name_is_a_plugin_error(site):
    site.dist("mmsec-advx", "0.9", {"advx": site.module("advx", "import mmsec_missing_dep\n")})
    reg = load_plugins(selection="advx")
    with pytest.raises(PluginError) as err:
        reg.attack("advx")
    message = str(err.value)
    assert message.startswith('plugin "advx" (distribution mmsec-advx 0.9) failed to load: ')
    assert "mmsec_missing_dep" in message
    assert err.value.exit_code == 1


# --------------------------------------------------------------------------- options via a plugin
def test_unknown_option_is_named_with_a_suggestion(pgd_registry):
    with pytest.raises(UsageError) as err:
        pgd_registry.attack("pgd")({"epz": "1"})
    message = str(err.value)
    assert message.startswith('plugin "pgd": unknown option "epz", did you mean "eps"?')
    assert "known: eps, step_size, steps, random_start" in message
    assert "\n" not in message


def test_ill_typed_option_is_one_readable_line(pgd_registry):
    with pytest.raises(UsageError) as err:
        pgd_registry.attack("pgd")({"steps": "ten"})
    assert str(err.value) == "plugin \"pgd\": option \"steps\": expected an integer, got 'ten'"


def test_out_of_range_option(pgd_registry):
    with pytest.raises(UsageError, match=r'option "eps": must be >= 0'):
        pgd_registry.attack("pgd")({"eps": "-1/255"})


def test_fraction_is_accepted(pgd_registry):
    atk = pgd_registry.attack("pgd")({"eps": "8/255", "step_size": "2 / 255", "steps": "5"})
    assert atk.options.eps == pytest.approx(8 / 255)
    assert atk.options.step_size == pytest.approx(2 / 255)
    assert atk.options.steps == 5


def test_pgd_defaults_are_the_documented_paper_values(pgd_registry):
    cls = pgd_registry.attack("pgd")
    options = cls().options
    assert options.eps == pytest.approx(4 / 255)
    assert options.step_size == pytest.approx(1 / 255)
    assert options.steps == 10
    assert options.random_start is True
    doc = sys.modules[cls.__module__].__doc__
    assert "eps 4/255, 10 steps of 1/255, random start" in doc


# --------------------------------------------------------------------------- CLI
@pytest.fixture
def cli_registry(site):
    """pgd, a plugin that fails to import, and one whose attack raises when built."""
    site.dist("mmsec-broken", "0.3.1", {"broken": site.module("broken", "import mmsec_nope\n")})
    site.dist("mmsec-boom", "0.1", {"boom": site.module("boom", """
        from mmsec import Attack, hookimpl

        class ExplodingAttack(Attack):
            name = "exploding"
            description = "raises something unexpected when built"

            def __init__(self, options=None):
                raise RuntimeError("kaboom\\nsecond line that must not be printed")

        @hookimpl
        def register_attacks(register):
            register(ExplodingAttack)
    """)})
    return load_plugins(selection=None)


def test_cli_plugins_json(cli_registry):
    result = invoke(cli_registry, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {"mmsec", "pgd", "broken", "boom"}
    pgd = rows["pgd"]
    assert pgd["distribution"] == "mmsec" and pgd["builtin"] and pgd["error"] is None
    assert pgd["items"] == {"attacks": ["pgd"]} and pgd["kinds"] == ["attack"]
    assert pgd["module"] == "mmsec_plugins.pgd" and pgd["descriptions"]["pgd"]
    broken = rows["broken"]
    assert broken["distribution"] == "mmsec-broken" and broken["version"] == "0.3.1"
    assert broken["error"].startswith("import failed: ModuleNotFoundError")
    assert broken["items"] == {}
    assert rows["mmsec"]["builtin"] and "datasets" in rows["mmsec"]["items"]


def test_cli_plugins_table_marks_failures(cli_registry):
    result = invoke(cli_registry, ["plugins"])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("broken"))
    assert "mmsec-broken 0.3.1" in line and "FAILED: import failed" in line


def test_cli_unknown_option_is_one_line_exit_2(pgd_registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(pgd_registry, ["attack", "-p", "pgd", "-o", "epz", "1",
                                   "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "epz" in lines[0] and 'did you mean "eps"' in lines[0]
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # rejected before any run folder is made


def test_cli_unknown_plugin_exit_2(pgd_registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(pgd_registry, ["attack", "-p", "nope"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        "Error: unknown attack plugin 'nope' (available: pgd)"]


def test_cli_failed_plugin_by_name_exit_1(cli_registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(cli_registry, ["attack", "-p", "broken"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith('Error: plugin "broken" (distribution mmsec-broken 0.3.1) failed')


def test_cli_unexpected_exception_is_one_line_exit_1(cli_registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(cli_registry, ["attack", "-p", "exploding"])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [
        "Error: RuntimeError: kaboom (set MMSEC_DEBUG=1 for the traceback)"]
    assert "Traceback" not in result.output


def test_cli_debug_lets_the_exception_propagate(cli_registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MMSEC_DEBUG", "1")
    with pytest.raises(RuntimeError, match="kaboom"):
        invoke(cli_registry, ["attack", "-p", "exploding"], catch_exceptions=False)
    with pytest.raises(UsageError, match="epz"):
        invoke(cli_registry, ["attack", "-p", "pgd", "-o", "epz", "1"], catch_exceptions=False)


# --------------------------------------------------------------------------- name clashes
IMPOSTOR = """
    from mmsec import Attack, hookimpl

    class FakePGD(Attack):
        name = "pgd"
        description = "not the real pgd"

    @hookimpl
    def register_attacks(register):
        register(FakePGD)
"""


@pytest.mark.parametrize("ep_name", ["aaa-first", "zzz-last"])
def test_a_third_party_plugin_cannot_take_a_builtin_name(site, ep_name, caplog):
    """Whatever the entry-point order, `pgd` stays mmsec's; the impostor is refused the name,
    named with both distributions, and reachable only as DIST:pgd."""
    from mmsec_plugins.pgd import PGD

    site.dist("evil-attacks", "6.6.6", {ep_name: site.module("evil", IMPOSTOR)})
    with caplog.at_level(logging.WARNING, logger="mmsec.plugins"):
        reg = load_plugins()
    assert reg.attack("pgd") is PGD and reg.attack("mmsec:pgd") is PGD
    impostor = reg.attack("evil-attacks:pgd")
    assert impostor is not PGD and impostor.description == "not the real pgd"
    refused = reg.plugins[ep_name].refused
    assert refused and "mmsec" in refused[0] and "evil-attacks:pgd" in refused[0]
    assert any("refused" in r.getMessage() and "evil-attacks" in r.getMessage()
               for r in caplog.records)
    assert reg.provenance("attacks", PGD)["distribution"] == "mmsec"
    assert reg.provenance("attacks", impostor)["distribution"] == "evil-attacks"
    assert reg.provenance("attacks", impostor)["version"] == "6.6.6"


def test_results_record_every_plugin_used_with_its_distribution(site, tmp_path):
    site.dist("evil-attacks", "6.6.6", {"evil": site.module("evil2", IMPOSTOR)})
    reset_registry(load_plugins())
    try:
        r = CliRunner().invoke(main, ["attack", "-p", "pgd", "-o", "steps", "1", "--limit", "20",
                                      "--knn-bank", "0", "--out", str(tmp_path / "a"), "--json"])
        assert r.exit_code == 0, r.output
        used = {(p["kind"], p["qualified"]): p for p in json.loads(r.stdout)["plugins"]}
        assert used["attack", "mmsec:pgd"]["distribution"] == "mmsec"
        assert ("dataset", "mmsec:procedural") in used and ("model", "mmsec:zoo") in used
        assert ("metric", "mmsec:zero_shot") in used
        r = CliRunner().invoke(main, ["attack", "-p", "evil-attacks:pgd", "--limit", "20",
                                      "--knn-bank", "0", "--out", str(tmp_path / "b"), "--json"])
        assert r.exit_code != 0  # the impostor has no fit: it fails, named, never as pgd
        assert "evil-attacks" in r.output and "fit" in r.output
    finally:
        reset_registry(None)


def test_entry_point_named_like_the_host_does_not_disable_builtins(site):
    site.dist("evil", "1.0", {"mmsec": site.module("evil", GOOD_PLUGIN)})
    reg = load_plugins(selection="mmsec")
    assert reg.plugins["mmsec"].error is None and reg.plugins["mmsec"].builtin
    assert "procedural" in reg.datasets


def test_duplicate_entry_point_name_is_reported(site, caplog):
    site.dist("mmsec-alpha", "1.0", {"good": site.module("alpha", GOOD_PLUGIN)})
    site.dist("mmsec-beta", "1.0", {"good": site.module("beta", GOOD_PLUGIN)})
    with caplog.at_level(logging.WARNING, logger="mmsec.plugins"):
        load_plugins(selection="good")
    assert "mmsec-alpha" in caplog.text and "mmsec-beta" in caplog.text
