"""Hook specifications of mmsec (pluggy project name "mmsec").

Each hook receives a ``register`` callback, so the host owns names, clashes and
errors. See docs/plugins.md for the contract of what is registered.
"""

import pluggy

hookspec = pluggy.HookspecMarker("mmsec")
hookimpl = pluggy.HookimplMarker("mmsec")


@hookspec
def register_attacks(register):
    """Register attack classes: ``register(AttackClass)``."""


@hookspec
def register_defenses(register):
    """Register defense classes: ``register(DefenseClass)``."""


@hookspec
def register_datasets(register):
    """Register data sources: ``register(DatasetSource(name, factory, description))``."""


@hookspec
def register_models(register):
    """Register model sources that ``-m`` resolves: ``register(ModelSource(name, list_fn,
    description, load=..., prefix=...))``."""


@hookspec
def register_metrics(register):
    """Register probes that every evaluation runs: ``register(Metric(name, fn, description,
    relative=...))`` or ``register(name, fn, description)``; ``fn(view) -> {metric: value}``."""


@hookspec
def register_commands(cli):
    """Add click commands to the ``mmsec`` command group."""
