"""Differentiable losses shared by attacks and defenses.

All contrastive losses work on cosine similarities (inputs are L2-normalised inside), return a
scalar tensor (mean over queries) and are computed with ``logsumexp`` / ``cross_entropy`` so
they are stable for small temperatures. Nothing here detaches its inputs: gradients flow to
both arguments.

Contrastive losses share the layout ``query [B, D]`` vs ``keys [K, D]``: query ``i``'s positive
is key ``positive_index[i]`` (default: key ``i``, the diagonal, which needs ``K >= B``); every
other key is a negative. With ``symmetric=True`` (or via :func:`symmetric`) the loss is also
computed in the reverse direction (keys as queries) and the two are averaged, CLIP-style;
that requires ``K == B`` and ``positive_index`` to be a permutation.

Under torchrun, inside a training step (:mod:`mmsec.distributed`), the in-batch losses
(one key per query: ``clip_loss``, ``in_modal_loss``, and the others with diagonal
positives) gather queries and keys of every process with their gradient, so the negatives
are those of the global batch and the loss is the one of a single process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed

__all__ = [
    "HardPairWeights",
    "clip_loss",
    "decoupled_contrastive_loss",
    "distillation_kl",
    "embedding_l2",
    "fare_loss",
    "focal_info_nce",
    "in_modal_loss",
    "info_nce",
    "pmg_aft_loss",
    "ssim",
    "symmetric",
    "zero_shot_ce",
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _global_batch(query: Tensor, keys: Tensor, positive_index: Tensor | None
                  ) -> tuple[Tensor, Tensor]:
    """Queries and keys of the global batch inside a sharded training step, when keys are
    per item (diagonal positives); otherwise as given."""
    if distributed.current_shard() is None or positive_index is not None \
            or query.shape[0] != keys.shape[0]:
        return query, keys
    return distributed.gather(query), distributed.gather(keys)


def _cosine(query: Tensor, keys: Tensor) -> Tensor:
    """``[B, D] x [K, D] -> [B, K]`` cosine similarities."""
    if query.dim() != 2 or keys.dim() != 2:
        raise ValueError(
            f"query and keys must be 2-D, got {tuple(query.shape)} and {tuple(keys.shape)}"
        )
    if query.shape[1] != keys.shape[1]:
        raise ValueError(f"embedding sizes differ: {query.shape[1]} vs {keys.shape[1]}")
    return F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T


def _targets(positive_index: Tensor | None, b: int, k: int, device: torch.device) -> Tensor:
    """Index of each query's positive key, ``[B]`` long."""
    if positive_index is None:
        if k < b:
            raise ValueError(
                f"diagonal positives need at least as many keys as queries, got B={b}, K={k}"
            )
        return torch.arange(b, device=device)
    if positive_index.shape != (b,):
        raise ValueError(
            f"positive_index must have shape ({b},), got {tuple(positive_index.shape)}"
        )
    return positive_index.to(device).long()


def _inverse_permutation(positive_index: Tensor | None, b: int, k: int) -> Tensor | None:
    """Positive index for the reverse direction (keys as queries)."""
    if k != b:
        raise ValueError(f"symmetric losses need as many keys as queries, got B={b}, K={k}")
    if positive_index is None:
        return None
    idx = positive_index.long()
    is_perm = idx.shape == (b,) and bool(
        torch.equal(torch.sort(idx).values, torch.arange(b, device=idx.device))
    )
    if not is_perm:
        raise ValueError("symmetric losses need positive_index to be a permutation of 0..B-1")
    return torch.argsort(idx)


