"""The plugin manager: built-ins and entry points, loaded the same way, failures named.

Plugins are modules with hook implementations (see ``mmsec.hookspecs``). They come from two
places:

- mmsec's own default plugin (``mmsec.default_plugins``: the data sources, model sources
  and metrics of the host), always loaded;
- every entry point in the group ``mmsec``: the built-in attacks and defenses under
  ``plugins/`` are registered there exactly like a third party's, and load first.

Names cannot be hijacked. Everything registered has a qualified name ``DIST:NAME`` (its
distribution, e.g. ``mmsec:pgd``); the bare name ``NAME`` means the built-in when mmsec has
one, else the only plugin that registers it. A third-party plugin that registers a
built-in's name is refused that name (a load error names both distributions; its item stays
reachable as ``DIST:NAME``); two third-party plugins with the same name leave the bare name
ambiguous, and using it is an error that lists the qualified names.

A plugin declares the plugin API it was written for (``mmsec_api_version = 2`` in its
module); a plugin for another version is reported and skipped. ``MMSEC_LOAD_PLUGINS``
restricts the entry points (a comma-separated list of plugin names, or empty for none);
``MMSEC_TRACE_PLUGINS=1`` logs every hook call with its plugin. A plugin that fails to
import, declares a misspelt hook, or raises inside a hook is reported by name and
distribution; the others keep working.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
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
API_VERSION = 2
DEFAULT_PLUGINS = ("mmsec.default_plugins",)
KINDS = ("attacks", "defenses", "datasets", "models", "metrics", "commands")

__all__ = ["API_VERSION", "GROUP", "KINDS", "PluginInfo", "Registry", "get_registry",
           "load_plugins", "normalize_dist", "reset_registry"]


def normalize_dist(name: str) -> str:
    """A distribution name as it appears in qualified plugin names (PEP 503, lower-case)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def tracing() -> bool:
    return os.environ.get("MMSEC_TRACE_PLUGINS", "") not in ("", "0")


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
    #: names this plugin registered that it was refused (a built-in's, or ambiguous)
    refused: list[str] = field(default_factory=list)

    @property
    def dist(self) -> str:
        """The qualifier of this plugin's items: its normalised distribution, else its name."""
        return normalize_dist(self.distribution) if self.distribution else self.name

    def as_dict(self) -> dict[str, Any]:
        kinds = sorted({k[:-1] for k, v in self.items.items() if v})
        return {"name": self.name, "kinds": kinds,
                "items": {k: v for k, v in self.items.items() if v},
                "module": self.module, "distribution": self.distribution,
                "version": self.version, "builtin": self.builtin, "error": self.error,
                "refused": list(self.refused)}


