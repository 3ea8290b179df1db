"""Tests for mmsec.losses: hand-computed values and naive double-loop references."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from mmsec import losses as L

SOFTPLUS_MINUS_1 = math.log(1 + math.exp(-1))  # -log(e / (e + 1)) = 0.31326...


def t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# naive references: explicit loops over queries and keys, math only
# --------------------------------------------------------------------------------------------


def cos_matrix(a: torch.Tensor, b: torch.Tensor) -> list[list[float]]:
    out = []
    for i in range(a.shape[0]):
        row = []
        for j in range(b.shape[0]):
            dot = sum(float(a[i, d]) * float(b[j, d]) for d in range(a.shape[1]))
            na = math.sqrt(sum(float(a[i, d]) ** 2 for d in range(a.shape[1])))
            nb = math.sqrt(sum(float(b[j, d]) ** 2 for d in range(b.shape[1])))
            row.append(dot / (na * nb))
        out.append(row)
    return out


def ref_ce(logits: list[list[float]], pos: list[list[int]]) -> float:
    """mean_i of -(1/|P_i|) sum_{p in P_i} log(exp(l_ip) / sum_j exp(l_ij))."""
    total = 0.0
    for i, row in enumerate(logits):
        denom = sum(math.exp(v) for v in row)
        total += -sum(math.log(math.exp(row[p]) / denom) for p in pos[i]) / len(pos[i])
    return total / len(logits)


def ref_clip(img: torch.Tensor, txt: torch.Tensor, scale: float, labels: list[int]) -> float:
    s = cos_matrix(img, txt)
    b = len(s)
    logits = [[scale * s[i][j] for j in range(b)] for i in range(b)]
    logits_t = [[logits[j][i] for j in range(b)] for i in range(b)]
    pos = [[j for j in range(b) if labels[j] == labels[i]] for i in range(b)]
    return 0.5 * (ref_ce(logits, pos) + ref_ce(logits_t, pos))


def ref_info_nce(q: torch.Tensor, k: torch.Tensor, tau: float, pos: list[int]) -> float:
    s = cos_matrix(q, k)
    return ref_ce([[v / tau for v in row] for row in s], [[p] for p in pos])


def ref_focal(q: torch.Tensor, k: torch.Tensor, tau: float, m: float, pos: list[int]) -> float:
    s = cos_matrix(q, k)
    total = 0.0
    for i, row in enumerate(s):
        p = pos[i]
        num = math.exp(row[p] * row[p] / tau)
        neg = sum(math.exp((row[n] + m) * row[n] / tau) for n in range(len(row)) if n != p)
        total += -math.log(num / (num + neg))
    return total / len(s)


def ref_dcl(q: torch.Tensor, k: torch.Tensor, tau: float, pos: list[int]) -> float:
    s = cos_matrix(q, k)
    total = 0.0
    for i, row in enumerate(s):
        p = pos[i]
        neg = sum(math.exp(row[n] / tau) for n in range(len(row)) if n != p)
        total += -row[p] / tau + math.log(neg)
    return total / len(s)


# --------------------------------------------------------------------------------------------
# clip_loss
# --------------------------------------------------------------------------------------------


def test_clip_loss_hand_value() -> None:
    e = t([[1.0, 0.0], [0.0, 2.0]])  # normalised: identity; cosine matrix = I
    # each row/column: logits (1, 0) with positive 1 -> -log(e/(e+1)) = log(1 + e^-1)
    assert L.clip_loss(e, e, 1.0).item() == pytest.approx(SOFTPLUS_MINUS_1)
    # logit scale 10 -> log(1 + e^-10)
    assert L.clip_loss(e, e, torch.tensor(10.0)).item() == pytest.approx(
        math.log(1 + math.exp(-10))
    )


def test_clip_loss_matches_double_loop_reference() -> None:
    img, txt = rand(5, 4, seed=1), rand(5, 4, seed=2)
    ref = ref_clip(img, txt, 7.0, labels=list(range(5)))
    assert L.clip_loss(img, txt, 7.0).item() == pytest.approx(ref)


def test_clip_loss_multi_positive_hand_value_and_reference() -> None:
    # all four cosines equal 1 -> log_softmax = -log 2 everywhere; both texts are positives
    # of both images, mean log-prob over positives = -log 2 -> loss log 2.
    e = t([[1.0, 0.0], [2.0, 0.0]])
    assert L.clip_loss(e, e, 5.0, labels=torch.tensor([3, 3])).item() == pytest.approx(math.log(2))
    img, txt = rand(5, 4, seed=3), rand(5, 4, seed=4)
    labels = [0, 0, 1, 2, 1]
    ref = ref_clip(img, txt, 3.0, labels)
    out = L.clip_loss(img, txt, 3.0, labels=torch.tensor(labels))
    assert out.item() == pytest.approx(ref)
    mask = torch.tensor(labels)[:, None] == torch.tensor(labels)[None, :]
    assert L.clip_loss(img, txt, 3.0, positive_mask=mask).item() == pytest.approx(ref)


def test_clip_loss_unique_labels_equal_default() -> None:
    img, txt = rand(4, 3, seed=5), rand(4, 3, seed=6)
    base = L.clip_loss(img, txt, 20.0)
    torch.testing.assert_close(L.clip_loss(img, txt, 20.0, labels=torch.arange(4)), base)
    torch.testing.assert_close(
        L.clip_loss(img, txt, 20.0, positive_mask=torch.eye(4, dtype=torch.bool)), base
    )


def test_clip_loss_equals_symmetric_info_nce() -> None:
    img, txt = rand(6, 5, seed=7), rand(6, 5, seed=8)
    tau = 0.07
    torch.testing.assert_close(
        L.clip_loss(img, txt, 1 / tau), L.info_nce(img, txt, tau=tau, symmetric=True)
    )


def test_clip_loss_aligned_lower_than_shuffled() -> None:
    img = rand(8, 16, seed=9)
    txt = img + 0.05 * rand(8, 16, seed=10)
    aligned = L.clip_loss(img, txt, 100.0)
    shuffled = L.clip_loss(img, txt[torch.roll(torch.arange(8), 1)], 100.0)
    assert aligned.item() < 0.01 < shuffled.item()


def test_clip_loss_errors() -> None:
    e = rand(3, 2)
    with pytest.raises(ValueError):
        L.clip_loss(e, e, 1.0, labels=torch.arange(3), positive_mask=torch.eye(3).bool())
    with pytest.raises(ValueError):  # row 2 has no positive
        L.clip_loss(e, e, 1.0, positive_mask=torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 0]]))
    with pytest.raises(ValueError):
        L.clip_loss(e, e[:2], 1.0)


def test_clip_loss_gradcheck() -> None:
    img = rand(3, 4, seed=11).requires_grad_()
    txt = rand(3, 4, seed=12).requires_grad_()
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: L.clip_loss(a, b, s), (img, txt, scale))
    labels = torch.tensor([0, 1, 0])
    assert torch.autograd.gradcheck(lambda a, b: L.clip_loss(a, b, 4.0, labels=labels), (img, txt))


# --------------------------------------------------------------------------------------------
# info_nce / symmetric
# --------------------------------------------------------------------------------------------


def test_info_nce_hand_value() -> None:
    q = t([[1.0, 0.0]])
    k = t([[3.0, 0.0], [0.0, 1.0]])  # positive cos 1, negative cos 0
    # tau=1: -log(e / (e + 1)); tau=0.5: -log(e^2 / (e^2 + 1)) = log(1 + e^-2)
    assert L.info_nce(q, k, tau=1.0).item() == pytest.approx(SOFTPLUS_MINUS_1)
    assert L.info_nce(q, k, tau=0.5).item() == pytest.approx(math.log(1 + math.exp(-2)))


def test_info_nce_matches_reference_extra_keys_and_positive_index() -> None:
    q, k = rand(4, 3, seed=13), rand(7, 3, seed=14)  # 3 extra negatives
    assert L.info_nce(q, k).item() == pytest.approx(ref_info_nce(q, k, 0.1, [0, 1, 2, 3]))
    pos = [6, 0, 3, 3]
    out = L.info_nce(q, k, tau=0.2, positive_index=torch.tensor(pos))
    assert out.item() == pytest.approx(ref_info_nce(q, k, 0.2, pos))
    with pytest.raises(ValueError):
        L.info_nce(k, q)  # diagonal positives need K >= B


def test_symmetric_wrapper_and_flag() -> None:
    q, k = rand(4, 3, seed=15), rand(4, 3, seed=16)
    both = 0.5 * (ref_info_nce(q, k, 0.1, [0, 1, 2, 3]) + ref_info_nce(k, q, 0.1, [0, 1, 2, 3]))
    assert L.info_nce(q, k, symmetric=True).item() == pytest.approx(both)
    assert L.symmetric(L.info_nce)(q, k, tau=0.1).item() == pytest.approx(both)
    # permutation positives: query i <-> key perm[i], so key j's positive is query inv[j]
    perm, inv = [2, 0, 3, 1], [1, 3, 0, 2]
    both_p = 0.5 * (ref_info_nce(q, k, 0.3, perm) + ref_info_nce(k, q, 0.3, inv))
    pi = torch.tensor(perm)
    assert L.info_nce(q, k, 0.3, pi, symmetric=True).item() == pytest.approx(both_p)
    assert L.symmetric(L.info_nce)(q, k, tau=0.3, positive_index=pi).item() == pytest.approx(both_p)
    sym_dcl = L.symmetric(L.decoupled_contrastive_loss)(q, k, tau=0.3, positive_index=pi)
    dcl_both = 0.5 * (ref_dcl(q, k, 0.3, perm) + ref_dcl(k, q, 0.3, inv))
    assert sym_dcl.item() == pytest.approx(dcl_both)


def test_symmetric_errors() -> None:
    q = rand(3, 2)
    with pytest.raises(ValueError):  # not square
        L.info_nce(q, rand(4, 2), symmetric=True)
    with pytest.raises(ValueError):  # not a permutation
        L.focal_info_nce(q, q, positive_index=torch.tensor([0, 0, 1]), symmetric=True)


# --------------------------------------------------------------------------------------------
# focal InfoNCE
# --------------------------------------------------------------------------------------------


def test_focal_info_nce_hand_value() -> None:
    q = t([[1.0, 0.0]])
    k = t([[1.0, 0.0], [0.6, 0.8]])  # s_p = 1, s_n = 0.6
    # tau=0.5, m=0.3: positive logit 1*1/0.5 = 2, negative (0.6+0.3)*0.6/0.5 = 1.08
    # loss = -log(e^2 / (e^2 + e^1.08)) = log(1 + e^(1.08 - 2))
    expected = math.log(1 + math.exp(-0.92))
    assert L.focal_info_nce(q, k, tau=0.5, margin=0.3).item() == pytest.approx(expected)
    # plain InfoNCE on the same input has negative logit 0.6/0.5 = 1.2 -> larger loss: the
    # negative (0.6 + 0.3 < 1) is down-weighted
    assert L.info_nce(q, k, tau=0.5).item() == pytest.approx(math.log(1 + math.exp(-0.8)))
    assert expected < L.info_nce(q, k, tau=0.5).item()


def test_focal_info_nce_reduces_to_info_nce_for_binary_similarities() -> None:
    # with s in {0, 1}: s_p^2 = s_p and (s_n + m) s_n = 0 = s_n, so focal == InfoNCE.
    q = t([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    k = t([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(L.focal_info_nce(q, k, tau=0.2), L.info_nce(q, k, tau=0.2))


def test_focal_info_nce_matches_reference() -> None:
    q, k = rand(4, 5, seed=17), rand(6, 5, seed=18)
    pos = [5, 1, 1, 0]
    out = L.focal_info_nce(q, k, tau=0.1, margin=0.3, positive_index=torch.tensor(pos),
                           guard=False)
    assert out.item() == pytest.approx(ref_focal(q, k, 0.1, 0.3, pos))
    assert L.focal_info_nce(q, k, tau=0.3, margin=0.1, guard=False).item() == pytest.approx(
        ref_focal(q, k, 0.3, 0.1, [0, 1, 2, 3])
    )


def test_focal_info_nce_guard_on_a_negative_positive_similarity() -> None:
    """s_p = -0.6, one negative at 0: paper logit s_p^2 = 0.36 rewards a more negative
    positive; the guard's s_p|s_p| = -0.36 does not."""
    q = t([[1.0, 0.0]])
    k = t([[-0.6, 0.8], [0.0, 1.0]])
    tau, m = 0.05, 0.3
    guarded = L.focal_info_nce(q, k).item()  # the defaults: tau 0.05, m 0.3, guard on
    expected = -(-0.36 / tau) + math.log(math.exp(-0.36 / tau) + math.exp(0.0))
    assert guarded == pytest.approx(expected, rel=1e-5)
    paper = L.focal_info_nce(q, k, guard=False).item()
    assert paper == pytest.approx(-(0.36 / tau) + math.log(math.exp(0.36 / tau) + 1), rel=1e-5)
    worse = t([[-0.8, 0.6], [0.0, 1.0]])  # the positive pair further apart
    assert L.focal_info_nce(q, worse).item() > guarded  # guarded: a worse pair costs more
    assert L.focal_info_nce(q, worse, guard=False).item() < paper  # the paper's: it pays off
    del m


