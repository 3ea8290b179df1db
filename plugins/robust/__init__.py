"""Robust-accuracy evaluators from torchattacks (Kim, 2020): APGD and AutoAttack against a
CLIP zero-shot classifier (Croce & Hein, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks", ICML 2020).

Per-image attacks (like ``pgd``): ``apply`` attacks the model being evaluated
(``victim``) with logits ``logit_scale * cos(f(x), T)`` over the evaluation data's class
names, pixels in [0, 1]. ``mmsec eval --robust apgd -o eps 4/255`` reports
``robust_top1`` next to ``clean_top1``. torchattacks is an optional dependency
(``pip install 'mmsec[robust]'``); without it these plugins load and explain at use.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from mmsec import Attack, MmsecError, Options, fields, hookimpl

__version__ = "0.2.0"
mmsec_api_version = 2  # the mmsec plugin API this plugin is written for


class ZeroShotClassifier(nn.Module):
    """A ClipModel and a zero-shot head as the ``model(x) -> logits`` torchattacks expects."""

    def __init__(self, model, head: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("head", head.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.logits(x, self.head).float()


def _torchattacks():
    try:
        import torchattacks
    except ImportError as exc:
        raise MmsecError("the apgd and autoattack plugins need torchattacks: "
                         "pip install 'mmsec[robust]'") from exc
    return torchattacks


class _TorchAttacks(Attack):
    changes_model = False
    universal = False

    def fit(self, model, data, run):
        if not data.classnames:
            raise MmsecError(f"{self.name} needs data with class names (zero-shot labels)")
        _torchattacks()
        return self.artifact(meta={"seed": run.seed})

    def make(self, classifier: nn.Module, n_classes: int, seed: int):  # pragma: no cover
        raise NotImplementedError

    def apply(self, artifact, images, labels=None, *, victim=None, run=None):
        if victim is None or victim.head is None:
            raise MmsecError(f"{self.name} attacks a zero-shot head: it needs the victim "
                             "model and data with class names")
        classifier = ZeroShotClassifier(victim.model, victim.head).eval()
        x = images.to(victim.model.device, torch.float32)
        if labels is None or (labels < 0).any():
            with torch.no_grad():
                labels = classifier(x).argmax(1)
        attack = self.make(classifier, int(victim.head.shape[0]),
                           int(artifact.meta.get("seed", 0)))
        with victim.model.using_precision("fp32"):
            return attack(x, labels.to(x.device)).detach()


class APGD(_TorchAttacks):
    """APGD-CE (or APGD-DLR / APGD-T) from torchattacks."""

    name = "apgd"
    description = "APGD-CE / -DLR / -T (torchattacks), the parameter-free PGD of AutoAttack"

    class Options(Options):
        eps: float = fields.eps(4 / 255)
        steps: int = fields.steps(100, "iterations")
        n_restarts: int = Field(1, ge=1, description="random restarts")
        loss: Literal["ce", "dlr", "targeted"] = Field(
            "ce", description="ce: APGD-CE; dlr: APGD-DLR; targeted: APGD-T")

    def make(self, classifier, n_classes, seed):
        ta, o = _torchattacks(), self.options
        if o.loss == "targeted":
            return ta.APGDT(classifier, norm="Linf", eps=o.eps, steps=o.steps,
                            n_restarts=o.n_restarts, seed=seed, n_classes=n_classes)
        return ta.APGD(classifier, norm="Linf", eps=o.eps, steps=o.steps,
                       n_restarts=o.n_restarts, seed=seed, loss=o.loss)


class AutoAttack(_TorchAttacks):
    """AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square) from torchattacks."""

    name = "autoattack"
    description = "AutoAttack, standard version (torchattacks): the robust-accuracy benchmark"

    class Options(Options):
        eps: float = fields.eps(4 / 255)
        version: Literal["standard", "plus", "rand"] = Field("standard",
                                                             description="attack ensemble")

    def make(self, classifier, n_classes, seed):
        ta, o = _torchattacks(), self.options
        return ta.AutoAttack(classifier, norm="Linf", eps=o.eps, version=o.version,
                             n_classes=n_classes, seed=seed)


@hookimpl
def register_attacks(register):
    register(APGD)
    register(AutoAttack)
