"""Robust and clean fine-tuning defenses on one loss library and one training loop.

- ``fare``: unsupervised adversarial fine-tuning of the image tower (FARE, ICML 2024);
- ``tecoa``: supervised adversarial fine-tuning on zero-shot logits (TeCoA, ICLR 2023);
- ``pmg-aft``: adversarial fine-tuning guided by the pre-trained model (PMG-AFT, CVPR 2024);
- ``cleanclip``: clean multimodal + in-modal contrastive fine-tuning against backdoors
  (CleanCLIP, ICCV 2023).

Losses come from ``mmsec.losses`` (``fare_loss``, ``zero_shot_ce``, ``pmg_aft_loss``,
``in_modal_loss``, ``clip_loss``, ``focal_info_nce``, ``decoupled_contrastive_loss``,
``distillation_kl``, ``HardPairWeights``), the inner maximisation is ``mmsec.pgd`` (the
``pgd`` plugin's attack), the loop is ``mmsec.train``. The repaired model is saved as
``artifacts/model.safetensors``, which a later step loads with ``--pretrained``.
"""

from __future__ import annotations

from mmsec import hookimpl

from .cleanclip import CleanCLIP
from .fare import FARE
from .pmg_aft import PMGAFT
from .tecoa import TeCoA

__version__ = "0.2.0"
mmsec_api_version = 2  # the mmsec plugin API this plugin is written for

__all__ = ["FARE", "PMGAFT", "CleanCLIP", "TeCoA", "register_defenses"]


@hookimpl
def register_defenses(register):
    for cls in (FARE, TeCoA, PMGAFT, CleanCLIP):
        register(cls)