# --------------------------------------------------------------------------------------------
# DCL
# --------------------------------------------------------------------------------------------


def test_dcl_hand_value_excludes_positive() -> None:
    q = t([[1.0, 0.0]])
    k = t([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # s_p = 1, negatives 0 and -1
    # tau=1: -1 + log(e^0 + e^-1) = -1 + log(1 + e^-1)
    dcl = L.decoupled_contrastive_loss(q, k, tau=1.0).item()
    assert dcl == pytest.approx(-1 + SOFTPLUS_MINUS_1)
    # had the positive been kept in the denominator: -1 + log(e + 1 + e^-1)
    assert dcl != pytest.approx(-1 + math.log(math.e + 1 + math.exp(-1)))
    # identity linking the two: InfoNCE = DCL + log(1 + exp(-DCL)) (per query)
    info = L.info_nce(q, k, tau=1.0).item()
    assert info == pytest.approx(dcl + math.log1p(math.exp(-dcl)))


def test_dcl_matches_reference_and_is_independent_of_positive_in_denominator() -> None:
    q, k = rand(3, 4, seed=19), rand(5, 4, seed=20)
    assert L.decoupled_contrastive_loss(q, k, tau=0.2).item() == pytest.approx(
        ref_dcl(q, k, 0.2, [0, 1, 2])
    )
    # Since the positive is not in the denominator, d loss / d s_p is exactly -1/tau (for
    # InfoNCE it would be -(1 - softmax_p)/tau). Build unit keys (cos, sin)(acos s) whose
    # cosine with q1 = (1, 0) is s, and differentiate w.r.t. s.
    logits = torch.tensor([[0.3, 0.1, -0.2]], dtype=torch.float64, requires_grad=True)
    q1 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    keys = torch.stack([torch.cos(torch.acos(logits[0])), torch.sin(torch.acos(logits[0]))], 1)
    loss = L.decoupled_contrastive_loss(q1, keys, tau=0.5)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad[0, 0].item() == pytest.approx(-1 / 0.5)
    with pytest.raises(ValueError):
        L.decoupled_contrastive_loss(q1, q1)  # no negative at all


# --------------------------------------------------------------------------------------------
# SSIM
# --------------------------------------------------------------------------------------------


def ref_ssim(x: torch.Tensor, y: torch.Tensor, win: int, sigma: float, rng: float) -> float:
    """Naive SSIM: explicit loops over valid window positions with 2-D Gaussian weights."""
    g = [math.exp(-((i - (win - 1) / 2) ** 2) / (2 * sigma**2)) for i in range(win)]
    s = sum(g)
    g = [v / s for v in g]
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    b, c, h, w = x.shape
    values = []
    for n in range(b):
        per_image = []
        for ch in range(c):
            for i in range(h - win + 1):
                for j in range(w - win + 1):
                    mx = my = sxx = syy = sxy = 0.0
                    for u in range(win):
                        for v in range(win):
                            wt = g[u] * g[v]
                            a, bb = float(x[n, ch, i + u, j + v]), float(y[n, ch, i + u, j + v])
                            mx += wt * a
                            my += wt * bb
                            sxx += wt * a * a
                            syy += wt * bb * bb
                            sxy += wt * a * bb
                    vx, vy, cxy = sxx - mx * mx, syy - my * my, sxy - mx * my
                    per_image.append(
                        (2 * mx * my + c1)
                        * (2 * cxy + c2)
                        / ((mx * mx + my * my + c1) * (vx + vy + c2))
                    )
        values.append(sum(per_image) / len(per_image))
    return sum(values) / len(values)


def test_ssim_identity_is_one() -> None:
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert L.ssim(x, x).item() == pytest.approx(1.0)


def test_ssim_constant_images_hand_value() -> None:
    # constant images a, b: all local variances/covariance are 0, so
    # SSIM = (2ab + C1) / (a^2 + b^2 + C1) * (C2 / C2), C1 = 1e-4
    x = torch.full((1, 1, 16, 16), 0.2, dtype=torch.float64)
    y = torch.full((1, 1, 16, 16), 0.6, dtype=torch.float64)
    expected = (2 * 0.2 * 0.6 + 1e-4) / (0.2**2 + 0.6**2 + 1e-4)
    assert L.ssim(x, y).item() == pytest.approx(expected)


def test_ssim_image_smaller_than_window() -> None:
    # 1x1 images: the window shrinks to one pixel, variances are 0 -> same formula as above:
    # (2 * 0.5 * 0.25 + 1e-4) / (0.25 + 0.0625 + 1e-4)
    x = torch.full((1, 1, 1, 1), 0.5, dtype=torch.float64)
    y = torch.full((1, 1, 1, 1), 0.25, dtype=torch.float64)
    assert L.ssim(x, y).item() == pytest.approx(0.2501 / 0.3126)
    # non-square, only one side below the window: still well defined and SSIM(x, x) = 1
    z = torch.rand(2, 3, 4, 20, dtype=torch.float64)
    assert L.ssim(z, z).item() == pytest.approx(1.0)
    assert L.ssim(z, torch.rand_like(z)).item() < 0.9


def test_ssim_matches_naive_reference() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 2, 7, 6, dtype=torch.float64, generator=g)
    y = torch.rand(2, 2, 7, 6, dtype=torch.float64, generator=g)
    out = L.ssim(x, y, window_size=5, sigma=1.0)
    assert out.item() == pytest.approx(ref_ssim(x, y, win=5, sigma=1.0, rng=1.0))
    # data_range scales consistently: SSIM(255x, 255y; L=255) == SSIM(x, y; L=1)
    scaled = L.ssim(255 * x, 255 * y, data_range=255.0, window_size=5, sigma=1.0)
    assert scaled.item() == pytest.approx(out.item())


def test_ssim_decreases_with_noise() -> None:
    g = torch.Generator().manual_seed(2)
    # a smooth image: structure the noise can destroy
    ramp = torch.linspace(0, 1, 24, dtype=torch.float64)
    x = (ramp[None, :] * ramp[:, None]).expand(1, 3, 24, 24).contiguous()
    noise = torch.randn(x.shape, dtype=torch.float64, generator=g)
    scores = [L.ssim(x, (x + s * noise).clamp(0, 1)).item() for s in (0.0, 0.02, 0.1, 0.3)]
    assert scores[0] == pytest.approx(1.0)
    assert scores == sorted(scores, reverse=True)
    assert scores[-1] < 0.5


def test_ssim_gradcheck() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 2, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.rand(1, 2, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: L.ssim(a, b, window_size=3), (x, y))


def test_ssim_matches_skimage_if_available() -> None:
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(4)
    x = torch.rand(1, 1, 32, 32, dtype=torch.float64, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, dtype=torch.float64, generator=g)).clamp(0, 1)
    ref = metrics.structural_similarity(
        x[0, 0].numpy(),
        y[0, 0].numpy(),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
    )
    assert L.ssim(x, y).item() == pytest.approx(ref, abs=1e-6)


