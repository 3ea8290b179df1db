"""mmsec: a plugin-based security toolkit for CLIP-style vision-language models.

The public API for plugin authors and Python users is what this module exports (lazily,
so ``import mmsec`` stays cheap), plus the modules ``mmsec.losses``, ``mmsec.metrics``,
``mmsec.avqi`` (the AVQI metric) and ``mmsec.fields`` (shared option fields)::

    from mmsec import Attack, Defense, Artifact, Options, hookimpl, train, Optim

Plugins use nothing else of mmsec (a test checks the built-in ones); everything here is
documented in docs/plugins.md and docs/api.md.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    # the plugin contract
    "hookimpl": "mmsec.hookspecs",
    "Attack": "mmsec.attacks",
    "Artifact": "mmsec.attacks",
    "AttackResult": "mmsec.attacks",
    "Victim": "mmsec.attacks",
    "Defense": "mmsec.defenses",
    "DataDefense": "mmsec.defenses",
    "InputTransform": "mmsec.defenses",
    "TransformedModel": "mmsec.defenses",
    "AdaptedModel": "mmsec.defenses",
    "API_VERSION": "mmsec.registry",
    "Options": "mmsec.options",
    "RunContext": "mmsec.context",
    "RunInputs": "mmsec.context",
    # models and data
    "ClipModel": "mmsec.model",
    "ModelSource": "mmsec.model",
    "Vocabulary": "mmsec.model",
    "load_model": "mmsec.model",
    "ImageDataset": "mmsec.data",
    "TensorDataset": "mmsec.data",
    "Subset": "mmsec.data",
    "DatasetSource": "mmsec.data",
    "load_dataset": "mmsec.data",
    "load_images": "mmsec.data",
    "subset": "mmsec.data",
    # cache and search
    "EmbeddingCache": "mmsec.cache",
    "content_hash": "mmsec.cache",
    "VectorIndex": "mmsec.search",
    "kmeans": "mmsec.search",
    # the training core
    "train": "mmsec.training",
    "Optim": "mmsec.training",
    "TrainResult": "mmsec.training",
    "StepContext": "mmsec.training",
    "BatchSource": "mmsec.training",
    "Batches": "mmsec.training",
    "IndexBatches": "mmsec.training",
    "Plateau": "mmsec.training",
    "CaptionTable": "mmsec.training",
    "contrastive_loss": "mmsec.training",
    "pgd": "mmsec.training",
    # evaluation
    "Evaluation": "mmsec.evaluation",
    "Metric": "mmsec.evaluation",
    "View": "mmsec.evaluation",
    "encode_images": "mmsec.evaluation",
    "encode_texts": "mmsec.evaluation",
    # files and errors
    "write_atomic": "mmsec.io",
    "load_tensors": "mmsec.io",
    "MmsecError": "mmsec.errors",
    "UsageError": "mmsec.errors",
    "PluginError": "mmsec.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mmsec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
