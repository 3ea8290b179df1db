"""Local outlier scores over embeddings, from k-nearest-neighbour distances.

Huang et al., "Detecting Backdoor Samples in Contrastive Language Image Pretraining"
(ICLR 2025; github HanxunH/Detect-CLIP-Backdoor-Samples) score every training image by
the shape of its neighbourhood among the other training images' CLIP embeddings. With
``d_1 <= ... <= d_k`` the Euclidean distances of ``x`` to its k nearest neighbours (itself
left out) and ``N_k(x)`` those neighbours:

``k_distance``   ``d_k``: sparse neighbourhoods score high.
``lid``          maximum-likelihood local intrinsic dimensionality (Levina & Bickel 2004,
                 Amsaleg et al. 2015): ``-k / sum_i ln(d_i / d_k)``.
``slof``         simplified local outlier factor: mean over ``o in N_k(x)`` of
                 ``d_k(x) / d_k(o)``.
``dao``          dimensionality-aware outlier score (Anderberg et al. 2024), in the
                 official code's log form: mean over ``o in N_k(x)`` of
                 ``LID(o) * ln(d_k(x) / d_k(o))``.
``density``      ``-ln d_k``: k-distance in the opposite direction (dense neighbourhoods
                 score high). Not in the paper: when the poisoned pairs outnumber k in the
                 reference set, a trigger that pulls its images together makes them the
                 densest items (the backdoor plugin's implants here: README).

For every score a higher value means more suspicious (the paper's direction for the first
four). Embeddings
are L2-normalised (cosine geometry, as the shared index searches), so ``d = sqrt(2 - 2 cos)``.
The official code takes ``d_{k+1}`` as the k-distance (k ratios over k+1 neighbours) and
searches within each batch; here the k-th neighbour is the k-distance and the neighbours
come from a reference set (all items, or a seeded sample of them: see ``neighbourhoods``).

Neighbours come from the shared vector index (``mmsec.VectorIndex``: FAISS when installed,
else exact torch search), queried in chunks so memory stays ``O(N k)`` beyond the vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mmsec import UsageError, VectorIndex, metrics

__all__ = ["SCORES", "Neighbourhoods", "auroc", "misalignment", "neighbourhoods", "recall_at",
           "score_all"]

SCORES = ("k_distance", "lid", "slof", "dao", "density")
"""The scores ``score_all`` computes; higher is more suspicious for each."""

_CHUNK = 16384  # queries per index search


@dataclass
class Neighbourhoods:
    """k nearest reference neighbours of every item and of every reference item.

    Attributes:
        dist: ``[N, k]`` float32 ascending Euclidean distances (unit vectors), self excluded.
        idx: ``[N, k]`` int64 rows of the reference set.
        ref_dist: ``[M, k]`` the same for each reference item among the reference set.
        reference: ``[M]`` int64 rows of the items that form the reference set.
    """

    dist: torch.Tensor
    idx: torch.Tensor
    ref_dist: torch.Tensor
    reference: torch.Tensor

    @property
    def k(self) -> int:
        return int(self.dist.shape[1])


def _search(index: VectorIndex, vectors: torch.Tensor, self_row: torch.Tensor, k: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest index rows of ``vectors`` leaving out ``self_row`` (-1: not in the index)."""
    n = vectors.shape[0]
    dist = torch.empty(n, k, dtype=torch.float32)
    idx = torch.empty(n, k, dtype=torch.long)
    for s in range(0, n, _CHUNK):
        sims, rows = index.knn(vectors[s:s + _CHUNK], k + 1)
        sims, rows = sims.cpu(), rows.cpu()
        own = self_row[s:s + _CHUNK, None]
        drop = rows == own
        # rows whose own vector did not come back (not in the index, or tied beyond k+1):
        # drop the farthest instead; a row drops exactly one column either way
        none = ~drop.any(1)
        drop[none, -1] = True
        first = drop.float().argmax(1, keepdim=True)
        keep = torch.ones_like(drop)
        keep.scatter_(1, first, False)
        sims = sims[keep].view(-1, k)
        idx[s:s + _CHUNK] = rows[keep].view(-1, k)
        dist[s:s + _CHUNK] = (2 - 2 * sims).clamp_min(0).sqrt()
    return dist, idx


