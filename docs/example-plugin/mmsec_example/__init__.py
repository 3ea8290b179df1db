"""mmsec-example-plugin: a third-party mmsec plugin in one small package.

mmsec finds this module through the entry point ``example = "mmsec_example"``
(group ``mmsec``, see pyproject.toml) and calls the ``@hookimpl`` functions
below: one registers the attack, one adds a CLI command.
"""

from __future__ import annotations

import click
from mmsec import hookimpl

from .patch import NoisePatch

__version__ = "0.1.0"
mmsec_api_version = 2  # the mmsec plugin API this plugin is written for
__all__ = ["NoisePatch", "register_attacks", "register_commands"]


@hookimpl
def register_attacks(register):
    register(NoisePatch)


@hookimpl
def register_commands(cli):
    @cli.command("example-hello")
    @click.option("--name", default="world", show_default=True, help="who to greet")
    def example_hello(name: str) -> None:
        """Say hello from mmsec-example-plugin (shows how a plugin adds a command)."""
        click.echo(f"Hello, {name}! This is mmsec-example-plugin {__version__}; "
                   f"it adds the attack {NoisePatch.name!r}.")
