"""AVQI: how well attacked inputs hide among clean ones in a model's latent space.

The Adversarial Vulnerability Quality Index (ALKALI / GRACE, 2025) scores "latent
camouflage": attacked inputs whose representations sit inside the clean ones' cluster are
hard to tell apart, and the model is vulnerable to them. The paper gives no formula; its
sibling metric AQI combines four cluster-validity indices on stochastic 3-D projections,
normalised relative to the groups compared. mmsec's AVQI is absolute and deterministic:

Two clusters, clean ``C`` and attacked ``A``, of raw feature vectors (a layer's pooled
activations or the final embedding; the first ``max_items`` of each, no projection, no
sampling). With centroids ``mu_C``, ``mu_A``, the grand centroid ``mu``, ``d(.,.)``
Euclidean:

- Davies-Bouldin ``DB = (s_C + s_A) / d(mu_C, mu_A)``, ``s`` the mean distance to the
  own centroid; term ``DB / (1 + DB)``;
- Dunn (nearest-neighbour form) ``D = median_x nn_other(x) / nn_same(x)``, each point's
  distance to its nearest neighbour in the other cluster over that in its own (through the
  shared :class:`~mmsec.search.VectorIndex`); term ``1 / max(D, 1)`` (an other-cluster
  neighbour no farther than an own-cluster one is complete camouflage);
- Xie-Beni ``XB = sum_x d(x, mu_own)^2 / (n d(mu_C, mu_A)^2)``; term ``XB / (1 + XB)``;
- Calinski-Harabasz ``CH = (B / (k - 1)) / (W / (n - k))`` with between / within
  dispersions ``B``, ``W`` and ``k = 2``; term ``CH/(CH + n - k)`` subtracted from 1, i.e.
  ``W / (B + W)``.

``avqi`` is the mean of the four terms: in [0, 1], **higher = more vulnerable** (attacked
inputs camouflaged among clean ones); ~0 for clusters far apart and tight, 1 when the two
clusters share a centroid. Every index is invariant to translating and uniformly scaling
the features, so layers of different widths and scales are comparable.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .search import VectorIndex

__all__ = ["AVQI_ITEMS", "avqi", "avqi_components", "layer_avqi"]

#: Items of each cluster used (the first ones; deterministic).
AVQI_ITEMS = 2000


def _nearest_distances(queries: torch.Tensor, db: torch.Tensor, *, same: bool) -> torch.Tensor:
    """Euclidean distance of each query to its nearest row of ``db`` (excluding itself when
    ``same``), through an inner-product index: with rows ``[b, -|b|^2/2]`` and queries
    ``[q, 1]`` the score is ``-(|q - b|^2 - |q|^2) / 2``, so the largest is the nearest."""
    q = torch.cat([queries, torch.ones(len(queries), 1, dtype=queries.dtype)], 1)
    b = torch.cat([db, -0.5 * (db * db).sum(1, keepdim=True)], 1)
    index = VectorIndex(b, normalize=False, device="cpu", kind="exact")  # a metric: exact
    scores, idx = index.knn(q, 2 if same else 1)
    if same:  # the nearest is the point itself unless an exact duplicate came first
        own = torch.arange(len(queries))
        pick = torch.where(idx[:, 0] == own, 1, 0)
        scores = scores.gather(1, pick[:, None])
    d2 = (queries * queries).sum(1) - 2 * scores[:, 0]
    return d2.clamp_min(0).sqrt()


def avqi_components(clean: torch.Tensor, attacked: torch.Tensor, *,
                    max_items: int = AVQI_ITEMS) -> dict[str, float]:
    """The four indices, their bounded terms and ``avqi`` (see the module doc) for
    ``clean [N, D]`` and ``attacked [M, D]`` (N, M >= 2)."""
    c = clean[:max_items].detach().double().cpu()
    a = attacked[:max_items].detach().double().cpu()
    if c.ndim != 2 or a.ndim != 2 or c.shape[1] != a.shape[1]:
        raise ValueError(f"expected [N, D] and [M, D], got {tuple(clean.shape)} and "
                         f"{tuple(attacked.shape)}")
    if len(c) < 2 or len(a) < 2:
        raise ValueError("AVQI needs at least 2 clean and 2 attacked items")
    # translation and scale do not change any index: centre and scale for numerics
    shift = c.mean(0)
    scale = (c - shift).norm(dim=1).mean().clamp_min(1e-12)
    c, a = (c - shift) / scale, (a - shift) / scale
    mc, ma = c.mean(0), a.mean(0)
    n = len(c) + len(a)
    sep = float((mc - ma).norm())
    dc, da = (c - mc).norm(dim=1), (a - ma).norm(dim=1)
    within = float((dc ** 2).sum() + (da ** 2).sum())
    eps = 1e-12
    db = float(dc.mean() + da.mean()) / sep if sep > eps else float("inf")
    xb = within / (n * sep ** 2) if sep > eps else float("inf")
    mu = torch.cat([c, a]).mean(0)
    between = float(len(c) * (mc - mu).norm() ** 2 + len(a) * (ma - mu).norm() ** 2)
    ch = (between / 1) / (within / (n - 2)) if within > eps else float("inf")
    c32, a32 = c.float(), a.float()
    ratio = torch.cat([
        _nearest_distances(c32, a32, same=False) / _nearest_distances(c32, c32, same=True)
        .clamp_min(1e-9),
        _nearest_distances(a32, c32, same=False) / _nearest_distances(a32, a32, same=True)
        .clamp_min(1e-9)])
    dunn = float(ratio.median())

    def bounded(x: float) -> float:
        return 1.0 if x == float("inf") else x / (1 + x)

    terms = {"db_term": bounded(db), "dunn_term": 1.0 / max(dunn, 1.0),
             "xb_term": bounded(xb),
             "ch_term": 0.0 if ch == float("inf") else 1.0 - ch / (ch + n - 2)}
    return {"avqi": sum(terms.values()) / 4, **terms, "davies_bouldin": db, "dunn": dunn,
            "xie_beni": xb, "calinski_harabasz": ch}


def avqi(clean: torch.Tensor, attacked: torch.Tensor, *, max_items: int = AVQI_ITEMS) -> float:
    """AVQI of ``attacked`` vs ``clean`` features: in [0, 1], higher = more vulnerable."""
    return avqi_components(clean, attacked, max_items=max_items)["avqi"]


def layer_avqi(clean: Mapping[str, torch.Tensor], attacked: Mapping[str, torch.Tensor], *,
               max_items: int = AVQI_ITEMS) -> dict[str, float]:
    """AVQI per layer for ``{layer: [N, C]}`` clean and attacked pooled features (the layers
    both have, in ``clean``'s order)."""
    return {name: avqi(clean[name], attacked[name], max_items=max_items)
            for name in clean if name in attacked}
