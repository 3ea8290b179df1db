"""The defense contract: ``apply(model, data, run) -> model``, for two kinds of defenses.

A *model-repairing* defense subclasses :class:`Defense`, declares its ``Options`` (defaults =
the paper's values) and implements ``apply``: it receives a ``ClipModel``, a small clean
``ImageDataset`` and the run context, and returns the repaired ``ClipModel`` (a changed
copy). What it finds along the way (an inverted trigger, a target ranking) goes into the
run: ``run.metrics``, ``run.save_tensors``, ``run.save_image``, ``run.add_section``.
Another plugin it needs (InverTune simulates a universal attack) runs in a child run:
``run.fit_attack(name, model, data, options)``. An attack artifact the run was given
(``mmsec defend --attack-artifact``) is ``run.inputs.attack_artifact``.

An *input-transform* defense (a purifier) subclasses :class:`InputTransform` and implements
``transform(artifact, images) -> images`` (and, when it learns something from the clean
data, ``fit(model, data, run) -> Artifact``). mmsec wraps the model into a
:class:`TransformedModel` whose images go through the transform first; its fingerprint
covers the defense, its options and its artifact, so its embeddings are never mistaken for
the unwrapped model's, and its checkpoint records the defense, so loading it rebuilds the
wrapper instead of dropping it.

A defense may also train a light module on top of the frozen model (GRACE): it returns an
:class:`AdaptedModel`, whose image embedding passes through ``adapter(embedding, {layer:
pooled activation})``; the checkpoint records the defense and the adapter's spec
(``build_adapter``), so loading rebuilds it. A defense that trains an input *detector*
saves it as an artifact of its own and implements :meth:`Defense.detection_scores`;
``mmsec eval --detector FILE`` then measures it on every view.

A *data* defense (a poisoned-sample detector) subclasses :class:`DataDefense`: its
``apply`` receives the whole training split (not the host's small clean sample), writes what
it finds (a ranking of the items, a cleaned captions file) into the run, and returns the
model unchanged; the host then saves no checkpoint and measures the model once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from .attacks import Artifact
from .base import Plugin
from .errors import MmsecError
from .model import ClipModel

__all__ = ["AdaptedModel", "DataDefense", "Defense", "InputTransform", "TransformedModel"]


class Defense(Plugin):
    """Base class of defense plugins (see the module docstring)."""

    #: ``repair`` (returns changed weights), ``transform`` (wraps the model's input) or
    #: ``data`` (cleans the training data, returns the model as it was)
    kind: ClassVar[str] = "repair"

    def apply(self, model, data, run):  # pragma: no cover - abstract
        raise NotImplementedError

    def run_apply(self, model, data, run) -> ClipModel:
        """``apply`` with the input model's state owned by the host (eval mode, restored)."""
        with self.model_state(model):
            out = self.apply(model, data, run)
        if not isinstance(out, ClipModel):
            raise MmsecError(f'plugin "{self.name}": apply returned {type(out).__name__}, not '
                             "a ClipModel")
        out.eval()
        return out

    def build_adapter(self, spec: Mapping[str, Any]) -> nn.Module:
        """The (untrained) adapter module an :class:`AdaptedModel` checkpoint describes
        (``spec`` = what :meth:`AdaptedModel.wrapper_spec` recorded as ``adapter``); its
        weights are loaded afterwards. Defenses that return an AdaptedModel override it."""
        raise MmsecError(f'plugin "{self.name}" cannot rebuild an adapter')

    def detection_scores(self, artifact: Artifact, embeddings: torch.Tensor,
                         layers: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """For a defense that trains a detector: ``[N]`` scores, higher = more likely attacked,
        from L2-normalised image ``embeddings [N, D]`` and pooled image-layer activations
        (``{layer: [N, C]}``, ``ClipModel.forward_features``); ``artifact.meta["threshold"]``
        is the operating point. Used by ``mmsec eval --detector``."""
        raise MmsecError(f'plugin "{self.name}" has no detector')


class DataDefense(Defense):
    """A data defense: finds suspicious items in the training data it is given (the whole
    train split) and returns the model unchanged (see the module docstring)."""

    kind: ClassVar[str] = "data"


class InputTransform(Defense):
    """An input-transform defense: ``transform`` changes the images before the model sees
    them; the weights stay as they are."""

    kind: ClassVar[str] = "transform"

    def fit(self, model, data, run) -> Artifact | None:
        """What the transform learns from the clean data (a threshold, a denoiser), as an
        artifact of this plugin; None when it learns nothing."""
        return None

    def transform(self, artifact: Artifact | None, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> the same shape in [0, 1]."""  # pragma: no cover
        raise NotImplementedError

    def apply(self, model, data, run) -> TransformedModel:
        artifact = self.fit(model, data, run)
        if artifact is not None and not isinstance(artifact, Artifact):
            raise MmsecError(f'plugin "{self.name}": fit returned {type(artifact).__name__}, '
                             "not an Artifact or None")
        return TransformedModel(model, self, artifact)

    def artifact(self, tensors: dict[str, torch.Tensor] | None = None,
                 meta: dict[str, Any] | None = None) -> Artifact:
        """An artifact of this defense with its options recorded."""
        return Artifact(self.name, options=self.options_dict(), tensors=dict(tensors or {}),
                        meta=dict(meta or {}))


class _SharedWeightsModel(ClipModel):
    """A wrapper of ``base``: the same CLIP module, tokenizer, preprocessing and mode."""

    def __init__(self, base: ClipModel) -> None:
        training = base.clip.training
        super().__init__(base.clip, base.tokenizer, name=base.name, pretrained=base.pretrained,
                         image_size=base.image_size, mean=base.mean.flatten().tolist(),
                         std=base.std.flatten().tolist(), precision=base.precision,
                         info=base.info)
        self.mean, self.std = base.mean, base.std
        self.clip.train(training)


class TransformedModel(_SharedWeightsModel):
    """``base`` (sharing its weights) behind an :class:`InputTransform` defense."""

    def __init__(self, base: ClipModel, defense: InputTransform,
                 artifact: Artifact | None = None) -> None:
        super().__init__(base)
        self.defense, self.artifact = defense, artifact

    def forward(self, images: torch.Tensor | None = None, texts: Any = None, **kwargs: Any):
        if images is not None:
            images = self.defense.transform(self.artifact, images)
        return super().forward(images, texts, **kwargs)

    def fingerprint_extra(self) -> dict[str, Any]:
        h = hashlib.sha256()
        if self.artifact is not None:
            for k, v in sorted(self.artifact.tensors.items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
                         .tobytes())
        return {"defense": self.defense.name, "options": self.defense.options_dict(),
                "version": self.defense.version,
                "artifact_meta": self.artifact.meta if self.artifact else None,
                "artifact_tensors": h.hexdigest()}

    def wrapper_spec(self) -> dict[str, Any]:
        return {"kind": "input-transform", "defense": self.defense.name,
                "options": self.defense.options_dict(),
                "artifact": None if self.artifact is None else
                {"plugin": self.artifact.plugin, "options": self.artifact.options,
                 "meta": self.artifact.meta}}

    def wrapper_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.artifact.tensors) if self.artifact is not None else {}

    def describe(self) -> str:
        return f"{super().describe()} behind {self.defense.name}"


class AdaptedModel(_SharedWeightsModel):
    """``base`` (sharing its frozen weights) with ``adapter`` on its image side: the
    embedding becomes ``adapter(embedding, {layer: pooled activation})`` for the image
    ``layers`` (``ClipModel.layer_names("image")``); ``spec`` is the JSON the defense's
    :meth:`Defense.build_adapter` rebuilds the adapter from."""

    def __init__(self, base: ClipModel, defense: Defense, adapter: nn.Module,
                 layers: list[str], spec: Mapping[str, Any]) -> None:
        super().__init__(base)
        self.defense, self.adapter = defense, adapter.to(base.device)
        self.adapter_layers, self.adapter_spec = list(layers), dict(spec)

    def _image_forward(self, pix: torch.Tensor, names: list[str]):
        from .model import _pool

        need = list(dict.fromkeys([*self.adapter_layers, *names]))
        emb, acts = super()._image_forward(pix, need)
        emb = self.adapter(emb.float(), {n: _pool(acts[n]) for n in self.adapter_layers})
        return emb, {n: acts[n] for n in names}

    def fingerprint_extra(self) -> dict[str, Any]:  # the adapter's tensors are hashed too
        return {"defense": self.defense.name, "options": self.defense.options_dict(),
                "version": self.defense.version, "layers": self.adapter_layers,
                "adapter": self.adapter_spec}

    def wrapper_spec(self) -> dict[str, Any]:
        return {"kind": "embedding-adapter", "defense": self.defense.name,
                "options": self.defense.options_dict(), "layers": self.adapter_layers,
                "adapter": self.adapter_spec}

    def wrapper_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.adapter.state_dict().items()}

    def describe(self) -> str:
        return f"{super().describe()} with the {self.defense.name} adapter"


def rebuild_wrapper(base: ClipModel, spec: Mapping[str, Any],
                    tensors: Mapping[str, torch.Tensor],
                    defenses: Callable[[str], type]) -> ClipModel:
    """The wrapped model a checkpoint describes: an input transform or an adapter."""
    if spec.get("kind") == "input-transform":
        return rebuild_transformed(base, spec, tensors, defenses)
    cls = defenses(spec["defense"])
    if not (isinstance(cls, type) and issubclass(cls, Defense)):
        raise MmsecError(f"checkpoint's adapter comes from {spec['defense']!r}, which is not a "
                         "defense here")
    defense = cls(spec.get("options") or {})
    adapter = defense.build_adapter(spec.get("adapter") or {})
    from .model import load_weights

    load_weights(adapter, dict(tensors), f"the {spec['defense']} adapter")
    return AdaptedModel(base, defense, adapter, list(spec.get("layers") or []),
                        spec.get("adapter") or {})


def rebuild_transformed(base: ClipModel, spec: Mapping[str, Any],
                        tensors: Mapping[str, torch.Tensor],
                        defenses: Callable[[str], type]) -> TransformedModel:
    """The :class:`TransformedModel` a checkpoint describes (``ClipModel.save`` of one)."""
    cls = defenses(spec["defense"])
    if not (isinstance(cls, type) and issubclass(cls, InputTransform)):
        raise MmsecError(f"checkpoint wraps its model in {spec['defense']!r}, which is not an "
                         "input-transform defense here")
    art = spec.get("artifact")
    artifact = None if art is None else Artifact(art["plugin"], options=art["options"],
                                                 tensors=dict(tensors), meta=art["meta"])
    return TransformedModel(base, cls(spec["options"]), artifact)
