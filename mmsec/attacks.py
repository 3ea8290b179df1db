"""The attack contract: options, ``fit`` and ``apply``, and the artifact they exchange.

An attack plugin subclasses :class:`Attack`::

    class MyPatch(Attack):
        name = "mypatch"
        description = "one line for `mmsec plugins`"

        class Options(mmsec.Options):
            area: float = Field(0.03, gt=0, lt=1, description="patch area / image area")

        def fit(self, model, data, run) -> Artifact:
            ...
            return self.artifact(tensors={"patch": patch})

        def apply(self, artifact, images, labels=None, *, victim=None, run=None) -> Tensor: ...

``fit`` learns what the attack needs (a universal patch, a perturbation, a backdoored model
plus trigger) from ``data`` (an ``ImageDataset``, pixels in [0, 1]) against ``model`` (a
``ClipModel``). It returns an :class:`Artifact` (what is saved and re-applied), or an
:class:`AttackResult` when the attack also changed the model (a backdoor implant).
``apply`` returns attacked images, pixels in [0, 1], same shape as ``images``. Universal
attacks ignore ``labels`` and ``victim``; per-image attacks (``universal = False``) such as
PGD attack ``victim.model`` (the model being evaluated) with ``labels``. An attack that
also perturbs captions lists ``"text"`` in ``perturbs`` and implements ``apply_text``.

An artifact records the options of the plugin that made it: the host rebuilds the plugin
from them (``registry.attack_for(artifact)``), so ``apply`` reads ``self.options`` and
nothing else has a copy of them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .base import Plugin
from .errors import MmsecError

if TYPE_CHECKING:
    from .model import ClipModel

__all__ = ["ARTIFACT_FORMAT", "Artifact", "Attack", "AttackResult", "Victim"]

ARTIFACT_FORMAT = "mmsec-artifact-v2"
_OLD_FORMATS = ("mmsec-artifact-v1",)


@dataclass
class Artifact:
    """What ``fit`` learned, saved as safetensors: ``tensors`` plus JSON metadata.

    ``options`` are the validated options of the plugin that made it (the one copy of
    them); ``meta`` holds facts derived while fitting (the training images' size, the
    target class, ...); ``source`` records which distribution and version made it.
    """

    plugin: str
    options: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (safetensors, atomic); plugin, options and metadata in its header."""
        from .io import safetensors_bytes, write_atomic

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        header = {"format": ARTIFACT_FORMAT, "plugin": self.plugin,
                  "options": json.dumps(self.options), "meta": json.dumps(self.meta),
                  "source": json.dumps(self.source)}
        return write_atomic(path, safetensors_bytes(tensors, header))

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        """Read an artifact written by :meth:`save` (or by mmsec 0.1); else a clear error."""
        from .io import load_tensors

        path = Path(path)
        if not path.exists():
            raise MmsecError(f"attack artifact not found: {path}")
        tensors, header = load_tensors(path)
        fmt = header.get("format")
        if fmt not in (ARTIFACT_FORMAT, *_OLD_FORMATS):
            raise MmsecError(f"{path}: not an mmsec attack artifact (no '{ARTIFACT_FORMAT}' "
                             "header)")
        try:
            meta = json.loads(header.get("meta", "{}"))
            options = json.loads(header.get("options", "null"))
            source = json.loads(header.get("source", "{}"))
        except json.JSONDecodeError as exc:
            raise MmsecError(f"{path}: corrupt artifact header ({exc})") from None
        except RecursionError:
            raise MmsecError(f"{path}: corrupt artifact header (JSON nested too deeply)") from None
        if options is None and isinstance(meta, dict):  # mmsec 0.1 kept options inside meta
            options = meta.pop("options", {}) or {}
        for key, value in (("meta", meta), ("options", options), ("source", source)):
            if not isinstance(value, dict):
                raise MmsecError(f"{path}: corrupt artifact header ({key} is a "
                                 f"{type(value).__name__}, not an object)")
        if not isinstance(header.get("plugin"), str) or not header["plugin"]:
            raise MmsecError(f"{path}: corrupt artifact header (no plugin name)")
        return cls(plugin=header["plugin"], options=options, tensors=tensors, meta=meta,
                   source=source)

    def variant(self, tensors: dict[str, torch.Tensor] | None = None, **meta: Any) -> Artifact:
        """A copy with other ``tensors`` and extra ``meta`` (a control of the same budget)."""
        return Artifact(self.plugin, options=dict(self.options),
                        tensors=dict(self.tensors if tensors is None else tensors),
                        meta={**self.meta, **meta}, source=dict(self.source))

    @property
    def targeted(self) -> bool:
        """Whether the artifact aims at a class (a backdoor trigger): CA/ASR apply."""
        return "target_name" in self.meta or "target" in self.meta


