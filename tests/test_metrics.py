"""Tests for mmsec.metrics against values worked out by hand on tiny inputs."""

from __future__ import annotations

import math

import pytest
import torch

from mmsec import metrics as M


def t(rows: list) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------


def test_zero_shot_logits_are_cosines() -> None:
    # image 0 = (3, 4) -> normalised (0.6, 0.8); image 1 = (2, 0) -> (1, 0).
    # classes (1, 0) and (0, 2) -> (1, 0), (0, 1). Cosines are the normalised coordinates.
    out = M.zero_shot_logits(t([[3, 4], [2, 0]]), t([[1, 0], [0, 2]]))
    torch.testing.assert_close(out, t([[0.6, 0.8], [1.0, 0.0]]))


def test_zero_shot_logits_half_input_is_upcast() -> None:
    out = M.zero_shot_logits(torch.ones(2, 3, dtype=torch.float16), torch.ones(1, 3))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.ones(2, 1))


def test_topk_accuracy_hand_values() -> None:
    logits = t(
        [
            [0.1, 0.7, 0.2],  # label 1 has the largest logit -> rank 0 (top1 hit)
            [0.5, 0.3, 0.2],  # label 2 is the smallest      -> rank 2 (hit only at k=3)
            [0.2, 0.3, 0.5],  # label 1 is second            -> rank 1 (hit from k=2)
        ]
    )
    labels = torch.tensor([1, 2, 1])
    out = M.topk_accuracy(logits, labels, ks=(1, 2, 3))
    assert out == pytest.approx({"top1": 1 / 3, "top2": 2 / 3, "top3": 1.0})


def test_topk_accuracy_k_larger_than_classes_is_clamped() -> None:
    logits = t([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
    labels = torch.tensor([1, 2])
    # default ks=(1, 5): with C=3, k=5 is clamped to 3 -> every sample is a hit.
    out = M.topk_accuracy(logits, labels)
    assert out == pytest.approx({"top1": 0.5, "top5": 1.0})


def test_topk_accuracy_ties_go_to_lower_index_like_argmax() -> None:
    logits = t([[0.5, 0.5, 0.1], [0.5, 0.5, 0.1]])
    # Row 0 label 0 wins the tie (lower index) -> hit; row 1 label 1 loses it -> miss at k=1,
    # hit at k=2.
    labels = torch.tensor([0, 1])
    out = M.topk_accuracy(logits, labels, ks=(1, 2))
    assert out == pytest.approx({"top1": 0.5, "top2": 1.0})
    assert out["top1"] == M.clean_accuracy(logits.argmax(1), labels)


def test_topk_accuracy_nan_true_logit_is_a_miss() -> None:
    # a NaN score for the true class must never count as correct; NaN elsewhere ranks last
    logits = t([[float("nan"), 0.1], [float("nan"), 0.1]])
    assert M.topk_accuracy(logits, torch.tensor([0, 1]), ks=(1, 2)) == {"top1": 0.5, "top2": 0.5}


def test_topk_accuracy_errors() -> None:
    with pytest.raises(ValueError):
        M.topk_accuracy(t([[0.1, 0.2]]), torch.tensor([2]))  # label out of range
    with pytest.raises(ValueError):
        M.topk_accuracy(t([[0.1, 0.2]]), torch.tensor([0]), ks=(0,))
    with pytest.raises(ValueError):
        M.topk_accuracy(t([[0.1, 0.2]]), torch.tensor([0, 1]))  # length mismatch


def test_clean_accuracy_and_fooling_rate() -> None:
    # 2 of 3 predictions match the labels.
    assert M.clean_accuracy(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2])) == pytest.approx(
        2 / 3
    )
    # positions 1 and 3 change (1->2, 3->0): 2 of 4.
    assert M.fooling_rate(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 2, 0])) == 0.5
    with pytest.raises(ValueError):
        M.fooling_rate(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError):
        M.clean_accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))


def test_attack_success_rate_counts_only_non_target_items() -> None:
    pred = torch.tensor([0, 0, 1, 0, 2])
    labels = torch.tensor([0, 1, 1, 2, 2])
    # target 0: item 0 (label 0) is ignored; items 1..4 have preds 0, 1, 0, 2 -> 2 of 4 hit 0.
    assert M.attack_success_rate(pred, labels, target=0) == 0.5
    # target 2: items 0..2 (labels 0, 1, 1) have preds 0, 0, 1 -> none is 2.
    assert M.attack_success_rate(pred, labels, target=2) == 0.0