def symmetric(loss_fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Wrap a one-direction contrastive loss into its symmetric (CLIP-style) average.

    The returned function computes ``(loss_fn(q, k, positive_index=p) +
    loss_fn(k, q, positive_index=p^-1)) / 2`` where ``p^-1`` is the inverse permutation, so
    e.g. ``symmetric(info_nce)(image_emb, text_emb, tau=0.07)`` averages image->text and
    text->image. ``loss_fn`` must accept ``(query, keys, positive_index=..., **kwargs)``; the
    inputs must be square (``K == B``). Equivalent to passing ``symmetric=True`` to the losses
    of this module.
    """

    @functools.wraps(loss_fn)
    def wrapped(
        query: Tensor,
        keys: Tensor,
        *args: object,
        positive_index: Tensor | None = None,
        **kwargs: object,
    ) -> Tensor:
        reverse = _inverse_permutation(positive_index, query.shape[0], keys.shape[0])
        forward = loss_fn(query, keys, *args, positive_index=positive_index, **kwargs)
        backward = loss_fn(keys, query, *args, positive_index=reverse, **kwargs)
        return 0.5 * (forward + backward)

    return wrapped


def _maybe_symmetric(
    one_way: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    query: Tensor,
    keys: Tensor,
    positive_index: Tensor | None,
    sym: bool,
) -> Tensor:
    if not sym:
        return one_way(query, keys, positive_index)
    reverse = _inverse_permutation(positive_index, query.shape[0], keys.shape[0])
    return 0.5 * (one_way(query, keys, positive_index) + one_way(keys, query, reverse))


# --------------------------------------------------------------------------------------------
# contrastive losses
# --------------------------------------------------------------------------------------------


def clip_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: float | Tensor,
    labels: Tensor | None = None,
    positive_mask: Tensor | None = None,
) -> Tensor:
    """Symmetric InfoNCE loss of CLIP (Radford et al., 2021).

    ``logits = logit_scale * cos(image_i, text_j)`` ``[B, B]``; the loss is the mean of the
    image->text cross-entropy (rows) and the text->image cross-entropy (columns).

    By default image ``i`` and text ``i`` are the only positive pair. When several pairs in a
    batch share a caption or class, pass ``labels`` or ``positive_mask`` to make all of them
    positives (multi-positive / SupCon-style): for each anchor the loss is minus the *average*
    log-probability (softmax over the whole row/column) of its positives,
    ``-1/|P(i)| * sum_{j in P(i)} log softmax(logits_i)_j``, averaged over anchors, then over
    the two directions. With one positive per row this is exactly the standard CLIP loss.

    Args:
        image_emb: ``[B, D]`` image embeddings (normalised here again, so raw features work).
        text_emb: ``[B, D]`` text embeddings (normalised here).
        logit_scale: the multiplicative inverse temperature (CLIP's ``logit_scale.exp()``,
            ~100 for trained CLIP), a float or a 0-d tensor (may require grad).
        labels: optional ``[B]`` class/caption ids; pairs ``(i, j)`` with ``labels[i] ==
            labels[j]`` are positives. Mutually exclusive with ``positive_mask``.
        positive_mask: optional ``[B, B]`` bool mask, ``[i, j]`` true when image ``i`` and
            text ``j`` match; each row and column needs at least one positive.

    Returns:
        0-d loss tensor (nats).
    """
    if labels is not None and positive_mask is not None:
        raise ValueError("pass either labels or positive_mask, not both")
    if image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image_emb and text_emb must have the same shape [B, D], got "
            f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    if distributed.current_shard() is not None:
        if positive_mask is not None:
            raise ValueError("clip_loss under torchrun needs labels, not a positive_mask "
                             "(a [B, B] mask of one process's rows cannot be gathered)")
        image_emb, text_emb = distributed.gather(image_emb), distributed.gather(text_emb)
        if labels is not None:
            labels = distributed.gather(labels)
    logits = logit_scale * _cosine(image_emb, text_emb)  # [B, B]
    b = logits.shape[0]
    if labels is not None:
        if labels.shape != (b,):
            raise ValueError(f"labels must have shape ({b},), got {tuple(labels.shape)}")
        labels = labels.to(logits.device)
        positive_mask = labels[:, None] == labels[None, :]
    if positive_mask is None:
        target = torch.arange(b, device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    mask = positive_mask.to(logits.device).bool()
    if mask.shape != (b, b):
        raise ValueError(f"positive_mask must have shape ({b}, {b}), got {tuple(mask.shape)}")
    if not bool(mask.any(dim=1).all() & mask.any(dim=0).all()):
        raise ValueError("every row and column of positive_mask needs at least one positive")
    return 0.5 * (_multi_positive_ce(logits, mask) + _multi_positive_ce(logits.T, mask.T))


def _multi_positive_ce(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean over rows of ``-mean_{j in P(i)} log_softmax(logits_i)_j``."""
    log_prob = logits.log_softmax(dim=1)
    pos_log_prob = torch.where(mask, log_prob, 0.0).sum(dim=1) / mask.sum(dim=1)
    return -pos_log_prob.mean()


def info_nce(
    query: Tensor,
    keys: Tensor,
    tau: float = 0.1,
    positive_index: Tensor | None = None,
    symmetric: bool = False,
) -> Tensor:
    """One-direction InfoNCE (as used by AdvCLIP with ``tau = 0.1``).

    ``loss_i = -log( exp(s_ip / tau) / sum_k exp(s_ik / tau) )`` with cosine similarities
    ``s``, averaged over the ``B`` queries.

    Args:
        query: ``[B, D]`` query embeddings (normalised here).
        keys: ``[K, D]`` key embeddings (normalised here); extra keys (``K > B``) act as
            additional negatives.
        tau: temperature (``> 0``).
        positive_index: optional ``[B]`` index of each query's positive key; default ``i``.
        symmetric: also compute keys->query and average (needs ``K == B``).

    Returns:
        0-d loss tensor (nats).
    """

    def one_way(q: Tensor, k: Tensor, pos: Tensor | None) -> Tensor:
        logits = _cosine(q, k) / tau
        return F.cross_entropy(logits, _targets(pos, q.shape[0], k.shape[0], logits.device))

    query, keys = _global_batch(query, keys, positive_index)
    return _maybe_symmetric(one_way, query, keys, positive_index, symmetric)


def focal_info_nce(
    query: Tensor,
    keys: Tensor,
    tau: float = 0.05,
    margin: float = 0.3,
    positive_index: Tensor | None = None,
    symmetric: bool = False,
    guard: bool = True,
) -> Tensor:
    """Focal-InfoNCE (Hou & Li, 2023, "Improving contrastive learning of sentence embeddings
    with focal-InfoNCE").

    With cosine similarities ``s``, the positive logit is ``s_p * s_p / tau`` and each negative
    logit is ``(s_n + m) * s_n / tau``; the loss is the cross-entropy over these logits:
    ``-log( exp(s_p^2/tau) / (exp(s_p^2/tau) + sum_n exp((s_n + m) s_n / tau)) )``.

    Compared with InfoNCE (logit ``s/tau``), a negative's logit is rescaled by ``(s_n + m)``:
    hard negatives (``s_n`` close to 1) keep a large logit and dominate the denominator, while
    easy negatives (small or negative ``s_n``, where ``s_n + m`` is small) get a logit close to
    0 relative to the hard ones, i.e. they are down-weighted, focusing the gradient on hard
    examples. Squaring the positive similarity likewise gives low-confidence positives
    (small ``s_p``) a relatively lower logit and hence a larger loss.

    The guard: ``s_p^2`` is even in ``s_p``, so with the paper's formula a positive pair with
    a *negative* similarity lowers its loss by growing more negative. With ``guard`` (the
    default) the positive logit is ``s_p * |s_p| / tau``: the same for ``s_p >= 0``,
    increasing in ``s_p`` everywhere; ``guard=False`` is the paper's formula. Defaults are
    the paper's: ``tau = 0.05``, ``m = 0.3``.

    Args:
        query: ``[B, D]`` (normalised here).
        keys: ``[K, D]`` (normalised here).
        tau: temperature (``> 0``).
        margin: the margin ``m`` added to negative similarities.
        positive_index: optional ``[B]`` positive key index per query; default diagonal.
        symmetric: also compute keys->query and average (needs ``K == B``).
        guard: sign-preserving square of the positive similarity (see above).

    Returns:
        0-d loss tensor (nats).
    """

    def one_way(q: Tensor, k: Tensor, pos: Tensor | None) -> Tensor:
        sims = _cosine(q, k)
        target = _targets(pos, q.shape[0], k.shape[0], sims.device)
        is_pos = F.one_hot(target, k.shape[0]).bool()
        positive = sims * sims.abs() if guard else sims * sims
        logits = torch.where(is_pos, positive, (sims + margin) * sims) / tau
        return F.cross_entropy(logits, target)

    query, keys = _global_batch(query, keys, positive_index)
    return _maybe_symmetric(one_way, query, keys, positive_index, symmetric)


def decoupled_contrastive_loss(
    query: Tensor,
    keys: Tensor,
    tau: float = 0.1,
    positive_index: Tensor | None = None,
    symmetric: bool = False,
    weighted: bool = False,
    sigma: float = 0.5,
) -> Tensor:
    """Decoupled contrastive loss (DCL, Yeh et al., 2022), and its weighted form DCLW.

    InfoNCE with the positive removed from the denominator:
    ``loss_i = -w_i * s_ip / tau + logsumexp_{n != p}(s_in / tau)``, averaged over queries
    (cosine similarities), with ``w_i = 1`` (DCL) or, with ``weighted``,
    ``w_i = 2 - B * softmax_i(s_ip / sigma)`` over the batch (DCLW, von Mises-Fisher
    weighting: hard positives weigh more; the weights are not back-propagated, as in
    lightly's reference). Unlike InfoNCE it has no lower bound: use a fixed temperature,
    not CLIP's learnable scale.

    Args:
        query: ``[B, D]`` (normalised here).
        keys: ``[K, D]`` (normalised here), ``K >= 2``.
        tau: temperature (``> 0``).
        positive_index: optional ``[B]`` positive key index per query; default diagonal.
        symmetric: also compute keys->query and average (needs ``K == B``).
        weighted: DCLW's weighting of the positive term; ``sigma``: its temperature.

    Returns:
        0-d loss tensor.
    """

    def one_way(q: Tensor, k: Tensor, pos: Tensor | None) -> Tensor:
        if k.shape[0] < 2:
            raise ValueError("decoupled_contrastive_loss needs at least 2 keys (one negative)")
        sims = _cosine(q, k)
        logits = sims / tau
        target = _targets(pos, q.shape[0], k.shape[0], logits.device)
        is_pos = F.one_hot(target, k.shape[0]).bool()
        positive = logits.gather(1, target[:, None]).squeeze(1)
        if weighted:
            s_pos = sims.gather(1, target[:, None]).squeeze(1).detach()
            positive = positive * (2 - q.shape[0] * torch.softmax(s_pos / sigma, dim=0))
        negatives = torch.logsumexp(logits.masked_fill(is_pos, float("-inf")), dim=1)
        return (negatives - positive).mean()

    query, keys = _global_batch(query, keys, positive_index)
    return _maybe_symmetric(one_way, query, keys, positive_index, symmetric)


# --------------------------------------------------------------------------------------------
# image / embedding similarity
# --------------------------------------------------------------------------------------------


def _gaussian_1d(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    coords = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    x: Tensor,
    y: Tensor,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
) -> Tensor:
    """Differentiable structural similarity (Wang et al., 2004) with a Gaussian window.

    Local means, variances and covariance are computed with a separable, normalised Gaussian
    window (``window_size`` taps, std ``sigma`` pixels) per channel, "valid" convolution (no
    padding), constants ``C1 = (0.01 L)^2`` and ``C2 = (0.03 L)^2`` with ``L = data_range``.
    The SSIM map is averaged over channels and positions, then over the batch. With the
    defaults this matches ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1)``.

    If an image side is smaller than ``window_size`` the window is shrunk to that side (per
    axis), keeping ``sigma``.

    Args:
        x: ``[B, C, H, W]`` images, e.g. in ``[0, 1]`` (InverTune uses ``1 - ssim`` as a loss).
        y: ``[B, C, H, W]`` images, same shape.
        data_range: dynamic range ``L`` of the pixels (1.0 for ``[0, 1]``, 255 for uint8).
        window_size: Gaussian window length (pixels).
        sigma: Gaussian standard deviation (pixels).

    Returns:
        0-d tensor, mean SSIM (1 for identical images, at most 1).
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"x and y must both be [B, C, H, W] with the same shape, got {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )
    if window_size < 1 or sigma <= 0:
        raise ValueError(f"need window_size >= 1 and sigma > 0, got {window_size}, {sigma}")
    if not x.is_floating_point():
        x = x.float()
    y = y.to(x.dtype)
    _, c, h, w = x.shape
    win_h = _gaussian_1d(min(window_size, h), sigma, x.dtype, x.device)
    win_w = _gaussian_1d(min(window_size, w), sigma, x.dtype, x.device)
    kernel_h = win_h.view(1, 1, -1, 1).repeat(c, 1, 1, 1)  # [C, 1, wh, 1]
    kernel_w = win_w.view(1, 1, 1, -1).repeat(c, 1, 1, 1)  # [C, 1, 1, ww]

    # blur the five statistics in one batched, separable, depthwise convolution
    stats = torch.cat([x, y, x * x, y * y, x * y], dim=0)  # [5B, C, H, W]
    blurred = F.conv2d(F.conv2d(stats, kernel_h, groups=c), kernel_w, groups=c)
    mu_x, mu_y, e_xx, e_yy, e_xy = blurred.chunk(5, dim=0)
    var_x = e_xx - mu_x**2
    var_y = e_yy - mu_y**2
    cov_xy = e_xy - mu_x * mu_y

    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return ssim_map.flatten(1).mean(dim=1).mean()


def embedding_l2(a: Tensor, b: Tensor, normalize: bool = False) -> Tensor:
    """Mean squared L2 distance between paired embeddings (FARE / preservation terms).

    ``mean_i ||a_i - b_i||_2^2`` (sum over the feature dimension, mean over the batch).

    Args:
        a: ``[B, D]`` embeddings (any leading shape ``[..., D]`` works).
        b: same shape as ``a`` (e.g. frozen reference embeddings; detach them yourself).
        normalize: L2-normalise both before the distance (then the value lies in ``[0, 4]``).

    Returns:
        0-d tensor.
    """
    if a.shape != b.shape:
        raise ValueError(
            f"a and b must have the same shape, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return (a - b).pow(2).sum(dim=-1).mean()


# --------------------------------------------------------------------------------------------
# robust and clean fine-tuning (FARE, TeCoA, PMG-AFT, CleanCLIP)
# --------------------------------------------------------------------------------------------


def fare_loss(adv_emb: Tensor, orig_emb: Tensor) -> Tensor:
    """FARE (Schlarmann et al., 2024): ``mean_b sum_d (f_theta(x + delta) - f_theta0(x))^2`` on
    *unnormalised* image embeddings (the frozen original's clean embedding as the target).
    Also the loss FARE's inner PGD maximises."""
    return embedding_l2(adv_emb, orig_emb, normalize=False)


def zero_shot_ce(image_emb: Tensor, class_emb: Tensor, labels: Tensor, scale: float = 100.0,
                 reduction: str = "mean") -> Tensor:
    """TeCoA (Mao et al., 2023): ``CE(scale * cos(f(x), T), y)`` with class text embeddings
    ``T`` ``[C, D]`` (prompt "This is a photo of a {}"); ``scale`` 100 as CLIP's."""
    logits = scale * _cosine(image_emb, class_emb)
    return F.cross_entropy(logits, labels.to(logits.device), reduction=reduction)


def pmg_aft_loss(adv_logits: Tensor, clean_logits: Tensor, orig_adv_logits: Tensor,
                 labels: Tensor, w_orig: float = 1.0, w_clean: float = 1.0,
                 kl_reduction: str = "batchmean") -> dict[str, Tensor]:
    """PMG-AFT (Wang et al., CVPR 2024): ``CE(z_theta(x_adv), y) + w_orig * KL(p_theta0(x_adv) ||
    p_theta(x_adv)) + w_clean * KL(p_theta(x) || p_theta(x_adv))``.

    The official code sums the KL terms over the batch (``reduction='sum'``), so they weigh
    about batch-size times the mean CE; here the reduction is ``batchmean`` by default (each
    term a mean per sample, weighted by ``w_*``; ``kl_reduction="sum"`` is the official
    weighting). Returns the terms and their ``total``.
    """
    log_adv = adv_logits.log_softmax(-1)
    ce = F.cross_entropy(adv_logits, labels.to(adv_logits.device))
    # log-space targets: the clean branch is differentiated too, and softmax(100 * cos)
    # underflows to exact zeros whose xlogy gradient would be NaN
    kl_orig = F.kl_div(log_adv, orig_adv_logits.detach().log_softmax(-1),
                       reduction=kl_reduction, log_target=True)
    kl_clean = F.kl_div(log_adv, clean_logits.log_softmax(-1), reduction=kl_reduction,
                        log_target=True)
    total = ce + w_orig * kl_orig + w_clean * kl_clean
    return {"total": total, "ce": ce, "kl_orig": kl_orig, "kl_clean": kl_clean}


def in_modal_loss(emb: Tensor, emb_aug: Tensor, logit_scale: float | Tensor) -> Tensor:
    """CleanCLIP's in-modal term: each embedding against the augmented views of the batch,
    ``CE(logit_scale * cos(e_i, e'_j), i)``, one direction (CleanCLIP's code)."""
    emb, emb_aug = _global_batch(emb, emb_aug, None)
    logits = logit_scale * _cosine(emb, emb_aug)
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor,
                    temperature: float = 1.0) -> Tensor:
    """Distillation from the frozen original (Hinton et al.): ``T^2 * KL(softmax(t / T) ||
    softmax(s / T))``, mean per sample; the teacher's logits are not back-propagated."""
    t = temperature
    return F.kl_div((student_logits / t).log_softmax(-1),
                    (teacher_logits.detach() / t).log_softmax(-1), reduction="batchmean",
                    log_target=True) * t * t


class HardPairWeights:
    """Self-paced up-weighting of hard class pairs in adversarial training.

    Classes that are each other's most frequent adversarial prediction are "virtual
    targets" of each other; their pairs get larger loss weights. This keeps a running
    (exponential moving average) confusion matrix of adversarial predictions ``C[y, y']``,
    and weights sample ``i`` by ``1 + beta * C[y_i, y'_i] / max_{y' != y_i} C[y_i, y']``
    when its adversarial prediction ``y'_i`` is wrong (1 otherwise), normalised to mean 1
    over the batch. ``beta`` = 0 is plain adversarial training.
    """

    def __init__(self, num_classes: int, beta: float = 1.0, momentum: float = 0.9) -> None:
        self.beta, self.momentum = beta, momentum
        self.confusion = torch.zeros(num_classes, num_classes)

    def update(self, labels: Tensor, adv_pred: Tensor) -> None:
        counts = torch.zeros_like(self.confusion)
        counts.index_put_((labels.cpu(), adv_pred.cpu()), torch.ones(len(labels)), accumulate=True)
        rows = counts.sum(1, keepdim=True).clamp_min(1)
        seen = counts.sum(1, keepdim=True) > 0
        fresh = torch.where(seen, counts / rows, self.confusion)
        self.confusion = self.momentum * self.confusion + (1 - self.momentum) * fresh

    def weights(self, labels: Tensor, adv_pred: Tensor) -> Tensor:
        c = self.confusion.clone()
        c.fill_diagonal_(0)
        peak = c.max(1).values.clamp_min(1e-12)
        y, p = labels.cpu(), adv_pred.cpu()
        hard = torch.where(p != y, c[y, p] / peak[y], torch.zeros(len(y)))
        w = 1 + self.beta * hard
        return (w / w.mean()).to(labels.device)