class Registry:
    """What the loaded plugins registered, by kind and name (bare and qualified)."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        # bare name -> item, per kind
        self.attacks: dict[str, type] = {}
        self.defenses: dict[str, type] = {}
        self.datasets: dict[str, Any] = {}
        self.models: dict[str, Any] = {}
        self.metrics: dict[str, Metric] = {}
        #: ``DIST:NAME`` -> item, per kind
        self.qualified: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
        #: bare names registered by several third-party plugins -> their qualified names
        self.ambiguous: dict[str, dict[str, list[str]]] = {k: {} for k in KINDS}
        #: (kind, bare or qualified name) -> plugin name
        self.owner: dict[tuple[str, str], str] = {}

    # ------------------------------------------------------------------ loading
    def add_plugin(self, module: ModuleType | object, info: PluginInfo) -> bool:
        """Register one plugin module; on a bad hook or API version, record the error and
        leave it out."""
        declared = getattr(module, "mmsec_api_version", None)
        if declared != API_VERSION:
            wrote = (f"declares mmsec_api_version = {declared!r}" if declared is not None else
                     "declares no mmsec_api_version (a plugin for mmsec 0.1, API 1)")
            info.error = (f"written for another plugin API: it {wrote}; this mmsec provides "
                          f"API {API_VERSION} (see docs/api.md)")
            log.warning('Plugin "%s"%s skipped: %s', info.name, _dist_note(info), info.error)
            self.plugins[info.name] = info
            return False
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
        """Call every plugin's register hooks, one plugin at a time, built-ins first.

        A plugin's items are staged and committed only when all its hooks succeed, so a
        plugin that raises (and is reported by name, with what was not registered) leaves
        nothing half-registered.
        """
        impls = {kind: {i.plugin_name: i for i in
                        getattr(self.pm.hook, f"register_{kind}").get_hookimpls()}
                 for kind in KINDS[:-1]}
        order = sorted(self.plugins.values(), key=lambda p: not p.builtin)
        for info in order:
            name = info.name
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
                    if tracing():
                        log.info('trace: plugin "%s" %s', name, hook)
                    impl.function(**{arg: stage for arg in impl.argnames})
            except (Exception, SystemExit) as exc:  # a third-party hook may raise anything
                dropped = ", ".join(f"{k[:-1]} {getattr(i, 'name', i)}" for k, i in staged)
                info.error = (f"{hook} raised {_describe(exc)}; nothing of this "
                              f"plugin is registered"
                              + (f" (dropped: {dropped})" if dropped else ""))
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
            if not isinstance(name, str) or not name or ":" in name:
                raise TypeError(f"{kind[:-1]} registered without a valid `name` (a non-empty "
                                f"string without ':'): {item!r}")
            if kind in ("attacks", "defenses"):
                _check_plugin_class(item, kind)
            staged.append((kind, item))

        return register

    def _commit(self, kind: str, item: Any, info: PluginInfo) -> None:
        table = getattr(self, kind)
        name = item.name
        if kind in ("datasets", "metrics", "models") and getattr(item, "plugin", None) != info.name:
            try:
                item = dataclasses.replace(item, plugin=info.name)
            except TypeError:
                pass
        qname = f"{info.dist}:{name}"
        if qname in self.qualified[kind]:
            info.refused.append(f"{kind[:-1]} {qname} (registered twice)")
            return
        self.qualified[kind][qname] = item
        self.owner[(kind, qname)] = info.name
        info.items.setdefault(kind, []).append(name)
        if name in self.ambiguous[kind]:
            self.ambiguous[kind][name].append(qname)
            return
        if name not in table:
            table[name] = item
            self.owner[(kind, name)] = info.name
            return
        first = self.plugins[self.owner[(kind, name)]]
        if first.builtin:  # a built-in keeps its name
            note = (f'{kind[:-1]} "{name}" is a built-in of {first.dist}: the name stays '
                    f"mmsec's; this plugin's is {qname}")
            info.refused.append(note)
            log.warning('Plugin "%s"%s refused the name %s', info.name, _dist_note(info), note)
            return
        # two third-party plugins: the bare name means neither
        del table[name]
        del self.owner[(kind, name)]
        self.ambiguous[kind][name] = [f"{first.dist}:{name}", qname]
        for p in (first, info):
            p.refused.append(f'{kind[:-1]} "{name}" is ambiguous: use '
                             f"{first.dist}:{name} or {qname}")
        log.warning('%s "%s" is registered by %s and %s: use %s:%s or %s', kind[:-1], name,
                    first.dist, info.dist, first.dist, name, qname)

    def add_commands(self, cli: Any) -> None:
        for impl in self.pm.hook.register_commands.get_hookimpls():
            info = self.plugins[impl.plugin_name]
            if info.error:
                continue
            try:
                before = set(getattr(cli, "commands", {}))
                if tracing():
                    log.info('trace: plugin "%s" register_commands', info.name)
                impl.function(cli=cli)
                info.items.setdefault("commands", []).extend(
                    sorted(set(getattr(cli, "commands", {})) - before))
            except (Exception, SystemExit) as exc:  # a third-party hook may raise anything
                info.error = f"register_commands raised {_describe(exc)}"
                log.warning('Error in plugin "%s"%s: %s', info.name, _dist_note(info), info.error)

    # ------------------------------------------------------------------ lookups
    def attack(self, name: str) -> type:
        """The attack class ``name`` (``NAME`` or ``DIST:NAME``)."""
        return self._get("attacks", name)

    def defense(self, name: str) -> type:
        """The defense class ``name`` (``NAME`` or ``DIST:NAME``)."""
        return self._get("defenses", name)

    def _get(self, kind: str, name: str) -> Any:
        table = getattr(self, kind)
        if ":" in name:
            dist, _, bare = name.partition(":")
            qname = f"{normalize_dist(dist)}:{bare}"
            if qname in self.qualified[kind]:
                return self.qualified[kind][qname]
        elif name in table:
            return table[name]
        elif name in self.ambiguous[kind]:
            raise UsageError(f"{kind[:-1]} plugin {name!r} is registered by several plugins: "
                             f"choose one with -p {' or -p '.join(self.ambiguous[kind][name])}")
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

    def info_of(self, kind: str, item: Any) -> PluginInfo | None:
        """The plugin that registered ``item`` (a class or registered object) of ``kind``."""
        for (k, key), owner in self.owner.items():
            if k == kind and ":" in key and self.qualified[kind].get(key) is item:
                return self.plugins.get(owner)
        return None

    def provenance(self, kind: str, item: Any) -> dict[str, Any]:
        """``{kind, name, qualified, plugin, distribution, version}`` of a registered item:
        what results.json records for every plugin a run used."""
        info = self.info_of(kind, item)
        name = getattr(item, "name", str(item))
        version = getattr(item, "version", None) if isinstance(item, type) else None
        return {"kind": kind[:-1], "name": name,
                "qualified": f"{info.dist}:{name}" if info else name,
                "plugin": info.name if info else None,
                "distribution": info.distribution if info else None,
                "version": version or (info.version if info else None)}

    def attack_for(self, artifact: Any):
        """An instance of the attack plugin that made ``artifact``, with the artifact's options."""
        return self.attack(artifact.plugin)(artifact.options)

    def metric_list(self) -> list[Metric]:
        """Every registered probe (the built-in ones first)."""
        return list(self.metrics.values())

    def load_model(self, model: str | None = None, pretrained: str | None = None, **kwargs: Any):
        """``mmsec.model.load_model`` through the registered model sources (``-m``); a saved
        input-transform defense is rebuilt with its registered defense plugin."""
        from .model import load_model

        return load_model(model, pretrained, sources=self.models, defenses=self.defense,
                          **kwargs)

    def load_dataset(self, spec: str | None, **kwargs: Any):
        """``mmsec.data.load_dataset`` through the registered data sources (``-d``)."""
        from .data import load_dataset

        return load_dataset(spec, sources=self.datasets, **kwargs)