def test_attack_success_rate_without_non_target_items_raises() -> None:
    with pytest.raises(ValueError):
        M.attack_success_rate(torch.tensor([0, 1]), torch.tensor([3, 3]), target=3)


# --------------------------------------------------------------------------------------------
# kNN
# --------------------------------------------------------------------------------------------


def _knn_bank() -> tuple[torch.Tensor, torch.Tensor]:
    # Cosines to the query (1, 0): 0.9 (label 0), 0.5 (label 1), 0.5 (label 1), -1 (label 0).
    s = math.sqrt(1 - 0.81)
    r = math.sqrt(1 - 0.25)
    bank = t([[0.9, s], [0.5, r], [0.5, -r], [-1.0, 0.0]])
    return bank, torch.tensor([0, 1, 1, 0])


def test_knn_predict_weighting_by_temperature() -> None:
    bank, labels = _knn_bank()
    q = t([[1.0, 0.0]])
    # k=3 neighbours: class 0 gets exp(0.9/T), class 1 gets 2 exp(0.5/T).
    # class 0 wins iff 0.4 / T > ln 2, i.e. T < 0.577.
    assert M.knn_predict(q, bank, labels, k=3, T=0.5).tolist() == [0]
    assert M.knn_predict(q, bank, labels, k=3, T=1.0).tolist() == [1]
    # k=1: only the 0.9 neighbour votes.
    assert M.knn_predict(q, bank, labels, k=1, T=1.0).tolist() == [0]
    # k > M is clamped to M=4: the extra label-0 item adds exp(-1/T) -> at T=1:
    # class 0 = e^0.9 + e^-1 = 2.46 + 0.37 = 2.83 < class 1 = 2 e^0.5 = 3.30 -> class 1.
    assert M.knn_predict(q, bank, labels, k=50, T=1.0).tolist() == [1]


def test_knn_predict_precomputed_neighbors_are_used_verbatim() -> None:
    labels = torch.tensor([0, 1, 1])
    # Neighbours given directly: no embeddings at all, so nothing can be recomputed.
    sims = t([[0.9, 0.5, 0.5], [0.2, 0.9, 0.1]])
    idx = torch.tensor([[0, 1, 2], [0, 1, -1]])  # -1 = FAISS "no neighbour", ignored
    pred = M.knn_predict(None, None, labels, T=0.5, neighbors=(sims, idx))
    # row 0 as in the temperature test (T=0.5 -> class 0); row 1: class 1 via idx 1 (0.9).
    assert pred.tolist() == [0, 1]
    # a query without any valid neighbour gets -1 (counts as wrong, never as a class)
    none = (t([[0.3, float("nan")]]), torch.tensor([[-1, 0]]))
    assert M.knn_predict(None, None, labels, neighbors=none).tolist() == [-1]
    # Embeddings that would give another answer are ignored when neighbours are given.
    bank, _ = _knn_bank()
    far = t([[-1.0, 0.0], [-1.0, 0.0]])
    pred2 = M.knn_predict(far, bank[:3], labels, T=0.5, neighbors=(sims, idx))
    assert pred2.tolist() == [0, 1]


def test_knn_predict_num_classes_and_errors() -> None:
    bank, labels = _knn_bank()
    q = t([[1.0, 0.0]])
    assert M.knn_predict(q, bank, labels, k=1, num_classes=5).tolist() == [0]
    with pytest.raises(ValueError):
        M.knn_predict(q, bank, labels, k=1, num_classes=1)  # label 1 out of range
    with pytest.raises(ValueError):
        M.knn_predict(None, bank, labels)
    with pytest.raises(ValueError):
        M.knn_predict(q, bank, labels, T=0.0)


def test_knn_chunking_matches_unchunked() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(37, 8, generator=g)
    bank = torch.randn(50, 8, generator=g)
    labels = torch.randint(0, 4, (50,), generator=g)
    a = M.knn_predict(q, bank, labels, k=5, chunk_size=4)
    b = M.knn_predict(q, bank, labels, k=5)
    assert torch.equal(a, b)


