"""GRACE's trainable part: a layer-attention latent, a two-prototype detector and a gated
embedding restorer, all reading the frozen model's pooled layer activations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GraceNet"]


class GraceNet(nn.Module):
    """``widths``: ``{layer: channels}`` of the image layers read (input to output order).

    - each layer's pooled activation is standardised with the clean statistics
      (:meth:`set_stats`), projected to ``dim`` and L2-normalised: ``u_l``;
    - the latent is ``z = sum_l softmax(a)_l u_l`` with learned attention logits ``a`` (the
      layer-attention profile);
    - the detector score is ``(cos(z, p_adv) - cos(z, p_clean)) / temperature`` for two
      learned prototypes, plus ``softplus(w) * sum_l softmax(a)_l m_l``, where ``m_l`` is the
      layer's Mahalanobis distance to the clean activations (shrunk covariance), z-scored
      on clean items: a logit, > 0 leans attacked. The Mahalanobis channel is what lets the
      detector flag what it never saw (an input far from every clean one), the prototypes
      what it was shown;
    - the restorer adds ``sigmoid(score) * MLP([u_1..u_L, e])`` to the normalised image
      embedding ``e`` (zero at initialisation, so the model starts unchanged).
    """

    def __init__(self, widths: Mapping[str, int], embed_dim: int, dim: int = 64,
                 hidden: int = 256, temperature: float = 0.1) -> None:
        super().__init__()
        self.names = list(widths)
        self.widths = {k: int(v) for k, v in widths.items()}
        self.embed_dim, self.dim, self.hidden = int(embed_dim), int(dim), int(hidden)
        self.temperature = float(temperature)
        n = len(self.names)
        self.proj = nn.ModuleList(nn.Linear(self.widths[k], dim) for k in self.names)
        for i, k in enumerate(self.names):
            self.register_buffer(f"mean{i}", torch.zeros(self.widths[k]))
            self.register_buffer(f"std{i}", torch.ones(self.widths[k]))
            self.register_buffer(f"precision{i}", torch.eye(self.widths[k]))
        self.register_buffer("maha_mean", torch.zeros(n))
        self.register_buffer("maha_std", torch.ones(n))
        self.anomaly_weight = nn.Parameter(torch.tensor(0.5413))  # softplus -> 1
        self.attention = nn.Parameter(torch.zeros(n))
        self.prototypes = nn.Parameter(F.normalize(torch.randn(2, dim), dim=-1))
        self.restorer = nn.Sequential(nn.Linear(n * dim + embed_dim, hidden), nn.GELU(),
                                      nn.Linear(hidden, embed_dim))
        nn.init.zeros_(self.restorer[2].weight)
        nn.init.zeros_(self.restorer[2].bias)

    def spec(self) -> dict[str, Any]:
        """What rebuilds this module (its weights aside)."""
        return {"widths": self.widths, "embed_dim": self.embed_dim, "dim": self.dim,
                "hidden": self.hidden, "temperature": self.temperature, "names": self.names}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> GraceNet:
        widths = {k: int(spec["widths"][k]) for k in spec.get("names", spec["widths"])}
        return cls(widths, spec["embed_dim"], spec["dim"], spec["hidden"], spec["temperature"])

    @torch.no_grad()
    def set_stats(self, layers: Mapping[str, torch.Tensor], shrinkage: float = 0.1) -> None:
        """Clean statistics from pooled activations ``{layer: [N, C]}``: per-channel mean and
        std, and the precision of the standardised activations' covariance shrunk towards
        the identity (``(1 - shrinkage) * cov + shrinkage * I``), then the clean items' own
        Mahalanobis distances' mean and std per layer."""
        for i, k in enumerate(self.names):
            a = layers[k].float()
            getattr(self, f"mean{i}").copy_(a.mean(0))
            getattr(self, f"std{i}").copy_(a.std(0).clamp_min(1e-4))
            z = (a - a.mean(0)) / getattr(self, f"std{i}")
            cov = z.t() @ z / max(1, len(z) - 1)
            eye = torch.eye(len(cov), device=cov.device)
            getattr(self, f"precision{i}").copy_(
                torch.linalg.inv((1 - shrinkage) * cov + shrinkage * eye))
        m = self.mahalanobis(layers, standardise=False)
        self.maha_mean.copy_(m.mean(0))
        self.maha_std.copy_(m.std(0).clamp_min(1e-6))

    def mahalanobis(self, layers: Mapping[str, torch.Tensor], standardise: bool = True
                    ) -> torch.Tensor:
        """``[N, L]``: each layer's Mahalanobis distance to the clean activations (per
        channel, sqrt of the quadratic form / width), z-scored on clean items."""
        cols = []
        for i, k in enumerate(self.names):
            z = (layers[k].float() - getattr(self, f"mean{i}")) / getattr(self, f"std{i}")
            q = ((z @ getattr(self, f"precision{i}")) * z).sum(1)
            cols.append((q.clamp_min(0) / z.shape[1]).sqrt())
        m = torch.stack(cols, 1)
        return (m - self.maha_mean) / self.maha_std if standardise else m

    def profile(self) -> torch.Tensor:
        """The layer-attention weights ``[L]`` (sum to 1)."""
        return torch.softmax(self.attention, 0)

    def parts(self, layers: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, k in enumerate(self.names):
            a = layers[k].float()
            a = (a - getattr(self, f"mean{i}")) / getattr(self, f"std{i}")
            out.append(F.normalize(self.proj[i](a), dim=-1))
        return out

    def latent(self, layers: Mapping[str, torch.Tensor],
               parts: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        parts = self.parts(layers) if parts is None else parts
        w = self.profile()
        return sum(w[i] * p for i, p in enumerate(parts))

    def score_latent(self, z: torch.Tensor, layers: Mapping[str, torch.Tensor]) -> torch.Tensor:
        cos = F.normalize(z, dim=-1) @ F.normalize(self.prototypes, dim=-1).t()
        anomaly = self.mahalanobis(layers) @ self.profile()
        return (cos[:, 1] - cos[:, 0]) / self.temperature \
            + F.softplus(self.anomaly_weight) * anomaly

    def score(self, layers: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Detector logits ``[N]``: higher = more likely attacked."""
        return self.score_latent(self.latent(layers), layers)

    def restore(self, embedding: torch.Tensor, layers: Mapping[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(restored embedding [N, D] (not normalised), detector logits [N])``."""
        e = F.normalize(embedding.float(), dim=-1)
        parts = self.parts(layers)
        s = self.score_latent(self.latent(layers, parts), layers)
        corr = self.restorer(torch.cat([*parts, e], dim=-1))
        return e + torch.sigmoid(s)[:, None] * corr, s

    def forward(self, embedding: torch.Tensor, layers: Mapping[str, torch.Tensor]
                ) -> torch.Tensor:
        """The adapter of :class:`mmsec.AdaptedModel`: the restored embedding."""
        return self.restore(embedding, layers)[0]
