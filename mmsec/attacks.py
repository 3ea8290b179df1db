"""The attack contract: options, ``fit`` and ``apply``, and the artifact they exchange.

An attack plugin subclasses :class:`Attack`::

    class MyPatch(Attack):
        name = "mypatch"
        description = "one line for `mmsec plugins`"

        class Options(mmsec.Options):
            area: float = Field(0.03, gt=0, lt=1, description="patch area / image area")

        def fit(self, model, data, run) -> Artifact: ...
        def apply(self, artifact, images, labels=None) -> Tensor: ...

``fit`` learns what the attack needs (a universal patch, a perturbation, a
backdoored model plus trigger) from ``data`` (an ``ImageDataset``, pixels in
[0, 1]) against ``model`` (a ``ClipModel``). ``apply`` returns attacked images,
pixels in [0, 1], same shape as ``images``. Universal attacks ignore
``labels``; per-image attacks (``universal = False``) such as PGD need them
and keep the model in ``artifact.runtime``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from .errors import MmsecError
from .options import Options, validate_options

ARTIFACT_FORMAT = "mmsec-artifact-v1"


@dataclass
class Artifact:
    """What ``fit`` learned: tensors (saved as safetensors) plus JSON-able metadata.

    ``runtime`` holds live objects that are not saved (e.g. the model a per-image
    attack runs against).
    """

    plugin: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict, repr=False)

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (safetensors, atomic); the plugin name and metadata go in its header."""
        from .runs import safetensors_bytes, write_atomic

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        header = {"format": ARTIFACT_FORMAT, "plugin": self.plugin, "meta": json.dumps(self.meta)}
        return write_atomic(path, safetensors_bytes(tensors, header))

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        """Read an artifact written by :meth:`save`; anything else is a clear error."""
        from .runs import load_tensors

        path = Path(path)
        if not path.exists():
            raise MmsecError(f"attack artifact not found: {path}")
        try:
            tensors, header = load_tensors(path)
        except MmsecError:
            raise
        except Exception as exc:  # safetensors raises several error types on bad files
            raise MmsecError(f"{path}: not a readable artifact ({exc})") from exc
        if header.get("format") != ARTIFACT_FORMAT:
            raise MmsecError(f"{path}: not an mmsec attack artifact (no '{ARTIFACT_FORMAT}' header)")
        return cls(plugin=header["plugin"], tensors=tensors, meta=json.loads(header.get("meta", "{}")))


class _Configurable:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    version: ClassVar[str | None] = None  # defaults to the plugin distribution's version

    class Options(Options):
        pass

    def __init__(self, options: Mapping[str, Any] | Options | None = None) -> None:
        self.options = validate_options(self.Options, options or {}, owner=f'plugin "{self.name}"')


class Attack(_Configurable):
    """Base class of attack plugins (see the module docstring)."""

    universal: ClassVar[bool] = True

    def fit(self, model, data, run) -> Artifact:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply(self, artifact: Artifact, images: torch.Tensor,
              labels: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def control(self, artifact: Artifact, seed: int = 0) -> Artifact | None:
        """A random artifact of the same budget (e.g. a noise patch), to compare against.

        Returning None means the attack has no meaningful control.
        """
        return None
