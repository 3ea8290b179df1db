"""Test helpers for plugin authors: a registry with your plugin, a tiny model and data, a run.

A plugin's tests use these instead of mmsec's internals. In ``tests/conftest.py``::

    pytest_plugins = ["mmsec.testing"]

then, in a test::

    import my_plugin

    def test_fit(mmsec_registry, tiny_model, tiny_data, run_context):
        registry = mmsec_registry(my_plugin)           # mmsec's built-ins + your plugin
        attack = registry.attack("my-attack")({"eps": "4/255"})
        artifact = attack.fit(tiny_model, tiny_data, run_context)
        ...

The fixtures keep tests hermetic: a fresh embedding cache per test session, no progress
bars, one torch thread (tiny models on busy machines), the process-wide registry restored
after each test, installed third-party plugins never loaded unless asked for.

Plain functions (usable without pytest): :func:`make_registry`, :func:`use_registry`,
:func:`run_context`, :func:`tiny_model`, :func:`tiny_data`, :func:`invoke`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

__all__ = ["hook_module", "invoke", "make_registry", "run_context", "tiny_data", "tiny_model",
           "use_registry"]


def hook_module(name: str, **hooks: Any) -> ModuleType:
    """A plugin module made in memory: ``hook_module("p", register_attacks=fn)`` has ``fn``
    as a hook implementation and declares this mmsec's plugin API version."""
    from .hookspecs import hookimpl
    from .registry import API_VERSION

    module = ModuleType(name)
    module.mmsec_api_version = API_VERSION
    for hook, fn in hooks.items():
        setattr(module, hook, hookimpl(fn))
    return module


def make_registry(*modules: ModuleType, builtins: bool | Iterable[str] = True):
    """A registry with mmsec's default plugin, mmsec's built-in attack/defense plugins
    (``builtins``: all, none, or these names) and ``modules`` (your plugins: named and
    versioned by their installed entry point, else after their module)."""
    from importlib.metadata import distribution, entry_points

    from . import default_plugins
    from .registry import GROUP, PluginInfo, Registry

    reg = Registry()
    reg.add_plugin(default_plugins, PluginInfo(name="mmsec", module="mmsec.default_plugins",
                                               distribution="mmsec", builtin=True))
    if builtins:
        wanted = None if builtins is True else set(builtins)
        dist = distribution("mmsec")
        for ep in dist.entry_points:
            if ep.group == GROUP and (wanted is None or ep.name in wanted):
                reg.add_plugin(ep.load(), PluginInfo(name=ep.name, module=ep.value,
                                                     distribution="mmsec",
                                                     version=dist.version, builtin=True))
    installed = {ep.value: ep for ep in entry_points(group=GROUP)}
    for module in modules:
        ep = installed.get(module.__name__)
        dist = getattr(ep, "dist", None)
        if ep is not None:  # installed: named and versioned as mmsec will see it
            info = PluginInfo(name=ep.name, module=module.__name__,
                              distribution=dist.name if dist else None,
                              version=dist.version if dist else None)
        else:
            info = PluginInfo(name=module.__name__.split(".")[0], module=module.__name__)
        reg.add_plugin(module, info)
    reg.collect()
    return reg


@contextlib.contextmanager
def use_registry(registry) -> Iterator[Any]:
    """Make ``registry`` the process-wide one (what ``mmsec.api`` and the CLI see) for the
    block, then restore the previous one."""
    from . import registry as registry_module

    saved = registry_module._REGISTRY
    registry_module.reset_registry(registry)
    try:
        yield registry
    finally:
        registry_module.reset_registry(saved)


@contextlib.contextmanager
def run_context(path: str | Path, kind: str = "attack", plugin: str = "test", *, seed: int = 0,
                registry: Any = None, inputs: Any = None, resume: bool = False):
    """A :class:`mmsec.RunContext` on a run folder at ``path`` (CPU), closed afterwards."""
    from .context import RunContext
    from .runs import Run

    if registry is None:
        from .registry import get_registry

        registry = get_registry()
    with Run.create(path, kind, plugin, resume=resume, quiet=True) as run:
        yield RunContext(run, device="cpu", seed=seed, registry=registry, inputs=inputs)


@functools.lru_cache(maxsize=1)
def tiny_model():
    """The embedded zoo:shapes model (97.75% zero-shot, 32 px) on the CPU, loaded once."""
    from .model import load_model

    return load_model(device="cpu")


@functools.lru_cache(maxsize=8)
def tiny_data(split: str = "train", n: int = 256):
    """``n`` procedural shapes of ``split`` (10 classes, captions, 32 px), made once."""
    from .data import procedural_shapes

    return procedural_shapes(split=split, n=n)


def invoke(*args: Any):
    """Run the ``mmsec`` command line in-process; returns click's ``Result`` (``exit_code``,
    ``stdout``, ``stderr``)."""
    from click.testing import CliRunner

    from .cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


# ---------------------------------------------------------------------- pytest fixtures
try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only needed to use the fixtures
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="session", autouse=True)
    def _mmsec_hermetic(tmp_path_factory):
        """A fresh cache folder and user zoo for the session, no progress bars, one torch
        thread."""
        keys = ("MMSEC_CACHE_DIR", "MMSEC_PROGRESS", "MMSEC_ZOO")
        old = {k: os.environ.get(k) for k in keys}
        os.environ["MMSEC_CACHE_DIR"] = str(tmp_path_factory.mktemp("mmsec-cache"))
        os.environ["MMSEC_PROGRESS"] = "0"
        os.environ["MMSEC_ZOO"] = str(tmp_path_factory.mktemp("mmsec-zoo"))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    @pytest.fixture
    def mmsec_registry():
        """``mmsec_registry(*modules, builtins=True)``: a registry with mmsec's built-ins and
        your plugin modules, installed process-wide for the test."""
        stack = contextlib.ExitStack()

        def make(*modules: ModuleType, builtins: bool | Iterable[str] = True):
            return stack.enter_context(use_registry(make_registry(*modules,
                                                                  builtins=builtins)))

        with stack:
            yield make

    @pytest.fixture(scope="session", name="tiny_model")
    def _tiny_model_fixture():
        """The embedded zoo:shapes model on the CPU."""
        return tiny_model()

    @pytest.fixture(scope="session", name="tiny_data")
    def _tiny_data_fixture():
        """256 procedural training shapes (10 classes, captions, 32 px)."""
        return tiny_data("train", 256)

    @pytest.fixture(name="run_context")
    def _run_context_fixture(tmp_path):
        """A RunContext on ``tmp_path / "run"`` with the current registry."""
        with run_context(tmp_path / "run") as ctx:
            yield ctx
