"""AdvCLIP's topology-deviation terms: fuzzy neighbourhood graphs and their divergence.

A graph row describes how one sample sits among its neighbours: cosine
similarities to them, shifted so that the nearest neighbour is at distance 0
(UMAP's ``rho``), mapped to [0, 1] and normalised to sum to 1 over the row.
Two graphs over the same nodes are compared with the fuzzy-set cross-entropy
``CE(P, Q) = KL(P || Q) + KL(1 - P || 1 - Q)``, summed over the entries (as
the official code sums it). The attack maximises it.

Two ways to choose the neighbours:

- ``batch_graph`` (``topology: batch``, the official code): every other sample
  of the mini-batch, ``[B, B]``.
- ``knn_rows`` (``topology: knn``): each sample's ``k`` nearest neighbours over
  the training images (the sample, or the whole train split with ``knn_pool:
  split``), looked up once in the embedding index, ``[B, k]``.
  The neighbours' clean image embeddings and caption embeddings are constants;
  a patched image's row holds its similarities to its clean neighbours, i.e.
  where the patched image now sits in the clean neighbourhood structure that
  a kNN classifier or a retrieval index searches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-7


def fuzzy_rows(sims: torch.Tensor, self_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Row-normalised fuzzy graph from cosine similarities ``[B, K]``.

    ``d = 1 - s``; each row's smallest distance to another node is subtracted
    (``self_mask`` marks a node's own entry, which is excluded from that minimum
    and set to distance 0); the similarity ``1 - d`` is mapped to [0, 1] by
    ``(x + 1) / 2`` and the row is normalised to sum to 1.
    """
    dist = 1 - sims
    if self_mask is not None:
        dist = dist.masked_fill(self_mask, 3.0)  # larger than any cosine distance
    dist = dist - dist.min(dim=1, keepdim=True).values
    if self_mask is not None:
        dist = dist.masked_fill(self_mask, 0.0)
    sim = (2 - dist) / 2
    return sim / sim.sum(dim=1, keepdim=True)


def fuzzy_cross_entropy(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``KL(P || Q) + KL(1 - P || 1 - Q)`` summed over all entries (a 0-d tensor)."""
    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * ((a + EPS).log() - (b + EPS).log())).sum()

    return kl(p, q) + kl(1 - p, 1 - q)


def batch_graph(emb: torch.Tensor) -> torch.Tensor:
    """In-batch graph ``[B, B]`` of embeddings ``[B, D]`` (normalised here)."""
    emb = F.normalize(emb, dim=-1)
    eye = torch.eye(emb.shape[0], dtype=torch.bool, device=emb.device)
    return fuzzy_rows(emb @ emb.t(), eye)


def knn_rows(query: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """Graph rows ``[B, k]`` of ``query`` ``[B, D]`` against its own ``neighbours`` ``[B, k, D]``."""
    query, neighbours = F.normalize(query, dim=-1), F.normalize(neighbours, dim=-1)
    return fuzzy_rows(torch.einsum("bd,bkd->bk", query, neighbours))


def topology_terms(mode: str, clean: torch.Tensor, adv: torch.Tensor, text: torch.Tensor | None,
                   nb_clean: torch.Tensor | None = None, nb_text: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two deviation terms ``(image, text)`` to be maximised.

    ``image``: the patched images' graph against the clean images' graph;
    ``text``: the captions' graph against the patched images' graph (the argument
    order of the official code). ``text`` is None when there is no text: its term
    is then 0. In ``knn`` mode the rows are over each sample's neighbours
    (``nb_clean`` / ``nb_text``: ``[B, k, D]`` clean image / caption embeddings of
    the neighbours); in ``batch`` mode over the mini-batch.
    """
    zero = adv.new_zeros(())
    if mode == "batch":
        g_adv = batch_graph(adv)
        img = fuzzy_cross_entropy(g_adv, batch_graph(clean))
        txt = fuzzy_cross_entropy(batch_graph(text), g_adv) if text is not None else zero
        return img, txt
    if nb_clean is None:
        raise ValueError("knn topology needs the neighbours' embeddings")
    g_adv = knn_rows(adv, nb_clean)
    img = fuzzy_cross_entropy(g_adv, knn_rows(clean, nb_clean))
    if text is None or nb_text is None:
        return img, zero
    return img, fuzzy_cross_entropy(knn_rows(text, nb_text), g_adv)
