"""mmsec: a plugin-based security toolkit for CLIP-style vision-language models.

The public API for plugin authors and Python users is re-exported here (lazily,
so ``import mmsec`` stays cheap)::

    from mmsec import Attack, Defense, Artifact, Options, hookimpl
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "hookimpl": "mmsec.hookspecs",
    "Attack": "mmsec.attacks",
    "Artifact": "mmsec.attacks",
    "Defense": "mmsec.defenses",
    "Options": "mmsec.options",
    "ClipModel": "mmsec.model",
    "load_model": "mmsec.model",
    "ImageDataset": "mmsec.data",
    "DatasetSource": "mmsec.data",
    "load_dataset": "mmsec.data",
    "EmbeddingCache": "mmsec.cache",
    "VectorIndex": "mmsec.cache",
    "kmeans": "mmsec.cache",
    "RunContext": "mmsec.context",
    "TrainConfig": "mmsec.train",
    "train_loop": "mmsec.train",
    "MmsecError": "mmsec.errors",
    "UsageError": "mmsec.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmsec' has no attribute {name!r}")