def test_knn_accuracy_and_fooling_rate() -> None:
    bank = t([[1.0, 0.0], [0.0, 1.0]])
    bank_labels = torch.tensor([0, 1])
    # With k=1 each query takes the label of its closest bank axis.
    clean = t([[1.0, 0.1], [0.1, 1.0], [1.0, 0.2]])  # -> 0, 1, 0
    adv = t([[0.1, 1.0], [0.1, 1.0], [1.0, 0.2]])  # -> 1, 1, 0 (only the first flips)
    assert M.knn_accuracy(clean, torch.tensor([0, 1, 1]), bank, bank_labels, k=1) == (
        pytest.approx(2 / 3)
    )
    assert M.knn_fooling_rate(clean, adv, bank, bank_labels, k=1) == pytest.approx(1 / 3)
    # the same through precomputed neighbours
    nb_clean = (t([[0.99], [0.99], [0.98]]), torch.tensor([[0], [1], [0]]))
    nb_adv = (t([[0.99], [0.99], [0.98]]), torch.tensor([[1], [1], [0]]))
    rate = M.knn_fooling_rate(
        None, None, None, bank_labels, clean_neighbors=nb_clean, adv_neighbors=nb_adv
    )
    assert rate == pytest.approx(1 / 3)


# --------------------------------------------------------------------------------------------
# retrieval
# --------------------------------------------------------------------------------------------


def _retrieval_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = t([[1.0, 0.0], [0.0, 1.0]])
    texts = t([[0.6, 0.8], [0.8, 0.6], [1.0, 0.0]])
    text_to_image = torch.tensor([0, 0, 1])  # texts 0, 1 describe image 0; text 2 image 1
    # similarity image x text:
    #   image 0: [0.6, 0.8, 1.0] -> order t2, t1, t0; best own caption t1 at rank 1
    #   image 1: [0.8, 0.6, 0.0] -> order t0, t1, t2; own caption t2 at rank 2
    # text -> image:
    #   t0: [0.6, 0.8] own image 0 at rank 1; t1: [0.8, 0.6] rank 0; t2: [1.0, 0.0] image 1
    #   at rank 1
    return images, texts, text_to_image


def test_retrieval_hits_and_recall_hand_values() -> None:
    images, texts, t2i = _retrieval_case()
    hits = M.retrieval_hits(images, texts, t2i, ks=(1, 2, 3))
    assert hits["i2t_r1"].tolist() == [False, False]
    assert hits["i2t_r2"].tolist() == [True, False]
    assert hits["i2t_r3"].tolist() == [True, True]
    assert hits["t2i_r1"].tolist() == [False, True, False]
    assert hits["t2i_r2"].tolist() == [True, True, True]
    rec = M.retrieval_recall(images, texts, t2i, ks=(1, 2, 3))
    assert rec == pytest.approx(
        {"i2t_r1": 0.0, "i2t_r2": 0.5, "i2t_r3": 1.0, "t2i_r1": 1 / 3, "t2i_r2": 1.0, "t2i_r3": 1.0}
    )


def test_retrieval_recall_default_keys() -> None:
    images, texts, t2i = _retrieval_case()
    rec = M.retrieval_recall(images, texts, t2i)
    assert set(rec) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}
    # k >= number of candidates -> every query is a hit
    assert rec["i2t_r5"] == rec["t2i_r5"] == rec["i2t_r10"] == 1.0


def test_retrieval_ties_go_to_lower_index() -> None:
    images = t([[1.0, 0.0], [0.0, 1.0]])
    texts = t([[1.0, 0.0], [1.0, 0.0]])  # identical texts -> tie for every image
    t2i = torch.tensor([1, 0])  # text 1 (the later index) is image 0's caption
    hits = M.retrieval_hits(images, texts, t2i, ks=(1, 2))
    # image 0: sims [1, 1], tie -> t0 ranked first, own caption t1 at rank 1 -> miss at k=1;
    # image 1: sims [0, 0], tie -> own caption t0 (lower index) at rank 0 -> hit
    assert hits["i2t_r1"].tolist() == [False, True]
    assert hits["i2t_r2"].tolist() == [True, True]
    # text 0 = (1, 0) is most similar to image 0 but belongs to image 1 -> miss at k=1
    assert hits["t2i_r1"].tolist() == [False, True]