# --------------------------------------------------------------------------------------------
# embedding_l2 and gradient flow
# --------------------------------------------------------------------------------------------


def test_embedding_l2_hand_values() -> None:
    a = t([[1.0, 0.0], [0.0, 0.0]])
    b = t([[0.0, 0.0], [0.0, 3.0]])
    # squared distances 1 and 9 -> mean 5
    assert L.embedding_l2(a, b).item() == pytest.approx(5.0)
    # normalised: (1, 0) vs (0, 1) -> 2
    assert L.embedding_l2(t([[2.0, 0.0]]), t([[0.0, 5.0]]), normalize=True).item() == (
        pytest.approx(2.0)
    )
    with pytest.raises(ValueError):
        L.embedding_l2(a, b[:1])


@pytest.mark.parametrize(
    "fn",
    [
        lambda q, k: L.clip_loss(q, k, 10.0),
        lambda q, k: L.info_nce(q, k),
        lambda q, k: L.info_nce(q, k, symmetric=True),
        lambda q, k: L.focal_info_nce(q, k),
        lambda q, k: L.decoupled_contrastive_loss(q, k, symmetric=True),
        lambda q, k: L.embedding_l2(q, k, normalize=True),
    ],
)
def test_gradients_flow_to_both_inputs(fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    q = torch.randn(4, 6, requires_grad=True)
    k = torch.randn(4, 6, requires_grad=True)
    fn(q, k).backward()
    for x in (q, k):
        assert x.grad is not None
        assert torch.isfinite(x.grad).all()
        assert x.grad.abs().sum() > 0


def test_losses_stable_at_small_temperature() -> None:
    q = torch.randn(8, 4)
    out = [
        L.info_nce(q, q, tau=1e-4),
        L.focal_info_nce(q, q, tau=1e-4),
        L.decoupled_contrastive_loss(q, q, tau=1e-4),
        L.clip_loss(q, q, 1e4),
    ]
    assert all(torch.isfinite(v) for v in out)


# --------------------------------------------------------------------------------------------
# robust and clean fine-tuning
# --------------------------------------------------------------------------------------------


def test_dclw_weights_the_positive_term_by_hand() -> None:
    q = t([[1.0, 0.0], [0.0, 1.0]])
    k = t([[1.0, 0.0], [1.0, 0.0]])  # s_00 = 1, s_11 = 0; negatives s_01 = 0, s_10 = 1
    tau, sigma = 1.0, 0.5
    sm = torch.softmax(torch.tensor([1.0, 0.0]) / sigma, 0).tolist()
    w = [2 - 2 * sm[0], 2 - 2 * sm[1]]
    expected = ((-w[0] * 1.0 + 0.0) + (-w[1] * 0.0 + 1.0)) / 2
    out = L.decoupled_contrastive_loss(q, k, tau=tau, weighted=True, sigma=sigma).item()
    assert out == pytest.approx(expected, rel=1e-6)
    assert L.decoupled_contrastive_loss(q, k, tau=tau).item() == pytest.approx((-1 + 1) / 2)


def test_fare_loss_is_the_squared_distance_of_unnormalised_embeddings() -> None:
    a, b = t([[3.0, 4.0], [1.0, 1.0]]), t([[0.0, 0.0], [1.0, 2.0]])
    assert L.fare_loss(a, b).item() == pytest.approx((25 + 1) / 2)


def test_zero_shot_ce_by_hand() -> None:
    img = t([[1.0, 0.0]])
    classes = t([[1.0, 0.0], [0.0, 2.0]])  # cosines 1 and 0
    expected = -math.log(math.exp(100) / (math.exp(100) + 1))
    assert L.zero_shot_ce(img, classes, torch.tensor([0])).item() == pytest.approx(expected,
                                                                                   abs=1e-6)
    assert L.zero_shot_ce(img, classes, torch.tensor([1]), scale=1.0).item() == pytest.approx(
        -math.log(math.exp(0) / (math.exp(1) + 1)), rel=1e-6)


def test_pmg_aft_terms_and_kl_direction_by_hand() -> None:
    adv, clean, orig = t([[0.0, 0.0]]), t([[math.log(3.0), 0.0]]), t([[0.0, math.log(3.0)]])
    out = L.pmg_aft_loss(adv, clean, orig, torch.tensor([0]))
    p_adv = [0.5, 0.5]
    p_orig, p_clean = [0.25, 0.75], [0.75, 0.25]

    def kl(p, q):  # KL(p || q)
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))

    assert out["ce"].item() == pytest.approx(math.log(2))
    assert out["kl_orig"].item() == pytest.approx(kl(p_orig, p_adv))  # KL(p_theta0(x_adv)||p(x_adv))
    assert out["kl_clean"].item() == pytest.approx(kl(p_clean, p_adv))  # KL(p_theta(x)||p(x_adv))
    assert out["total"].item() == pytest.approx(math.log(2) + 2 * kl(p_orig, p_adv))
    two = L.pmg_aft_loss(adv.repeat(2, 1), clean.repeat(2, 1), orig.repeat(2, 1),
                         torch.tensor([0, 0]), kl_reduction="sum")
    assert two["kl_orig"].item() == pytest.approx(2 * kl(p_orig, p_adv))  # the official sum


