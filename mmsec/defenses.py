"""The defense contract: options and ``apply(model, data, run) -> model``.

A defense plugin subclasses :class:`Defense`, declares its ``Options`` (defaults = the
paper's values) and implements ``apply``: it receives a ``ClipModel``, a small clean
``ImageDataset`` and the run context, and returns the repaired (or wrapped) ``ClipModel``.
What it finds along the way (an inverted trigger, a target ranking, a detector) goes into
the run: ``run.metrics``, ``run.save_tensors``, ``run.save_image``, ``run.add_section``.
Another plugin it needs (InverTune simulates a universal attack) runs in a child run:
``run.fit_attack(name, model, data, options)``.
"""

from __future__ import annotations

from .base import Plugin
from .errors import MmsecError

__all__ = ["Defense"]


class Defense(Plugin):
    """Base class of defense plugins (see the module docstring)."""

    def apply(self, model, data, run):  # pragma: no cover - abstract
        raise NotImplementedError

    def run_apply(self, model, data, run):
        """``apply`` with the input model's state owned by the host (eval mode, restored)."""
        from .model import ClipModel

        with self.model_state(model):
            out = self.apply(model, data, run)
        if not isinstance(out, ClipModel):
            raise MmsecError(f'plugin "{self.name}": apply returned {type(out).__name__}, not '
                             "a ClipModel")
        out.eval()
        return out