def neighbourhoods(vectors: torch.Tensor | np.ndarray, k: int, *, reference: int | None = None,
                   seed: int = 0, backend: str | None = None,
                   device: torch.device | str | None = None,
                   kind: str = "exact") -> Neighbourhoods:
    """The k nearest neighbours of every row of ``vectors`` among a reference set.

    Args:
        vectors: ``[N, D]`` embeddings (normalised here).
        k: neighbours per item, ``1 <= k < min(N, reference)``.
        reference: size of the reference set, a seeded random sample of the items (the
            official code's reference is the batch); None or >= N: every item (exact kNN).
        seed: the sample's seed.
        backend, device, kind: passed to ``mmsec.VectorIndex``; ``kind`` is ``"exact"`` by
            default (the scores follow the official exact kNN); ``"auto"``, ``"ivf"`` or
            ``"hnsw"`` trade recall@10 >= 0.95 for speed on large sets.
    """
    x = vectors if isinstance(vectors, torch.Tensor) else torch.from_numpy(np.asarray(vectors))
    if x.ndim != 2:
        raise UsageError(f"scan: expected embeddings of shape [N, D], got {tuple(x.shape)}")
    n = int(x.shape[0])
    x = torch.nn.functional.normalize(x.float(), dim=1)
    m = n if reference is None or reference >= n else int(reference)
    if k < 1 or k >= m:
        raise UsageError(f"scan: k={k} needs at least k+1 items in the reference set "
                         f"({m} of {n} items)")
    if m == n:
        ref = torch.arange(n)
    else:
        gen = torch.Generator().manual_seed(int(seed))
        ref = torch.randperm(n, generator=gen)[:m].sort().values
    index = VectorIndex(x[ref], backend=backend, device=device, kind=kind)
    self_row = torch.full((n,), -1, dtype=torch.long)
    self_row[ref] = torch.arange(m)
    dist, idx = _search(index, x, self_row, k)
    ref_dist = dist[ref]
    return Neighbourhoods(dist, idx, ref_dist, ref)


def _lid(dist: torch.Tensor) -> torch.Tensor:
    """MLE LID per row of ascending distances ``[N, k]`` (0 where the k-distance is 0)."""
    dk = dist[:, -1:]
    ratio = (dist / dk.clamp_min(1e-12)).clamp(1e-12, 1.0)
    total = torch.log(ratio).sum(1)
    k = dist.shape[1]
    # all k neighbours at one distance: an infinitely "dimensional" neighbourhood; cap it
    lid = torch.where(total < 0, -k / total.clamp_max(-1e-12), torch.full_like(total, 1e6))
    return torch.where(dk[:, 0] > 0, lid, torch.zeros_like(lid))


def score_all(nb: Neighbourhoods) -> dict[str, torch.Tensor]:
    """Every score of ``SCORES`` per item, ``[N]`` float32 each (higher: more suspicious)."""
    kdist = nb.dist[:, -1]
    ref_kdist = nb.ref_dist[:, -1]
    ref_lid = _lid(nb.ref_dist)
    nb_kdist = ref_kdist[nb.idx]  # [N, k]
    safe = nb_kdist.clamp_min(1e-12)
    ratio = kdist[:, None].clamp_min(1e-12) / safe
    out = {
        "k_distance": kdist,
        "lid": _lid(nb.dist),
        "slof": ratio.mean(1),
        "dao": (ref_lid[nb.idx] * torch.log(ratio)).mean(1),
        "density": -torch.log(kdist.clamp_min(1e-12)),
    }
    return {name: torch.nan_to_num(v, nan=0.0, posinf=1e6, neginf=-1e6).float()
            for name, v in out.items()}


def misalignment(images: torch.Tensor, texts: torch.Tensor, owner: torch.Tensor,
                 caption: torch.Tensor, n: int) -> torch.Tensor:
    """Minus the mean cosine similarity of each item's image to its captions (the paper's
    CLIPScore baseline, negated so that higher is more suspicious), ``[n]``.

    Args:
        images: ``[n, D]`` image embeddings; texts: ``[T, D]`` caption embeddings.
        owner, caption: ``[P]`` one (item, caption row) per image-caption pair.
    Items without a caption get the lowest score.
    """
    img = torch.nn.functional.normalize(images.float(), dim=1)
    txt = torch.nn.functional.normalize(texts.float(), dim=1)
    cos = (img[owner] * txt[caption]).sum(1)
    total = torch.zeros(n).index_add_(0, owner, cos)
    count = torch.bincount(owner, minlength=n).float()
    out = -total / count.clamp_min(1)
    return torch.where(count > 0, out, torch.full_like(out, -2.0))


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """``mmsec.metrics.auroc``, with scan's error when a class is missing."""
    try:
        return metrics.auroc(scores, positive)
    except ValueError as exc:
        raise UsageError(f"scan: {exc}") from exc


def recall_at(scores: torch.Tensor, positive: torch.Tensor, rate: float) -> float:
    """Share of the positives among the ``ceil(rate * N)`` highest-scoring items."""
    y = positive.bool().cpu()
    n_pos = int(y.sum())
    if not n_pos:
        raise UsageError("scan: recall needs positive items")
    top = int(np.ceil(rate * len(scores)))
    order = torch.argsort(scores.cpu(), descending=True, stable=True)[:top]
    return float(y[order].sum()) / n_pos