def test_pmg_aft_gradients_stay_finite_when_probabilities_underflow() -> None:
    """softmax(100 * cos) has exact zeros; both KL branches are differentiated (the clean
    one too), so a probability-space target would give NaN gradients (xlogy at 0)."""
    adv = torch.tensor([[100.0, -100.0, 0.0]], requires_grad=True)
    clean = torch.tensor([[-100.0, 100.0, -90.0]], requires_grad=True)
    orig = torch.tensor([[100.0, -100.0, -100.0]])
    out = L.pmg_aft_loss(adv, clean, orig, torch.tensor([0]))
    out["total"].backward()
    assert torch.isfinite(out["total"]) and torch.isfinite(adv.grad).all()
    assert torch.isfinite(clean.grad).all()
    s = torch.tensor([[100.0, -100.0]], requires_grad=True)
    L.distillation_kl(s, torch.tensor([[-100.0, 100.0]])).backward()
    assert torch.isfinite(s.grad).all()


def test_in_modal_loss_by_hand() -> None:
    e = t([[1.0, 0.0], [0.0, 1.0]])
    aug = t([[1.0, 0.0], [1.0, 0.0]])
    # row 0: logits [s, s] -> log 2; row 1: logits [0, 0] -> log 2 (scale s = 2)
    assert L.in_modal_loss(e, aug, 2.0).item() == pytest.approx(
        0.5 * (-math.log(math.exp(2) / (2 * math.exp(2))) - math.log(0.5)))


