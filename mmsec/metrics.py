"""Evaluation metrics shared by every attack and defense.

Conventions used throughout this module:

* Inputs are ``torch.Tensor`` objects on any device; every computation runs on the device of
  the first tensor argument (other tensors are moved there).
* Scalar results are plain Python ``float``; rates and accuracies are fractions in ``[0, 1]``
  (not percentages).
* Embeddings are compared by cosine similarity: every function that takes embeddings
  L2-normalises them itself, so raw model outputs can be passed directly.
* Half-precision inputs are up-cast to ``float32``; ``float64`` inputs stay ``float64``.
* Ties are broken deterministically in favour of the **lower index**, matching
  :func:`torch.argmax` (which returns the first maximal index). This applies to top-k accuracy,
  kNN votes and retrieval ranks, so e.g. ``topk_accuracy(..., ks=(1,))["top1"]`` always equals
  ``clean_accuracy(logits.argmax(1), labels)``.
* Large similarity matrices are never materialised: row blocks of ``chunk_size`` queries are
  processed at a time, so peak extra memory is about ``chunk_size * M * 4`` bytes for ``M``
  gallery items (``DEFAULT_CHUNK_SIZE * 100_000 * 4`` bytes = 400 MB at the defaults).
* All functions run under :func:`torch.no_grad`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "alignment",
    "attack_success_rate",
    "auroc",
    "clean_accuracy",
    "fooling_rate",
    "knn_accuracy",
    "knn_fooling_rate",
    "knn_predict",
    "retrieval_asr",
    "retrieval_hits",
    "retrieval_recall",
    "topk_accuracy",
    "uniformity",
    "zero_shot_logits",
]

#: Default number of query rows per block in chunked similarity computations.
DEFAULT_CHUNK_SIZE = 1024


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _float(x: Tensor) -> Tensor:
    """Up-cast half/bfloat16/integer tensors to float32; keep float32/float64 as they are."""
    if x.dtype in (torch.float32, torch.float64):
        return x
    return x.float()


def _normalize(x: Tensor) -> Tensor:
    """L2-normalise the rows of ``x`` ``[N, D]`` (float32 or float64)."""
    return F.normalize(_float(x.detach()), dim=-1)


def _check_2d(name: str, x: Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(x.shape)}")


def _check_1d_same(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.dim() != 1 or b.dim() != 1 or a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must be 1-D with the same length, "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.numel() == 0:
        raise ValueError(f"{name_a} and {name_b} are empty")


def _check_chunk(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _rank_of(scores: Tensor, target_idx: Tensor) -> Tensor:
    """0-based rank of ``scores[i, target_idx[i]]`` within row ``i`` of ``scores`` ``[R, M]``.

    Rank = number of entries strictly greater, plus the number of equal entries with a lower
    index (ties broken in favour of the lower index, like :func:`torch.argmax`). NaN scores
    rank last, and a NaN target gets the largest long value (never a hit, whatever ``k``).
    Returns a ``[R]`` long tensor.
    """
    target_scores = scores.gather(1, target_idx[:, None])
    scores = scores.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    greater = (scores > target_scores).sum(dim=1)
    cols = torch.arange(scores.shape[1], device=scores.device)
    equal_before = ((scores == target_scores) & (cols[None, :] < target_idx[:, None])).sum(dim=1)
    rank = greater + equal_before
    return rank.masked_fill(target_scores.squeeze(1).isnan(), torch.iinfo(torch.long).max)


_NEVER = torch.iinfo(torch.long).max


def _masked_sims(queries: Tensor, gallery: Tensor, bad_gallery: Tensor | None) -> Tensor:
    """``queries @ gallery.T`` with the ``bad_gallery`` columns (non-finite items, zeroed by
    the caller) at ``-inf``: ranked last, as :func:`_rank_of` ranks NaN scores."""
    sims = queries @ gallery.T
    if bad_gallery is not None:
        sims[:, bad_gallery] = float("-inf")
    return sims


def _topk_rank(scores: Tensor, target_idx: Tensor, k: int) -> Tensor:
    """:func:`_rank_of` clipped to ``k`` (ranks ``>= k`` read ``k``) from one top-``k`` pass.

    A target scoring above the ``k``-th score has every score ``>=`` its own inside the top
    ``k``, so its rank is counted there (ties: the equal scores of lower index); one scoring
    below it ranks ``>= k``; one scoring exactly the ``k``-th score (a tie across the cut,
    rare) is ranked on its whole row. ``scores`` ``[R, M]`` must hold no NaN.
    """
    if k >= scores.shape[1]:
        return _rank_of(scores, target_idx)
    target = scores.gather(1, target_idx[:, None])
    vals, idx = scores.topk(k, dim=1, sorted=False)
    rank = (vals > target).sum(dim=1) + ((vals == target) & (idx < target_idx[:, None])).sum(dim=1)
    cut = vals.min(dim=1).values == target.squeeze(1)
    if bool(cut.any()):
        rows = cut.nonzero().squeeze(1)
        rank[rows] = _rank_of(scores[rows], target_idx[rows]).clamp(max=k)
    return rank


# --------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def zero_shot_logits(image_emb: Tensor, class_emb: Tensor) -> Tensor:
    """Cosine-similarity logits between images and class (text prompt) embeddings.

    Args:
        image_emb: ``[N, D]`` image embeddings (normalised here).
        class_emb: ``[C, D]`` class embeddings, e.g. averaged prompt embeddings (normalised
            here).

    Returns:
        ``[N, C]`` cosine similarities in ``[-1, 1]`` (no temperature / logit scale applied),
        on ``image_emb``'s device; ``argmax(dim=1)`` gives the zero-shot prediction.
    """
    _check_2d("image_emb", image_emb)
    _check_2d("class_emb", class_emb)
    if image_emb.shape[1] != class_emb.shape[1]:
        raise ValueError(
            f"embedding sizes differ: image_emb D={image_emb.shape[1]}, "
            f"class_emb D={class_emb.shape[1]}"
        )
    img = _normalize(image_emb)
    cls = _normalize(class_emb.to(img.device)).to(img.dtype)
    return img @ cls.T


@torch.no_grad()
def topk_accuracy(logits: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k classification accuracy.

    A sample counts as correct at ``k`` when its true class is among the ``k`` highest logits.
    Ties are broken in favour of the lower class index (consistent with ``argmax``). A ``k``
    larger than the number of classes ``C`` is clamped to ``C`` (always correct), but the key
    keeps the requested ``k``.

    Args:
        logits: ``[N, C]`` scores (any monotone score works: logits, probabilities, cosines).
        labels: ``[N]`` integer class indices in ``[0, C)``.
        ks: the values of ``k`` to report, each ``>= 1``.

    Returns:
        ``{"top{k}": fraction in [0, 1]}`` for each ``k`` in ``ks``, e.g. ``{"top1": 0.75,
        "top5": 1.0}``.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [N, C], got shape {tuple(logits.shape)}")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must be 1-D of length N={logits.shape[0]}, got shape {tuple(labels.shape)}"
        )
    n, c = logits.shape
    if n == 0:
        raise ValueError("logits is empty")
    labels = labels.to(logits.device).long()
    if bool((labels < 0).any()) or bool((labels >= c).any()):
        raise ValueError(f"labels must lie in [0, {c})")
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {tuple(ks)}")
    rank = _rank_of(logits, labels)
    return {f"top{k}": (rank < min(int(k), c)).float().mean().item() for k in ks}


@torch.no_grad()
def clean_accuracy(pred: Tensor, labels: Tensor) -> float:
    """Share of predictions equal to the labels.

    Args:
        pred: ``[N]`` predicted class indices.
        labels: ``[N]`` true class indices.

    Returns:
        Accuracy as a fraction in ``[0, 1]``.
    """
    _check_1d_same("pred", pred, "labels", labels)
    return (pred == labels.to(pred.device)).float().mean().item()


@torch.no_grad()
def fooling_rate(clean_pred: Tensor, adv_pred: Tensor) -> float:
    """Share of predictions that change under attack (regardless of correctness).

    Args:
        clean_pred: ``[N]`` predictions on clean inputs.
        adv_pred: ``[N]`` predictions on the corresponding adversarial inputs.

    Returns:
        Fraction in ``[0, 1]`` of positions where ``clean_pred != adv_pred``.
    """
    _check_1d_same("clean_pred", clean_pred, "adv_pred", adv_pred)
    return (clean_pred != adv_pred.to(clean_pred.device)).float().mean().item()


@torch.no_grad()
def attack_success_rate(pred_triggered: Tensor, labels: Tensor, target: int) -> float:
    """Targeted (backdoor) attack success rate.

    Only images whose true label is *not* the target class are counted; the rate is the share
    of them predicted as ``target``.

    Args:
        pred_triggered: ``[N]`` predictions on triggered / adversarial inputs.
        labels: ``[N]`` true labels of the (clean) inputs.
        target: the attacker's target class index.

    Returns:
        Fraction in ``[0, 1]``.

    Raises:
        ValueError: if every label equals ``target`` (no non-target item to evaluate).
    """
    _check_1d_same("pred_triggered", pred_triggered, "labels", labels)
    labels = labels.to(pred_triggered.device)
    keep = labels != target
    if not bool(keep.any()):
        raise ValueError(f"attack_success_rate: no item with a label other than target={target}")
    return (pred_triggered[keep] == target).float().mean().item()


# --------------------------------------------------------------------------------------------
# k-nearest-neighbour classification
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def knn_predict(
    query_emb: Tensor | None,
    bank_emb: Tensor | None,
    bank_labels: Tensor,
    k: int = 20,
    T: float = 0.07,
    num_classes: int | None = None,
    neighbors: tuple[Tensor, Tensor] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Weighted k-nearest-neighbour classifier (InstDisc / Wu et al. 2018 style).

    For each query, the ``k`` most cosine-similar bank items vote for their label with weight
    ``exp(sim / T)``; votes are summed per class and the class with the largest total wins
    (ties: lowest class index). Weights are computed as ``exp((sim - max_sim) / T)``, which
    scales each query's votes by a constant and so leaves the prediction unchanged while
    avoiding overflow.

    Args:
        query_emb: ``[N, D]`` query embeddings (normalised here). May be ``None`` when
            ``neighbors`` is given.
        bank_emb: ``[M, D]`` memory-bank embeddings (normalised here). May be ``None`` when
            ``neighbors`` is given.
        bank_labels: ``[M]`` integer labels of the bank items.
        k: number of neighbours (clamped to ``M`` when similarities are computed here).
        T: temperature of the vote weights.
        num_classes: number of classes ``C``; defaults to ``bank_labels.max() + 1``.
        neighbors: optional precomputed ``(sims [N, k'], idx [N, k'])``, e.g. from a FAISS
            inner-product index over normalised vectors. ``sims`` must be cosine similarities
            (higher = closer) and ``idx`` indices into ``bank_labels``; entries with
            ``idx < 0`` (FAISS's "no neighbour") or NaN ``sims`` are ignored. When given, no
            similarity is computed, ``query_emb``/``bank_emb`` are not used, and all ``k'``
            columns are used (``k`` is ignored).
        chunk_size: queries per block when computing similarities.

    Returns:
        ``[N]`` long tensor of predicted classes (on the device of ``query_emb``, or of
        ``neighbors[0]`` when neighbours are given); ``-1`` for a query without any valid
        neighbour (never equal to a label, so it counts as wrong / as changed).
    """
    if T <= 0:
        raise ValueError(f"T must be > 0, got {T}")
    if bank_labels.dim() != 1:
        raise ValueError(f"bank_labels must be 1-D, got shape {tuple(bank_labels.shape)}")
    if bank_labels.numel() == 0:
        raise ValueError("bank_labels is empty")
    if num_classes is None:
        num_classes = int(bank_labels.max().item()) + 1
    if int(bank_labels.min().item()) < 0 or int(bank_labels.max().item()) >= num_classes:
        raise ValueError(f"bank_labels must lie in [0, num_classes={num_classes})")

    if neighbors is not None:
        sims, idx = neighbors
        if sims.dim() != 2 or sims.shape != idx.shape:
            raise ValueError(
                f"neighbors must be (sims [N, k], idx [N, k]), got {tuple(sims.shape)} "
                f"and {tuple(idx.shape)}"
            )
        return _knn_vote(_float(sims), idx.to(sims.device), bank_labels, T, num_classes)

    if query_emb is None or bank_emb is None:
        raise ValueError("query_emb and bank_emb are required when neighbors is not given")
    _check_2d("query_emb", query_emb)
    _check_2d("bank_emb", bank_emb)
    if bank_emb.shape[0] != bank_labels.shape[0]:
        raise ValueError(
            f"bank_emb has {bank_emb.shape[0]} rows but bank_labels has {bank_labels.shape[0]}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _check_chunk(chunk_size)
    q = _normalize(query_emb)
    bank = _normalize(bank_emb.to(q.device)).to(q.dtype)
    k = min(k, bank.shape[0])
    preds = []
    for start in range(0, q.shape[0], chunk_size):
        sims = q[start : start + chunk_size] @ bank.T
        top_sims, top_idx = sims.topk(k, dim=1)
        preds.append(_knn_vote(top_sims, top_idx, bank_labels, T, num_classes))
    if not preds:
        return torch.empty(0, dtype=torch.long, device=q.device)
    return torch.cat(preds)


def _knn_vote(sims: Tensor, idx: Tensor, bank_labels: Tensor, T: float, num_classes: int) -> Tensor:
    """Sum ``exp(sim / T)`` votes per class over the neighbours; ``[N, k] -> [N]`` predictions."""
    valid = (idx >= 0) & ~sims.isnan()
    labels = bank_labels.to(sims.device).long()[idx.long().clamp(min=0)]
    masked = sims.masked_fill(~valid, float("-inf"))
    row_max = masked.max(dim=1, keepdim=True).values
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp((masked - row_max) / T)  # exp(-inf) = 0 for invalid neighbours
    votes = sims.new_zeros(sims.shape[0], num_classes)
    votes.scatter_add_(1, labels, weights)
    return votes.argmax(dim=1).masked_fill(~valid.any(dim=1), -1)


@torch.no_grad()
def knn_accuracy(
    query_emb: Tensor | None,
    query_labels: Tensor,
    bank_emb: Tensor | None,
    bank_labels: Tensor,
    k: int = 20,
    T: float = 0.07,
    num_classes: int | None = None,
    neighbors: tuple[Tensor, Tensor] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> float:
    """Accuracy of :func:`knn_predict` against ``query_labels`` ``[N]``; fraction in [0, 1].

    Other arguments are as in :func:`knn_predict`.
    """
    pred = knn_predict(
        query_emb,
        bank_emb,
        bank_labels,
        k=k,
        T=T,
        num_classes=num_classes,
        neighbors=neighbors,
        chunk_size=chunk_size,
    )
    return clean_accuracy(pred, query_labels)


@torch.no_grad()
def knn_fooling_rate(
    clean_emb: Tensor | None,
    adv_emb: Tensor | None,
    bank_emb: Tensor | None,
    bank_labels: Tensor,
    k: int = 20,
    T: float = 0.07,
    num_classes: int | None = None,
    clean_neighbors: tuple[Tensor, Tensor] | None = None,
    adv_neighbors: tuple[Tensor, Tensor] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> float:
    """Share of kNN predictions that change between clean and adversarial embeddings.

    Args:
        clean_emb: ``[N, D]`` embeddings of clean inputs (or ``None`` with ``clean_neighbors``).
        adv_emb: ``[N, D]`` embeddings of the adversarial inputs (or ``None`` with
            ``adv_neighbors``).
        bank_emb, bank_labels, k, T, num_classes, chunk_size: as in :func:`knn_predict`.
        clean_neighbors, adv_neighbors: optional precomputed ``(sims, idx)`` pairs, as the
            ``neighbors`` argument of :func:`knn_predict`.

    Returns:
        Fraction in ``[0, 1]``.
    """
    if num_classes is None:
        num_classes = int(bank_labels.max().item()) + 1
    common = dict(k=k, T=T, num_classes=num_classes, chunk_size=chunk_size)
    clean = knn_predict(clean_emb, bank_emb, bank_labels, neighbors=clean_neighbors, **common)
    adv = knn_predict(adv_emb, bank_emb, bank_labels, neighbors=adv_neighbors, **common)
    return fooling_rate(clean, adv)


# --------------------------------------------------------------------------------------------
# image-text retrieval
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def retrieval_hits(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, Tensor]:
    """Per-query retrieval hits at each ``k``, in both directions (cosine similarity).

    * image -> text: image ``i`` is a hit at ``k`` if *any* of its captions (texts ``j`` with
      ``text_to_image[j] == i``) is among its ``k`` most similar texts;
    * text -> image: text ``j`` is a hit at ``k`` if its image ``text_to_image[j]`` is among
      its ``k`` most similar images.

    Ties in similarity are broken in favour of the lower index.

    Args:
        image_emb: ``[N, D]`` image embeddings (normalised here).
        text_emb: ``[M, D]`` text embeddings (normalised here).
        text_to_image: ``[M]`` index in ``[0, N)`` of each text's image.
        ks: the values of ``k``, each ``>= 1``.
        chunk_size: queries per block; peak memory is about ``chunk_size * max(N, M)``
            similarities.

    Returns:
        ``{"i2t_r{k}": bool [N], "t2i_r{k}": bool [M]}`` for each ``k`` (on ``image_emb``'s
        device). Use :func:`retrieval_asr` to compare hits before/after an attack.

    Raises:
        ValueError: if an image has no caption, or on shape mismatches.
    """
    _check_2d("image_emb", image_emb)
    _check_2d("text_emb", text_emb)
    _check_chunk(chunk_size)
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"embedding sizes differ: image_emb D={image_emb.shape[1]}, "
            f"text_emb D={text_emb.shape[1]}"
        )
    n, m = image_emb.shape[0], text_emb.shape[0]
    if n == 0 or m == 0:
        raise ValueError("image_emb and text_emb must be non-empty")
    if text_to_image.dim() != 1 or text_to_image.shape[0] != m:
        raise ValueError(
            f"text_to_image must be 1-D of length M={m}, got shape {tuple(text_to_image.shape)}"
        )
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {tuple(ks)}")
    img = _normalize(image_emb)
    txt = _normalize(text_emb.to(img.device)).to(img.dtype)
    t2i = text_to_image.to(img.device).long()
    if bool((t2i < 0).any()) or bool((t2i >= n).any()):
        raise ValueError(f"text_to_image must lie in [0, {n})")
    captions_per_image = torch.bincount(t2i, minlength=n)
    if bool((captions_per_image == 0).any()):
        missing = torch.nonzero(captions_per_image == 0).flatten()[:5].tolist()
        raise ValueError(f"images without any caption (first few): {missing}")

    # Hits at k <= K need only each query's top K (K = max(ks)): one matmul and one top-k per
    # block of queries; rows with an exact tie at the target's score are re-ranked exactly.
    kmax = max(int(k) for k in ks)
    # A non-finite embedding is never a hit and ranks last as a candidate: its row is zeroed
    # here and its column set to -inf in each block (no NaN reaches top-k).
    bad_img = ~torch.isfinite(img).all(dim=1)
    bad_txt = ~torch.isfinite(txt).all(dim=1)
    any_bad = bool(bad_img.any()) or bool(bad_txt.any())
    if any_bad:
        img = img.masked_fill(bad_img[:, None], 0.0)
        txt = txt.masked_fill(bad_txt[:, None], 0.0)
    # image -> text: an image's rank is that of its best-ranked caption = its most similar
    # caption (lowest index among equals). ``own`` [N, C]: each image's caption indices in
    # increasing order, padded with -1.
    order = torch.argsort(t2i, stable=True)
    slot = torch.arange(m, device=img.device) - torch.repeat_interleave(
        torch.cumsum(captions_per_image, 0) - captions_per_image, captions_per_image)
    own = torch.full((n, int(captions_per_image.max())), -1, dtype=torch.long, device=img.device)
    own[t2i[order], slot] = order
    i2t_rank = torch.empty(n, dtype=torch.long, device=img.device)
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        sims = _masked_sims(img[start:stop], txt, bad_txt if any_bad else None)  # [R, M]
        cand = own[start:stop]
        own_sims = sims.gather(1, cand.clamp(min=0)).masked_fill(cand < 0, float("-inf"))
        best = cand.gather(1, own_sims.argmax(dim=1, keepdim=True)).squeeze(1)
        rank = _topk_rank(sims, best, kmax)
        i2t_rank[start:stop] = rank.masked_fill(bad_img[start:stop] | bad_txt[best],
                                                _NEVER)

    # text -> image
    t2i_rank = torch.empty(m, dtype=torch.long, device=img.device)
    for start in range(0, m, chunk_size):
        stop = min(m, start + chunk_size)
        sims = _masked_sims(txt[start:stop], img, bad_img if any_bad else None)  # [R, N]
        target = t2i[start:stop]
        rank = _topk_rank(sims, target, kmax)
        t2i_rank[start:stop] = rank.masked_fill(bad_txt[start:stop] | bad_img[target], _NEVER)

    hits: dict[str, Tensor] = {}
    for k in ks:
        hits[f"i2t_r{k}"] = i2t_rank < int(k)
    for k in ks:
        hits[f"t2i_r{k}"] = t2i_rank < int(k)
    return hits


@torch.no_grad()
def retrieval_recall(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, float]:
    """Recall@k for image->text and text->image retrieval (fractions in [0, 1]).

    Arguments are those of :func:`retrieval_hits`. Returns ``{"i2t_r1": .., "i2t_r5": ..,
    "i2t_r10": .., "t2i_r1": .., "t2i_r5": .., "t2i_r10": ..}`` for the default ``ks``:
    i2t recall is averaged over the ``N`` images, t2i recall over the ``M`` texts.
    """
    hits = retrieval_hits(image_emb, text_emb, text_to_image, ks=ks, chunk_size=chunk_size)
    return {key: h.float().mean().item() for key, h in hits.items()}


@torch.no_grad()
def retrieval_asr(hits_before: Tensor, hits_after: Tensor, conditional: bool = True) -> float:
    """Attack success rate on retrieval: share of queries correct before and not after.

    Args:
        hits_before: ``[Q]`` bool hits of each query on clean data (one entry of
            :func:`retrieval_hits`).
        hits_after: ``[Q]`` bool hits of the same queries under attack.
        conditional: if ``True`` (default, the usual ASR) the denominator is the number of
            queries that were correct before the attack; if ``False`` it is all ``Q`` queries.

    Returns:
        Fraction in ``[0, 1]``.

    Raises:
        ValueError: if ``conditional`` and no query was correct before the attack.
    """
    _check_1d_same("hits_before", hits_before, "hits_after", hits_after)
    before = hits_before.bool()
    after = hits_after.to(before.device).bool()
    broken = before & ~after
    if not conditional:
        return broken.float().mean().item()
    n_before = int(before.sum().item())
    if n_before == 0:
        raise ValueError("retrieval_asr: no query was correct before the attack")
    return int(broken.sum().item()) / n_before


# --------------------------------------------------------------------------------------------
# representation quality (Wang & Isola, 2020)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def alignment(x: Tensor, y: Tensor, alpha: float = 2) -> float:
    """Alignment of positive pairs: ``mean_i ||x_i/|x_i| - y_i/|y_i| ||_2 ** alpha``.

    Args:
        x: ``[N, D]`` embeddings (normalised here).
        y: ``[N, D]`` embeddings of the positives of ``x`` (row ``i`` pairs with row ``i``).
        alpha: exponent (``> 0``); 2 gives the mean squared distance, in ``[0, 4]``.

    Returns:
        Alignment (lower is better).
    """
    _check_2d("x", x)
    _check_2d("y", y)
    if x.shape != y.shape or x.shape[0] == 0:
        raise ValueError(
            f"x and y must have the same non-empty shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    xn = _normalize(x)
    yn = _normalize(y.to(xn.device)).to(xn.dtype)
    return (xn - yn).norm(dim=1).pow(alpha).mean().item()


@torch.no_grad()
def uniformity(x: Tensor, t: float = 2, chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
    """Uniformity: ``log mean_{i<j} exp(-t ||x_i - x_j||^2)`` over distinct pairs.

    Computed on normalised vectors with ``||a - b||^2 = 2 - 2 a.b`` and a streaming
    log-sum-exp over row blocks, so memory is ``O(chunk_size * N)``.

    Args:
        x: ``[N, D]`` embeddings (normalised here), ``N >= 2``.
        t: temperature (``> 0``).
        chunk_size: rows per block.

    Returns:
        Uniformity in ``[-4 t, 0]`` (lower = more uniform).
    """
    _check_2d("x", x)
    _check_chunk(chunk_size)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"uniformity needs at least 2 vectors, got {n}")
    xn = _normalize(x)
    cols = torch.arange(n, device=xn.device)
    partial = []
    for start in range(0, n - 1, chunk_size):
        block = xn[start : start + chunk_size]
        sq_dist = (2 - 2 * block @ xn.T).clamp(min=0)  # [R, N]
        rows = torch.arange(start, start + block.shape[0], device=xn.device)
        upper = cols[None, :] > rows[:, None]  # pairs i < j only
        partial.append(
            torch.logsumexp((-t * sq_dist).masked_fill(~upper, float("-inf")).flatten(), 0)
        )
    total = torch.logsumexp(torch.stack(partial), 0)
    return total.item() - math.log(n * (n - 1) / 2)


# --------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def auroc(scores: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve of ``scores`` (higher = positive) for the boolean
    ``positive``: the chance that a random positive scores above a random negative, ties
    counting half (average ranks, Mann-Whitney U)."""
    _check_1d_same("scores", scores, "positive", positive)
    s = scores.detach().double().cpu()
    y = positive.detach().bool().cpu()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        raise ValueError("AUROC needs positive and negative items")
    order = torch.argsort(s, stable=True)
    sorted_s = s[order]
    _, counts = torch.unique_consecutive(sorted_s, return_counts=True)
    start = torch.cumsum(counts, 0) - counts
    avg = start.double() + (counts.double() + 1) / 2  # 1-based average rank of each tie group
    ranks = torch.empty_like(s)
    ranks[order] = torch.repeat_interleave(avg, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
