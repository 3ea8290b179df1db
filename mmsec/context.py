"""RunContext: the one object every plugin receives as ``run``.

It is the run folder (``mmsec.runs.Run``: ``log``, ``progress``, ``timer``,
``save_tensors``, ``save_image``, ``add_section``, ``metrics``, checkpoints and
``resume``) plus what a plugin needs around it: ``device``, ``precision``,
``seed``, the shared ``cache`` (EmbeddingCache), ``strict``, and the
``registry`` of the other plugins (InverTune, for instance, asks for a
universal attack to simulate one).
"""

from __future__ import annotations

from typing import Any

import torch

from .cache import EmbeddingCache
from .runs import Run


class RunContext:
    """A run folder plus device, precision, seed, cache and the other plugins."""

    def __init__(self, run: Run, *, device: torch.device, precision: str = "fp32", seed: int = 0,
                 cache: EmbeddingCache | None = None, registry: Any = None,
                 strict: bool = False) -> None:
        self.run = run
        self.device = device
        self.precision = precision
        self.seed = seed
        self.cache = cache if cache is not None else EmbeddingCache()
        self.registry = registry
        self.strict = strict

    def __getattr__(self, name: str) -> Any:
        # Everything else (log, progress, timer, save_*, metrics, resume...) is the Run's.
        if name == "run":
            raise AttributeError(name)
        return getattr(self.run, name)

    def attack(self, name: str, options: dict | None = None):
        """An instance of another registered attack plugin, with validated options."""
        return self.registry.attack(name)(options or {})

    def defense(self, name: str, options: dict | None = None):
        """An instance of another registered defense plugin, with validated options."""
        return self.registry.defense(name)(options or {})

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded from the run seed (plus ``offset``) for reproducible sampling."""
        return torch.Generator().manual_seed(self.seed + offset)
