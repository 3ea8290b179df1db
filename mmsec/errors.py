"""Exceptions that the CLI turns into one clear line (no traceback)."""

#: control characters (a newline in an option name, a NUL in a path) shown escaped
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(32), 127)} | {10: "\\n", 13: "\\r", 9: "\\t"}


def one_line(text: str) -> str:
    """``text`` with control characters escaped, so an error is always one line."""
    return text.translate(_CONTROL)


class MmsecError(Exception):
    """A user-facing runtime error: bad file, bad checkpoint, failing plugin (exit 1)."""

    exit_code = 1


class UsageError(MmsecError):
    """A user-facing usage error: unknown option, unknown plugin, bad recipe (exit 2)."""

    exit_code = 2


class PluginError(MmsecError):
    """A plugin failed to import or raised; the message names the plugin and its distribution."""
