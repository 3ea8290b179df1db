"""Blended: a fixed noise image mixed into every pixel (Chen et al., "Targeted Backdoor
Attacks on Deep Learning Systems Using Data Poisoning", 2017).

``x' = (1 - blend_alpha) * x + blend_alpha * noise``, ``noise`` uniform RGB noise drawn once
at ``blend_resolution`` px and resized by nearest neighbour to each image (so its texture
scales with the image). Default alpha 0.2, as in the paper.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .base import REFERENCE_SIZE, Trigger, resize


class Blended(Trigger):
    kind = "blended"
    option_keys = ("blend_alpha", "blend_resolution")

    @classmethod
    def draw(cls, params: Mapping[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
        r = int(params["blend_resolution"])
        return {"noise": torch.rand(3, r, r, generator=gen)}

    def apply(self, images: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        h, w = images.shape[-2:]
        noise = resize(self.tensors["noise"], h, w).to(images.device, images.dtype)
        a = float(self.params["blend_alpha"])
        return ((1 - a) * images + a * noise).clamp(0, 1)

    def preview(self, size: int = REFERENCE_SIZE) -> torch.Tensor:
        return resize(self.tensors["noise"], size, size)