def test_retrieval_nan_embeddings_are_misses() -> None:
    images, texts, t2i = _retrieval_case()
    images[0] = float("nan")
    hits = M.retrieval_hits(images, texts, t2i, ks=(3,))
    # with k=3 every query would hit; NaN image 0 misses as a query and as a target
    assert hits["i2t_r3"].tolist() == [False, True]
    assert hits["t2i_r3"].tolist() == [False, False, True]


def test_retrieval_image_without_caption_raises() -> None:
    images, texts, _ = _retrieval_case()
    with pytest.raises(ValueError):
        M.retrieval_hits(images, texts, torch.tensor([0, 0, 0]))


def test_retrieval_matches_bruteforce_with_chunks() -> None:
    g = torch.Generator().manual_seed(1)
    n, per = 11, 3
    images = torch.randn(n, 6, generator=g)
    texts = images.repeat_interleave(per, 0) + 0.8 * torch.randn(n * per, 6, generator=g)
    t2i = torch.arange(n).repeat_interleave(per)
    ks = (1, 3, 5)
    hits = M.retrieval_hits(images, texts, t2i, ks=ks, chunk_size=4)
    sims = M.zero_shot_logits(images, texts)
    for k in ks:
        top_t = sims.topk(k, dim=1).indices
        ref_i2t = [bool((t2i[top_t[i]] == i).any()) for i in range(n)]
        top_i = sims.T.topk(k, dim=1).indices
        ref_t2i = [bool((top_i[j] == t2i[j]).any()) for j in range(n * per)]
        assert hits[f"i2t_r{k}"].tolist() == ref_i2t
        assert hits[f"t2i_r{k}"].tolist() == ref_t2i


def test_retrieval_asr() -> None:
    before = torch.tensor([True, True, False, True])
    after = torch.tensor([False, True, True, False])
    # correct before: queries 0, 1, 3; broken (before and not after): 0 and 3 -> 2/3
    assert M.retrieval_asr(before, after) == pytest.approx(2 / 3)
    # over all 4 queries instead: 2/4
    assert M.retrieval_asr(before, after, conditional=False) == 0.5
    with pytest.raises(ValueError):
        M.retrieval_asr(torch.tensor([False]), torch.tensor([False]))


# --------------------------------------------------------------------------------------------
# alignment / uniformity
# --------------------------------------------------------------------------------------------


def test_alignment_hand_values() -> None:
    x = t([[2.0, 0.0], [0.0, 1.0]])  # normalised: (1, 0), (0, 1)
    y = t([[0.0, 3.0], [0.0, 1.0]])  # normalised: (0, 1), (0, 1)
    # distances: sqrt(2) and 0
    assert M.alignment(x, y) == pytest.approx((2 + 0) / 2)
    assert M.alignment(x, y, alpha=1) == pytest.approx(math.sqrt(2) / 2)
    with pytest.raises(ValueError):
        M.alignment(x, y[:1])


