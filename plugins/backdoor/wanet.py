"""WaNet: an imperceptible smooth warp of the image (Nguyen & Tran, "WaNet", ICLR 2021).

A random ``warp_grid x warp_grid`` field of 2-D offsets in [-1, 1], divided by its mean
absolute value (as in the official code), is upsampled bicubically to the image size;
each pixel is sampled from ``position + warp_strength * offset`` with positions in units
of the image side (so the warp is the same shape at any size) and the sampling grid
clamped to the image (``grid_sample``, bilinear). The paper's k = 4, s = 0.5 moves pixels
by ~0.25 px at 32 px; our default (8% of the side) moves them by ~2.6 px, which a
few-epoch implant picks up (5% gave ASR 42% in 4 epochs; see the plugin's docstring).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .base import REFERENCE_SIZE, Trigger


class WaNet(Trigger):
    kind = "wanet"
    option_keys = ("warp_grid", "warp_strength")

    @classmethod
    def draw(cls, params: Mapping[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
        k = int(params["warp_grid"])
        grid = torch.rand(2, k, k, generator=gen) * 2 - 1
        return {"grid": grid / grid.abs().mean()}

    def flow(self, height: int, width: int, device=None) -> torch.Tensor:
        """``[1, H, W, 2]`` sampling positions for ``grid_sample`` (x, y in [-1, 1])."""
        offsets = F.interpolate(self.tensors["grid"][None].to(device), size=(height, width),
                                mode="bicubic", align_corners=True)  # [1, 2, H, W]
        ys = torch.linspace(-1, 1, height, device=device)
        xs = torch.linspace(-1, 1, width, device=device)
        identity = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)[None]  # [1,H,W,2]
        # a displacement of s * side is 2 s in grid_sample's [-1, 1] coordinates
        flow = identity + 2 * float(self.params["warp_strength"]) * offsets.permute(0, 2, 3, 1)
        return flow.clamp(-1, 1)

    def apply(self, images: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        b, _, h, w = images.shape
        flow = self.flow(h, w, images.device).to(images.dtype).expand(b, -1, -1, -1)
        out = F.grid_sample(images, flow, mode="bilinear", padding_mode="border",
                            align_corners=True)
        return out.clamp(0, 1)

    def preview(self, size: int = REFERENCE_SIZE) -> torch.Tensor:
        # the warp made visible: a grid of lines, warped
        lines = torch.zeros(1, 3, size, size)
        step = max(2, size // 8)
        lines[..., ::step, :] = 1
        lines[..., :, ::step] = 1
        return self.apply(lines)[0]
