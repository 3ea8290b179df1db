"""Projected gradient descent in pixel space: one function for attacks and adversarial training.

``pgd(loss_fn, x, eps=..., step_size=..., steps=...)`` maximises ``loss_fn(x_adv)`` over the
L-inf ball of radius ``eps`` around ``x`` (pixels in [0, 1]) with signed-gradient steps, as
Madry et al. (ICLR 2018). The loss is an argument, so the same function is the ``pgd``
plugin's attack (zero-shot cross-entropy), FARE's inner maximisation (embedding distance to
the frozen original) and TeCoA's (cross-entropy of the model being trained). Gradients are
taken with respect to the perturbation only (``torch.autograd.grad``): no model weight
receives a gradient and none needs ``requires_grad`` changed.

``momentum`` gives the momentum variant (MI-FGSM, Dong et al. CVPR 2018, as RobustVLM's
FARE training uses): the gradient is divided by its mean absolute value per image and
accumulated with decay ``momentum`` before the sign step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..distributed import global_rand

__all__ = ["pgd"]


def pgd(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    momentum: float | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adversarial images ``[B, 3, H, W]`` in [0, 1] within ``eps`` (L-inf) of ``x``.

    Args:
        loss_fn: ``x_adv -> scalar`` to maximise (e.g. the mean cross-entropy of the batch).
        x: clean images in [0, 1].
        eps, step_size, steps: the L-inf budget, the step and the number of iterations.
        random_start: start from a uniform point of the ball (``noise`` if given, else drawn
            from ``generator`` on the CPU).
        momentum: MI-FGSM decay of the normalised gradient (None: plain sign steps).

    Returns the last iterate, detached.
    """
    x = x.detach()
    if random_start:
        if noise is None:
            # inside a training step under torchrun: drawn for the global batch, then sliced
            noise = (global_rand(x.shape, generator=generator) * 2 - 1) * eps
        delta = noise.to(x.device, x.dtype)
    else:
        delta = torch.zeros_like(x)
    delta = ((x + delta).clamp(0, 1) - x).detach()
    velocity = torch.zeros_like(x) if momentum is not None else None
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn(x + delta)
        (grad,) = torch.autograd.grad(loss, delta)
        if velocity is not None:
            norm = grad.abs().mean(dim=tuple(range(1, grad.ndim)), keepdim=True)
            velocity = momentum * velocity + grad / norm.clamp_min(1e-12)
            grad = velocity
        delta = (delta.detach() + step_size * grad.sign()).clamp(-eps, eps)
        delta = (x + delta).clamp(0, 1) - x
    return (x + delta).detach()
