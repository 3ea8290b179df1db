"""PGD: per-image L-inf projected gradient descent on the zero-shot cross-entropy.

Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks"
(ICLR 2018), applied to a CLIP zero-shot classifier: maximise
``CE(logit_scale * cos(f(x + d), T), y)`` over ``||d||_inf <= eps`` with signed-gradient
steps, projecting back to the ball and to [0, 1] (``mmsec.pgd``, which adversarial
fine-tuning shares). Defaults (eps 4/255, 10 steps of 1/255, random start) are the
robust-evaluation setting of TeCoA/FARE. Also mmsec's robust-accuracy evaluator.

A per-image attack: ``apply`` attacks the model being evaluated (``victim``) with the
class names of the evaluation data, so a saved PGD artifact (its options) re-applies to
any model. The control artifact is uniform noise in [-eps, eps]: same budget, no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from mmsec import Artifact, Attack, MmsecError, Options, fields, hookimpl, pgd

__version__ = "0.2.0"
mmsec_api_version = 2  # the mmsec plugin API this plugin is written for


class PGD(Attack):
    """Untargeted L-inf PGD against the zero-shot head built from the data's class names."""
    changes_model = False

    name = "pgd"
    description = "per-image L-inf PGD on the zero-shot cross-entropy (robust accuracy)"
    universal = False

    class Options(Options):
        eps: float = fields.eps(4 / 255, allow_zero=True)
        step_size: float = fields.eps(1 / 255, "step per iteration")
        steps: int = fields.steps(10, "iterations", allow_zero=True)
        random_start: bool = Field(True, description="start from a uniform point in the ball")

    def fit(self, model, data, run) -> Artifact:
        if not data.classnames:
            raise MmsecError("pgd needs a dataset with class names (zero-shot labels)")
        return self.artifact(meta={"seed": run.seed})

    def control(self, artifact: Artifact, seed: int = 0) -> Artifact:
        return artifact.variant(seed=seed, control="uniform noise")

    def apply(self, artifact: Artifact, images: torch.Tensor,
              labels: torch.Tensor | None = None, *, victim=None, run=None) -> torch.Tensor:
        if victim is None or victim.head is None:
            raise MmsecError("pgd attacks a model's zero-shot head: it needs the victim model "
                             "and data with class names")
        model, head, o = victim.model, victim.head, self.options
        x = images.to(model.device, torch.float32)
        gen = torch.Generator().manual_seed(int(artifact.meta.get("seed", 0)))
        noise = (torch.rand(x.shape, generator=gen) * 2 - 1).to(x.device) * o.eps
        if artifact.meta.get("control"):
            return (x + noise).clamp(0, 1)
        if labels is None or (labels < 0).any():
            with torch.no_grad():
                labels = model.logits(x, head).argmax(1)
        labels = labels.to(x.device)

        def loss(adv: torch.Tensor) -> torch.Tensor:
            # float64 softmax: with CLIP's logit scale (~100) a confident fp32 softmax rounds to
            # exactly one-hot, the gradient vanishes and sign() stops the attack.
            return F.cross_entropy(model.logits(adv, head).double(), labels)

        return pgd(loss, x, eps=o.eps, step_size=o.step_size, steps=o.steps,
                   random_start=o.random_start, noise=noise)


@hookimpl
def register_attacks(register):
    register(PGD)
