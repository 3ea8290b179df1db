"""PGD: per-image L-inf projected gradient descent on the zero-shot cross-entropy.

Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks"
(ICLR 2018), applied to a CLIP zero-shot classifier: maximise
``CE(logit_scale * cos(f(x + d), T), y)`` over ``||d||_inf <= eps`` with
signed-gradient steps, projecting back to the ball and to [0, 1]. Defaults
(eps 4/255, 10 steps of 1/255, random start) are the robust-evaluation
setting of TeCoA/FARE. Also mmsec's robust-accuracy evaluator.

The control artifact is uniform noise in [-eps, eps]: same budget, no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from mmsec import Artifact, Attack, Options, hookimpl

__version__ = "0.1.0"


class PGD(Attack):
    """Untargeted L-inf PGD against the zero-shot head built from the data's class names."""

    name = "pgd"
    description = "per-image L-inf PGD on the zero-shot cross-entropy (robust accuracy)"
    universal = False

    class Options(Options):
        eps: float = Field(4 / 255, ge=0, le=1, description="L-inf budget (pixels in [0, 1])")
        step_size: float = Field(1 / 255, gt=0, le=1, description="step per iteration")
        steps: int = Field(10, ge=0, description="iterations")
        random_start: bool = Field(True, description="start from a uniform point in the ball")

    def fit(self, model, data, run) -> Artifact:
        if not data.classnames:
            raise ValueError("pgd needs a dataset with class names (zero-shot labels)")
        head = model.zero_shot_head(data.classnames, data.templates)
        meta = {**self.options.model_dump(), "classnames": list(data.classnames)}
        return Artifact(self.name, meta=meta, runtime={"model": model, "head": head,
                                                       "seed": getattr(run, "seed", 0)})

    def control(self, artifact: Artifact, seed: int = 0) -> Artifact:
        return Artifact(self.name, meta={**artifact.meta, "control": "uniform noise"},
                        runtime={**artifact.runtime, "seed": seed})

    def apply(self, artifact: Artifact, images: torch.Tensor,
              labels: torch.Tensor | None = None) -> torch.Tensor:
        model, head = artifact.runtime["model"], artifact.runtime["head"]
        o = self.options
        x = images.to(model.device, torch.float32)
        gen = torch.Generator(device="cpu").manual_seed(int(artifact.runtime.get("seed", 0)))
        noise = (torch.rand(x.shape, generator=gen) * 2 - 1).to(x.device) * o.eps
        if artifact.meta.get("control"):
            return (x + noise).clamp(0, 1)
        if labels is None or (labels < 0).any():
            with torch.no_grad():
                labels = model.logits(x, head).argmax(1)
        labels = labels.to(x.device)
        delta = noise if o.random_start else torch.zeros_like(x)
        delta = ((x + delta).clamp(0, 1) - x).detach()
        for _ in range(o.steps):
            delta.requires_grad_(True)
            # float64 softmax: with CLIP's logit scale (~100) a confident fp32 softmax rounds to
            # exactly one-hot, the gradient vanishes and sign() stops the attack.
            loss = F.cross_entropy(model.logits(x + delta, head).double(), labels)
            (grad,) = torch.autograd.grad(loss, delta)
            delta = (delta.detach() + o.step_size * grad.sign()).clamp(-o.eps, o.eps)
            delta = (x + delta).clamp(0, 1) - x
        return (x + delta).detach()


@hookimpl
def register_attacks(register):
    register(PGD)
