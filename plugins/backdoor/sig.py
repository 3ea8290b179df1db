"""SIG: a sinusoidal signal added to the image (Barni et al., "A New Backdoor Attack in
CNNs by Training Set Corruption Without Label Poisoning", 2019).

``x' = clip(x + sig_delta * sin(2 pi (sig_freq * u + phase)))`` with ``u`` the position
along direction ``angle`` as a fraction of the image side (``angle = 0``: the paper's
horizontal ramp, stripes vertical), so the signal has ``sig_freq`` periods per image at
any size. The paper uses delta 20/255 and 6 periods; our default amplitude is larger
(see the plugin's docstring) because the implant has a few epochs, not hundreds.
The trigger has no random part; its control has a random direction and phase.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .base import REFERENCE_SIZE, Trigger


class Sig(Trigger):
    kind = "sig"
    option_keys = ("sig_delta", "sig_freq")

    @classmethod
    def draw(cls, params: Mapping[str, Any], gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {}

    def control(self, seed: int) -> Trigger:
        gen = torch.Generator().manual_seed(seed + 7919)
        angle, phase = torch.rand(2, generator=gen).tolist()
        return Sig({**self.params, "angle": 0.25 + 0.5 * angle, "phase": phase}, {})

    def signal(self, height: int, width: int, device=None) -> torch.Tensor:
        """``[H, W]``: the additive signal at this size."""
        theta = math.pi * float(self.params.get("angle", 0.0))
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
        u = math.cos(theta) * xs[None, :] + math.sin(theta) * ys[:, None]
        phase = float(self.params.get("phase", 0.0))
        return self.params["sig_delta"] * torch.sin(2 * math.pi * (self.params["sig_freq"] * u
                                                                    + phase))

    def apply(self, images: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        h, w = images.shape[-2:]
        return (images + self.signal(h, w, images.device).to(images.dtype)).clamp(0, 1)

    def preview(self, size: int = REFERENCE_SIZE) -> torch.Tensor:
        s = self.signal(size, size)
        return (0.5 + s / (2 * max(1e-6, float(self.params["sig_delta"])))).clamp(0, 1).expand(
            3, -1, -1)
