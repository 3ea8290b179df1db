"""Exceptions that the CLI turns into one clear line (no traceback)."""


class MmsecError(Exception):
    """A user-facing runtime error: bad file, bad checkpoint, failing plugin (exit 1)."""

    exit_code = 1


class UsageError(MmsecError):
    """A user-facing usage error: unknown option, unknown plugin, bad recipe (exit 2)."""

    exit_code = 2


class PluginError(MmsecError):
    """A plugin failed to import or raised; the message names the plugin and its distribution."""