def test_distillation_kl_by_hand() -> None:
    s, teacher = t([[0.0, 0.0]]), t([[math.log(3.0), 0.0]])
    p, q = [0.75, 0.25], [0.5, 0.5]
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    assert L.distillation_kl(s, teacher).item() == pytest.approx(expected)
    assert L.distillation_kl(s, teacher, temperature=2.0).item() == pytest.approx(
        4 * sum(pi * math.log(pi / 0.5) for pi in torch.softmax(
            torch.tensor([math.log(3.0) / 2, 0.0]), 0).tolist()))


def test_hard_pair_weights_up_weight_the_most_confused_pairs() -> None:
    hp = L.HardPairWeights(3, beta=1.0, momentum=0.0)
    labels = torch.tensor([0, 0, 0, 0, 1])
    adv = torch.tensor([1, 1, 1, 2, 1])  # class 0 goes to 1 three times, to 2 once
    hp.update(labels, adv)
    assert hp.confusion[0].tolist() == pytest.approx([0.0, 0.75, 0.25])
    w = hp.weights(labels, adv)
    raw = torch.tensor([1 + 1.0, 1 + 1.0, 1 + 1.0, 1 + 0.25 / 0.75, 1.0])  # 1->1 is correct
    assert torch.allclose(w, raw / raw.mean())
    assert float(w.mean()) == pytest.approx(1.0)
    plain = L.HardPairWeights(3, beta=0.0)
    assert torch.equal(plain.weights(labels, adv), torch.ones(5))