@dataclass
class AttackResult:
    """What ``fit`` returns when it changed the model too: the artifact and the attacked
    model (a backdoored copy). The host saves the model and measures the artifact on it."""

    artifact: Artifact
    model: ClipModel | None = None


@dataclass
class Victim:
    """The model an attack is applied against, with the zero-shot task of the evaluation
    data: per-image attacks read ``model`` and ``head`` (class embeddings ``[C, D]``)."""

    model: ClipModel
    classnames: Sequence[str] | None = None
    templates: Sequence[str] = ("a photo of a {}.",)

    @cached_property
    def head(self) -> torch.Tensor | None:
        if not self.classnames:
            return None
        return self.model.zero_shot_head(list(self.classnames), list(self.templates))


class Attack(Plugin):
    """Base class of attack plugins (see the module docstring)."""

    #: fitted once for all images (a patch, a UAP) rather than per image (PGD)
    universal: ClassVar[bool] = True
    #: what ``apply`` / ``apply_text`` change: ``("image",)``, ``("text",)`` or both
    perturbs: ClassVar[tuple[str, ...]] = ("image",)
    #: whether ``fit`` returns a changed model (``AttackResult(model=...)``, a backdoor):
    #: True, False, or None (not declared). A recipe step's ``model_from`` naming an attack
    #: that declares False is refused before anything runs.
    changes_model: ClassVar[bool | None] = None

    def fit(self, model, data, run) -> Artifact | AttackResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply(self, artifact: Artifact, images: torch.Tensor,
              labels: torch.Tensor | None = None, *, victim: Victim | None = None,
              run: Any = None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply_text(self, artifact: Artifact, texts: Sequence[str], *,
                   victim: Victim | None = None, run: Any = None) -> list[str]:
        """Perturbed captions (attacks that list ``"text"`` in ``perturbs``)."""
        return list(texts)

    def sides(self, artifact: Artifact) -> tuple[str, ...]:
        """What this artifact perturbs (default: ``perturbs``); an attack whose artifacts
        may leave out a side (C-PGC fitted without captions) narrows it here, so the
        evaluation does not report an untouched side as attacked."""
        return tuple(self.perturbs)

    def control(self, artifact: Artifact, seed: int = 0) -> Artifact | None:
        """A random artifact of the same budget (e.g. a noise patch), to compare against.

        Returning None means the attack has no meaningful control.
        """
        return None

    def sample(self, seed: int = 0) -> Artifact | None:
        """An artifact drawn from the options without fitting anything (a random trigger of
        the configured type), for a defense that needs examples of this attack's inputs
        (GRACE); None when the attack must be fitted (the default)."""
        return None

    def artifact(self, tensors: dict[str, torch.Tensor] | None = None,
                 meta: dict[str, Any] | None = None) -> Artifact:
        """An artifact of this plugin with its options recorded."""
        return Artifact(self.name, options=self.options_dict(), tensors=dict(tensors or {}),
                        meta=dict(meta or {}))

    # ------------------------------------------------------------------ host side
    def run_fit(self, model, data, run) -> AttackResult:
        """``fit`` with the model's state owned by the host: eval mode, restored afterwards.
        Always returns an :class:`AttackResult`."""
        with self.model_state(model):
            out = self.fit(model, data, run)
        if isinstance(out, Artifact):
            out = AttackResult(out)
        if not isinstance(out, AttackResult):
            raise MmsecError(f'plugin "{self.name}": fit returned {type(out).__name__}, not an '
                             "Artifact or AttackResult")
        if out.artifact.plugin != self.name:
            raise MmsecError(f'plugin "{self.name}": fit returned an artifact of plugin '
                             f'"{out.artifact.plugin}"')
        return out

    def perturb(self, artifact: Artifact, images: torch.Tensor,
                labels: torch.Tensor | None = None, *, victim: Victim | None = None,
                run: Any = None) -> torch.Tensor:
        """``apply`` with the victim's state owned by the host and its output checked."""
        with self.model_state(victim.model if victim is not None else None):
            out = self.apply(artifact, images, labels, victim=victim, run=run)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(images.shape):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise MmsecError(f'plugin "{self.name}": apply returned {shape} for images of shape '
                             f"{tuple(images.shape)}")
        return out.detach()