def test_uniformity_hand_values() -> None:
    x = t([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])  # normalised: e0, e1, -e0
    # squared distances of pairs (0,1)=2, (0,2)=4, (1,2)=2; t=2:
    expected = math.log((math.exp(-4) + math.exp(-8) + math.exp(-4)) / 3)
    assert M.uniformity(x) == pytest.approx(expected)
    assert M.uniformity(x, chunk_size=1) == pytest.approx(expected)
    # t=1 -> log mean(e^-2, e^-4, e^-2)
    assert M.uniformity(x, t=1) == pytest.approx(math.log((2 * math.exp(-2) + math.exp(-4)) / 3))
    # identical points: every distance 0 -> log 1 = 0
    assert M.uniformity(torch.ones(4, 3)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        M.uniformity(torch.ones(1, 3))


def test_uniformity_chunking_matches_dense() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.nn.functional.normalize(torch.randn(30, 5, generator=g, dtype=torch.float64), dim=1)
    sq = torch.cdist(x, x).pow(2)
    iu = torch.triu_indices(30, 30, offset=1)
    dense = sq[iu[0], iu[1]].mul(-2).exp().mean().log().item()
    assert M.uniformity(x, chunk_size=7) == pytest.approx(dense)


def test_metrics_do_not_track_gradients() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    out = M.zero_shot_logits(x, torch.randn(2, 3))
    assert not out.requires_grad


def _reference_hits(images, texts, t2i, ks):
    """Retrieval hits by full stable sorts (ties: lower index first; NaN never a hit)."""
    img, txt = M._normalize(images), M._normalize(texts)
    n = img.shape[0]

    def positions(sims):  # [R, C] -> rank of every column in its row
        order = sims.nan_to_num(nan=float("-inf")).sort(dim=1, descending=True, stable=True)
        pos = torch.empty_like(order.indices)
        pos.scatter_(1, order.indices, torch.arange(sims.shape[1]).expand_as(pos))
        return pos

    bad_i, bad_t = img.isnan().any(1), txt.isnan().any(1)
    never = 10**9
    pos_it = positions(img @ txt.T)
    own = t2i[None, :] == torch.arange(n)[:, None]
    i2t = pos_it.masked_fill(~own | bad_t[None, :], never).min(dim=1).values
    i2t = i2t.masked_fill(bad_i, never)
    t2i_rank = positions(txt @ img.T).gather(1, t2i[:, None]).squeeze(1)
    t2i_rank = t2i_rank.masked_fill(bad_t | bad_i[t2i], never)
    return {**{f"i2t_r{k}": i2t < k for k in ks}, **{f"t2i_r{k}": t2i_rank < k for k in ks}}


@pytest.mark.parametrize("seed", range(4))
def test_retrieval_topk_matches_full_ranking_with_ties(seed: int) -> None:
    """The top-k retrieval gives the hits of a full ranking, exact ties and NaN included:
    one-hot and duplicated embeddings make many exactly equal similarities."""
    g = torch.Generator().manual_seed(seed)
    n, d = 40, 6
    eye = torch.cat([torch.eye(d), -torch.eye(d), torch.zeros(1, d)])
    images = eye[torch.randint(len(eye), (n,), generator=g)]
    images[: n // 4] = torch.randn(n // 4, d, generator=g)
    per = torch.randint(1, 4, (n,), generator=g)
    t2i = torch.arange(n).repeat_interleave(per)[torch.randperm(int(per.sum()), generator=g)]
    texts = eye[torch.randint(len(eye), (len(t2i),), generator=g)]
    texts[::3] = images[t2i[::3]]  # duplicates of their image (and of each other)
    images[3], texts[5] = float("nan"), float("nan")
    for ks in ((1,), (1, 2, 5, 10), (3, 200)):  # top-k paths, and k >= N, M (full ranks)
        ref = _reference_hits(images, texts, t2i, ks)
        for chunk in (7, 1024):
            hits = M.retrieval_hits(images, texts, t2i, ks=ks, chunk_size=chunk)
            for key in ref:
                assert hits[key].tolist() == ref[key].tolist(), (key, chunk)


def test_retrieval_topk_matches_full_ranking_random() -> None:
    g = torch.Generator().manual_seed(0)
    n, per = 300, 3
    images = torch.randn(n, 16, generator=g)
    texts = images.repeat_interleave(per, 0) + 1.5 * torch.randn(n * per, 16, generator=g)
    t2i = torch.arange(n).repeat_interleave(per)
    ks = (1, 5, 10)
    ref = _reference_hits(images, texts, t2i, ks)
    hits = M.retrieval_hits(images, texts, t2i, ks=ks, chunk_size=4096)
    assert all(hits[key].tolist() == ref[key].tolist() for key in ref)
    assert 0 < float(ref["i2t_r1"].float().mean()) < 1  # not trivial


def test_retrieval_probe_computes_clean_hits_once(monkeypatch) -> None:
    """Attacked views measured without the clean one share one computation of its hits."""
    from mmsec.evaluation import probes
    from mmsec.evaluation.views import Task, View

    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(6, 4, generator=g), torch.randn(12, 4, generator=g)
    task = Task(n_items=6, split="test", dataset="toy", labels=torch.zeros(6, dtype=torch.long),
                caption_owner=torch.arange(6).repeat_interleave(2))
    clean = View("clean", images, texts, task)
    calls = []
    real = M.retrieval_hits
    monkeypatch.setattr(M, "retrieval_hits", lambda *a, **k: calls.append(a) or real(*a, **k))
    for i in range(3):
        adv = View(f"adv{i}", images + 0.5 * torch.randn(6, 4, generator=g), texts, task, clean)
        out = probes.retrieval(adv)
        assert "i2t_r1" in out
    assert len(calls) == 4  # three attacked views + the clean one, once
    assert torch.equal(clean.memo["retrieval_hits"]["i2t_r1"], real(images, texts,
                                                                    task.caption_owner)["i2t_r1"])
