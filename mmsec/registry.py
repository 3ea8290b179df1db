"""The plugin manager: built-ins and entry points, loaded the same way, failures named.

Plugins are modules with hook implementations (see ``mmsec.hookspecs``). They
come from two places:

- mmsec's own default plugin (``mmsec.builtins``: the data sources, model
  sources and metrics of the host), always loaded;
- every entry point in the group ``mmsec`` -- the built-in attacks and defenses
  under ``plugins/`` are registered there exactly like a third party's.

``MMSEC_LOAD_PLUGINS`` restricts the entry points: a comma-separated list of
plugin (entry-point) names, or empty for none. A plugin that fails to import,
declares a misspelt hook, or raises inside a hook is reported by name and
distribution; the others keep working.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError, UsageError
from .evaluation.views import Metric

log = logging.getLogger("mmsec.plugins")

GROUP = "mmsec"
DEFAULT_PLUGINS = ("mmsec.default_plugins",)
KINDS = ("attacks", "defenses", "datasets", "models", "metrics", "commands")


@dataclass
class PluginInfo:
    """One loaded (or failed) plugin: its name, where it comes from and what it registered."""

    name: str
    module: str
    distribution: str | None = None
    version: str | None = None
    builtin: bool = False
    items: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        kinds = sorted({k[:-1] for k, v in self.items.items() if v})
        return {"name": self.name, "kinds": kinds, "items": {k: v for k, v in self.items.items()
                                                            if v},
                "module": self.module, "distribution": self.distribution,
                "version": self.version, "builtin": self.builtin, "error": self.error}


class Registry:
    """What the loaded plugins registered, by kind and name."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.attacks: dict[str, type] = {}
        self.defenses: dict[str, type] = {}
        self.datasets: dict[str, Any] = {}
        self.models: dict[str, Any] = {}
        self.metrics: dict[str, Metric] = {}
        self.owner: dict[tuple[str, str], str] = {}

    # ------------------------------------------------------------------ loading
    def add_plugin(self, module: ModuleType | object, info: PluginInfo) -> bool:
        """Register one plugin module; on a bad hook, record the error and leave it out."""
        try:
            self.pm.register(module, name=info.name)
            self.pm.check_pending()
        except Exception as exc:  # pluggy raises PluginValidationError / ValueError
            if self.pm.is_registered(module):
                self.pm.unregister(module)
            info.error = f"{type(exc).__name__}: {exc}"
            log.warning('Error loading plugin "%s"%s: %s', info.name, _dist_note(info), info.error)
            self.plugins[info.name] = info
            return False
        self.plugins[info.name] = info
        return True

    def collect(self) -> None:
        """Call every plugin's register hooks, one plugin at a time.

        A plugin's items are staged and committed only when all its hooks succeed, so a
        plugin that raises (and is reported by name) leaves nothing half-registered.
        """
        impls = {kind: {i.plugin_name: i for i in
                        getattr(self.pm.hook, f"register_{kind}").get_hookimpls()}
                 for kind in KINDS[:-1]}
        for name, info in list(self.plugins.items()):
            if info.error or not self.pm.has_plugin(name):
                continue
            staged: list[tuple[str, Any]] = []
            hook = ""
            try:
                for kind in KINDS[:-1]:
                    hook = f"register_{kind}"
                    impl = impls[kind].get(name)
                    if impl is None:
                        continue
                    if impl.hookwrapper or impl.wrapper:
                        raise TypeError(f"register_{kind} must be a plain hook, not a wrapper")
                    stage = self._stager(kind, staged)
                    impl.function(**{arg: stage for arg in impl.argnames})
            except Exception as exc:  # a third-party hook may raise anything
                info.error = f"{hook} raised {type(exc).__name__}: {exc}"
                log.warning('Error in plugin "%s"%s: %s', info.name, _dist_note(info), info.error)
                continue
            for kind, item in staged:
                self._commit(kind, item, info)

    def _stager(self, kind: str, staged: list[tuple[str, Any]]):
        def register(item: Any, function: Any = None, description: str = "") -> None:
            if kind == "metrics" and not isinstance(item, Metric):
                if not callable(function):
                    raise TypeError(f"metric {item!r} registered without a callable function")
                item = Metric(str(item), function, description)
            name = getattr(item, "name", None)
            if not isinstance(name, str) or not name:
                raise TypeError(f"{kind[:-1]} registered without a string `name`: {item!r}")
            if kind in ("attacks", "defenses"):
                _check_plugin_class(item, kind)
            staged.append((kind, item))

        return register

    def _commit(self, kind: str, item: Any, info: PluginInfo) -> None:
        table = getattr(self, kind)
        name = item.name
        if name in table:
            log.warning('plugin "%s" registers %s "%s" already registered by "%s"; keeping '
                        "the first", info.name, kind[:-1], name, self.owner[(kind, name)])
            return
        if kind in ("datasets", "metrics", "models") and getattr(item, "plugin", None) != info.name:
            try:
                item = dataclasses.replace(item, plugin=info.name)
            except TypeError:
                pass
        table[name] = item
        self.owner[(kind, name)] = info.name
        info.items.setdefault(kind, []).append(name)

    def add_commands(self, cli: Any) -> None:
        for impl in self.pm.hook.register_commands.get_hookimpls():
            info = self.plugins[impl.plugin_name]
            if info.error:
                continue
            try:
                before = set(getattr(cli, "commands", {}))
                impl.function(cli=cli)
                info.items.setdefault("commands", []).extend(
                    sorted(set(getattr(cli, "commands", {})) - before))
            except Exception as exc:  # a third-party hook may raise anything
                info.error = f"register_commands raised {type(exc).__name__}: {exc}"
                log.warning('Error in plugin "%s"%s: %s', info.name, _dist_note(info), info.error)

    # ------------------------------------------------------------------ lookups
    def attack(self, name: str) -> type:
        return self._get("attacks", name)

    def defense(self, name: str) -> type:
        return self._get("defenses", name)

    def _get(self, kind: str, name: str) -> type:
        table = getattr(self, kind)
        if name in table:
            return table[name]
        failed = [p for p in self.plugins.values() if p.error and p.name == name]
        if failed:
            raise PluginError(f'plugin "{name}"{_dist_note(failed[0])} failed to load: '
                              f"{failed[0].error}")
        known = ", ".join(sorted(table)) or "none"
        broken = [p.name for p in self.failures()]
        note = (f"; {len(broken)} plugin(s) failed to load ({', '.join(broken)}): see "
                "`mmsec plugins`") if broken else ""
        raise UsageError(f"unknown {kind[:-1]} plugin {name!r} (available: {known}){note}")

    def failures(self) -> list[PluginInfo]:
        return [p for p in self.plugins.values() if p.error]

    def attack_for(self, artifact: Any):
        """An instance of the attack plugin that made ``artifact``, with the artifact's options."""
        return self.attack(artifact.plugin)(artifact.options)

    def metric_list(self) -> list[Metric]:
        """Every registered probe (the built-in ones first)."""
        return list(self.metrics.values())

    def load_model(self, model: str | None = None, pretrained: str | None = None, **kwargs: Any):
        """``mmsec.model.load_model`` through the registered model sources (``-m``)."""
        from .model import load_model

        return load_model(model, pretrained, sources=self.models, **kwargs)

    def load_dataset(self, spec: str | None, **kwargs: Any):
        """``mmsec.data.load_dataset`` through the registered data sources (``-d``)."""
        from .data import load_dataset

        return load_dataset(spec, sources=self.datasets, **kwargs)


