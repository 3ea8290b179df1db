"""The defense contract: options and ``apply(model, data, run) -> model``.

A defense plugin subclasses :class:`Defense`, declares its ``Options`` (defaults
= the paper's values) and implements ``apply``: it receives a ``ClipModel``, a
small clean ``ImageDataset`` and the run context, and returns the repaired
(or wrapped) ``ClipModel``. What it finds along the way (an inverted trigger,
a target ranking, a detector) goes into the run: ``run.metrics``,
``run.save_tensors``, ``run.save_image``, ``run.add_section``.
"""

from __future__ import annotations

from .attacks import _Configurable


class Defense(_Configurable):
    """Base class of defense plugins (see the module docstring)."""

    def apply(self, model, data, run):  # pragma: no cover - abstract
        raise NotImplementedError