def _describe(exc: BaseException) -> str:
    """``Type: message``; ``sys.exit(3)`` in a plugin reads as what it is."""
    if isinstance(exc, SystemExit):
        return f"SystemExit (called sys.exit({exc.code!r}))"
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _dist_note(info: PluginInfo) -> str:
    if info.distribution:
        return f" (distribution {info.distribution} {info.version or ''})".replace(" )", ")")
    return ""


def _check_plugin_class(cls: Any, kind: str) -> None:
    """An attack or defense class: the right base class, and option defaults that pass its
    own validation (a default of the wrong type is the plugin's bug, found at load)."""
    from pydantic import ValidationError

    from .attacks import Attack
    from .defenses import Defense
    from .options import format_validation_error

    base = Attack if kind == "attacks" else Defense
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"{kind[:-1]} {getattr(cls, 'name', cls)!r} must subclass "
                        f"mmsec.{base.__name__}")
    try:
        cls.Options()
    except ValidationError as err:
        bad = [e for e in err.errors() if e["type"] != "missing"]
        if bad:
            text = format_validation_error(err, f"{kind[:-1]} {cls.name!r}: invalid default")
            raise TypeError(text) from None


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

    def is_builtin(ep) -> bool:
        dist = getattr(ep, "dist", None)
        return dist is not None and normalize_dist(dist.name) == "mmsec"

    # mmsec's own entry points first: no third-party plugin can take their names
    for ep in sorted(entry_points(group=GROUP), key=lambda e: (not is_builtin(e), e.name)):
        if wanted is not None and ep.name not in wanted:
            continue
        dist = getattr(ep, "dist", None)
        info = PluginInfo(name=ep.name, module=ep.value,
                          distribution=dist.name if dist else None,
                          version=dist.version if dist else None,
                          builtin=is_builtin(ep))
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
        except (Exception, SystemExit) as exc:  # any import-time failure, sys.exit() too
            info.error = f"import failed: {_describe(exc)}"
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
