"""What every trigger type shares: the ``Trigger`` interface and two pixel helpers.

A trigger is data (``params``: JSON-able numbers and words; ``tensors``: its random
pattern) plus a pure function of the pixels. It is written for any image size: its
geometry is relative (a patch covers a fraction of the shorter side, a warp field is
upsampled, a noise image is resized), so a trigger implanted at 32 px is re-applied
unchanged at 28 or 224 px. It is deterministic: the same images give the same pixels,
now and after the spec is saved and loaded again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

# Triggers are drawn and previewed at this size (the zoo models' input size).
REFERENCE_SIZE = 32


def generator(seed: int) -> torch.Generator:
    """A CPU generator for ``seed`` (triggers are drawn on the CPU, then moved)."""
    return torch.Generator().manual_seed(int(seed) % 2**63)


def resize(pattern: torch.Tensor, height: int, width: int, mode: str = "nearest") -> torch.Tensor:
    """``[C, h, w]`` -> ``[C, height, width]``; nearest keeps hard edges and noise statistics."""
    if tuple(pattern.shape[-2:]) == (height, width):
        return pattern
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(pattern[None], size=(height, width), mode=mode, **kwargs)[0]


class Trigger:
    """A backdoor trigger of one type.

    Subclasses set ``kind`` and ``option_keys`` (the plugin options that parameterise them)
    and implement :meth:`draw` (a new random pattern) and :meth:`apply`.
    """

    kind: ClassVar[str] = ""
    #: plugin options this trigger reads; they become its ``params``
    option_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        self.params = dict(params)
        self.tensors = {k: v.detach().float().cpu() for k, v in tensors.items()}

    @classmethod
    def create(cls, options: Mapping[str, Any], seed: int) -> Trigger:
        """A trigger with this type's options and a pattern drawn from ``seed``."""
        params = {k: options[k] for k in cls.option_keys}
        params["seed"] = int(seed)
        return cls(params, cls.draw(params, generator(seed)))

    @classmethod
    def draw(cls, params: Mapping[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """The random part of a trigger (pattern, noise image, warp grid); may be empty."""
        return {}

    def control(self, seed: int) -> Trigger:
        """Same type and size, a different random pattern (the baseline of a random trigger)."""
        # offset so that a control drawn with the trigger's own seed still differs from it
        return type(self)(self.params, self.draw(self.params, generator(seed + 7919)))

    def apply(self, images: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] -> triggered images, same shape, in [0, 1].

        ``gen`` drives per-image randomness (a random patch place) where a trigger has any;
        by default it is seeded from the trigger's own seed, so ``apply`` is deterministic.
        """
        raise NotImplementedError

    def preview(self, size: int = REFERENCE_SIZE) -> torch.Tensor:
        """``[3, size, size]``: the trigger applied to a mid-grey image (for the PNG)."""
        return self.apply(torch.full((1, 3, size, size), 0.5))[0]
