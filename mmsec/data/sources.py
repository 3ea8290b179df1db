"""Data sources: what ``-d SPEC`` names, and how a spec becomes a dataset.

Sources are registered through the ``register_datasets`` hook (the host's own through its
default plugin); ``-d SPEC`` is ``NAME`` or ``NAME:ARGUMENT`` (e.g. ``imagefolder:/data/pets``);
a bare existing path is routed to the matching file source. This module knows nothing of
the plugin manager: callers pass the sources (the registry's ``datasets``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import MmsecError, UsageError
from .base import ImageDataset
from .fashion import FASHION_MNIST_DIR, fashion_mnist
from .files import captions_file, imagefolder
from .procedural import procedural_shapes

__all__ = ["DEFAULT_DATASET", "DatasetSource", "builtin_sources", "load_dataset", "parse_spec"]

@dataclass(frozen=True)
class DatasetSource:
    """A registered data source: ``factory(arg, split=..., seed=..., **kw) -> ImageDataset``."""

    name: str
    factory: Callable[..., ImageDataset]
    description: str = ""
    needs_arg: bool = False
    plugin: str = "mmsec"


DEFAULT_DATASET = "procedural"


def parse_spec(spec: str | None) -> tuple[str, str | None]:
    """Split ``NAME[:ARG]``; a bare existing path picks its file source."""
    if not spec:
        return DEFAULT_DATASET, None
    if os.path.exists(spec):
        p = Path(spec)
        if p.is_dir():
            return "imagefolder", spec
        if p.suffix.lower() in (".csv", ".jsonl", ".json"):
            return "captions", spec
    name, sep, arg = spec.partition(":")
    return name, (arg if sep else None)


def load_dataset(
    spec: str | None, *, split: str = "test", seed: int = 0,
    sources: Mapping[str, DatasetSource] | None = None, **kwargs: object,
) -> ImageDataset:
    """Build the dataset named by ``spec`` (see module doc) for ``split``.

    ``sources`` are the registered data sources (``registry.datasets``); None means the
    built-in ones only.
    """
    if sources is None:
        sources = {s.name: s for s in builtin_sources()}
    name, arg = parse_spec(spec)
    if name not in sources:
        raise UsageError(f"unknown dataset {name!r} (known: {', '.join(sorted(sources))})")
    src = sources[name]
    if src.needs_arg and not arg:
        raise UsageError(f"dataset {name!r} needs an argument: -d {name}:PATH")
    try:
        return src.factory(arg, split=split, seed=seed, **kwargs)
    except (UsageError, MmsecError):
        raise
    except FileNotFoundError as exc:
        raise MmsecError(f"dataset {name!r}: file not found: {exc.filename or exc}") from exc
    except OSError as exc:
        raise MmsecError(f"dataset {name!r}: cannot read {arg}: {exc}") from exc


def builtin_sources() -> list[DatasetSource]:
    """Sources that ship with mmsec (registered by mmsec's own default plugin)."""
    sources = [
        DatasetSource("procedural", procedural_shapes,
                      "built-in procedural shapes: 10 classes, captions, 32 px (train 20k/test 2k)"),
        DatasetSource("imagefolder", imagefolder,
                      "imagefolder:PATH - one sub-folder per class; PATH/train+test or hashed 80/20",
                      needs_arg=True),
        DatasetSource("captions", captions_file,
                      "captions:FILE - CSV/JSONL of image, caption(s), optional label and split",
                      needs_arg=True),
        DatasetSource("fashion-mnist", fashion_mnist,
                      f"fashion-mnist[:DIR] - Fashion-MNIST idx files (default {FASHION_MNIST_DIR})"),
    ]
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        from .tvsets import TORCHVISION_SETS, torchvision_factory

        sources += [
            DatasetSource(name, torchvision_factory(name), f"{name}:ROOT - {spec.description}",
                          needs_arg=True)
            for name, spec in TORCHVISION_SETS.items()
        ]
    return sources