def _dist_note(info: PluginInfo) -> str:
    if info.distribution:
        return f" (distribution {info.distribution} {info.version or ''})".replace(" )", ")")
    return ""


def _check_plugin_class(cls: Any, kind: str) -> None:
    from .attacks import Attack
    from .defenses import Defense

    base = Attack if kind == "attacks" else Defense
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"{kind[:-1]} {getattr(cls, 'name', cls)!r} must subclass "
                        f"mmsec.{base.__name__}")


def load_plugins(selection: str | None = None) -> Registry:
    """Build a registry from the default plugins and the selected entry points.

    ``selection`` overrides ``MMSEC_LOAD_PLUGINS`` (None: read the variable; unset means all).
    """
    reg = Registry()
    for modname in DEFAULT_PLUGINS:
        reg.add_plugin(importlib.import_module(modname),
                       PluginInfo(name="mmsec", module=modname, distribution="mmsec",
                                  version=_version("mmsec"), builtin=True))
    if selection is None:
        selection = os.environ.get("MMSEC_LOAD_PLUGINS")
    wanted = None if selection is None else {s.strip() for s in selection.split(",") if s.strip()}
    seen: set[str] = set()
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        if wanted is not None and ep.name not in wanted:
            continue
        dist = getattr(ep, "dist", None)
        info = PluginInfo(name=ep.name, module=ep.value,
                          distribution=dist.name if dist else None,
                          version=dist.version if dist else None,
                          builtin=dist is not None and dist.name == "mmsec")
        if ep.name in reg.plugins:  # a name clash: never replace what is loaded
            first = reg.plugins[ep.name]
            info.error = (f'plugin name "{ep.name}" is already taken by {first.module}'
                          f"{_dist_note(first)}")
            log.warning('Plugin "%s"%s not loaded: %s', ep.name, _dist_note(info), info.error)
            reg.plugins[f"{ep.name} ({info.distribution or ep.value})"] = info
            continue
        seen.add(ep.name)
        try:
            module = ep.load()
        except Exception as exc:  # any import-time failure of a third-party module
            info.error = f"import failed: {type(exc).__name__}: {exc}"
            log.warning('Error importing plugin "%s"%s: %s', ep.name, _dist_note(info),
                        info.error)
            reg.plugins[ep.name] = info
            continue
        reg.add_plugin(module, info)
    if wanted:
        for missing in sorted(wanted - seen):
            log.warning('MMSEC_LOAD_PLUGINS names "%s", but no installed plugin has that name',
                        missing)
    reg.collect()
    return reg


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry (loaded on first use)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load_plugins()
    return _REGISTRY


def reset_registry(registry: Registry | None = None) -> None:
    """Drop (or replace) the process-wide registry; tests use this."""
    global _REGISTRY
    _REGISTRY = registry
