"""What every attack and defense plugin shares: a name, validated options, model state.

The host owns the victim's state around a plugin's work (torchattacks' ``Attack.__call__``
does the same): :meth:`Plugin.model_state` puts the model in eval mode for the duration of
a call and restores its mode and ``requires_grad`` flags afterwards, whatever the plugin did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from torch import nn

from .options import Options, validate_options

__all__ = ["Plugin"]


class Plugin:
    """Base of :class:`~mmsec.Attack` and :class:`~mmsec.Defense`.

    Subclasses set ``name`` (what users type), ``description`` (one line), optionally
    ``version`` (default: the version of the distribution that registered the plugin) and
    declare ``class Options(mmsec.Options)`` whose defaults are the paper's values.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    version: ClassVar[str | None] = None

    class Options(Options):
        pass

    def __init__(self, options: Mapping[str, Any] | Options | None = None) -> None:
        self.options = validate_options(self.Options, options or {}, owner=f'plugin "{self.name}"')

    def options_dict(self) -> dict[str, Any]:
        """The validated options as JSON data (what artifacts and results.json record)."""
        return self.options.model_dump(mode="json")

    @staticmethod
    @contextlib.contextmanager
    def model_state(*modules: nn.Module | None) -> Iterator[None]:
        """Eval mode for ``modules`` during the block; their train/eval modes and
        ``requires_grad`` flags are restored afterwards."""
        saved = []
        for m in modules:
            if m is None:
                continue
            saved.append((m, [(s, s.training) for s in m.modules()],
                          [(p, p.requires_grad) for p in m.parameters()]))
            m.eval()
        try:
            yield
        finally:
            for _m, modes, grads in saved:
                for sub, mode in modes:
                    sub.training = mode
                for p, flag in grads:
                    p.requires_grad_(flag)
