"""The built-in probes: zero-shot, kNN, retrieval and embedding geometry.

Each reads a :class:`~mmsec.evaluation.views.View` and returns its numbers; mmsec's default
plugin registers them through ``register_metrics`` exactly as a third party registers its
own.
"""

from __future__ import annotations

from typing import Any

from .. import metrics
from ..avqi import avqi_components, layer_avqi
from ..search import VectorIndex
from .views import Metric, View

__all__ = ["BUILTIN_METRICS", "avqi", "geometry", "knn", "retrieval", "zero_shot"]

KNN_K, KNN_T = 20, 0.07


def zero_shot(view: View) -> dict[str, Any] | None:
    """``top1`` (and ``top5`` on clean images); ``fooling_rate`` (share of predictions the
    condition changes) and, for a targeted attack, ``asr`` (share of non-target images sent
    to the target)."""
    t = view.task
    if t.head is None:
        return None
    # items without a label (-1: a captions row that leaves the optional label out) are not
    # scored; the figures then say over how many items they are
    labelled = t.labels >= 0
    if not bool(labelled.any()):
        return None
    partial = not bool(labelled.all())
    labels = t.labels[labelled]
    logits = metrics.zero_shot_logits(view.images, t.head)
    pred = logits.argmax(1)
    view.memo["zero_shot_pred"] = pred
    n = int(labelled.sum())

    def counted(value: float) -> Any:
        return (value, n) if partial else value

    out: dict[str, Any] = {"top1": counted(metrics.clean_accuracy(pred[labelled], labels))}
    if view.is_clean:
        out["top5"] = counted(metrics.topk_accuracy(logits[labelled], labels, ks=(5,))["top5"])
        return out
    clean_pred = view.clean.memo.get("zero_shot_pred")
    if clean_pred is None:
        clean_pred = metrics.zero_shot_logits(view.clean.images, t.head).argmax(1)
    out["fooling_rate"] = counted(metrics.fooling_rate(clean_pred[labelled], pred[labelled]))
    if t.target is not None:
        out["asr"] = metrics.attack_success_rate(pred[labelled], labels, t.target)
    return out


def _bank_index(view: View) -> VectorIndex:
    t = view.task
    if "bank_index" not in t.memo:
        t.memo["bank_index"] = VectorIndex(t.bank[0], device=t.device, kind="exact")
    return t.memo["bank_index"]


def knn(view: View) -> dict[str, Any] | None:
    """Weighted kNN (k=20, T=0.07) against a labelled bank of training images:
    ``knn_top1`` on clean images, ``knn_fooling_rate`` under a condition."""
    t = view.task
    if t.bank is None:
        return None
    index = _bank_index(view)
    neighbours = index.knn(view.images, KNN_K)
    view.memo["knn"] = neighbours
    num_classes = len(t.classnames) if t.classnames else int(t.bank[1].max()) + 1
    if view.is_clean:
        return {"knn_top1": metrics.knn_accuracy(None, t.labels, None, t.bank[1], k=KNN_K,
                                                 T=KNN_T, neighbors=neighbours,
                                                 num_classes=num_classes)}
    clean = view.clean.memo.get("knn")
    if clean is None:
        clean = view.clean.memo["knn"] = index.knn(view.clean.images, KNN_K)
    return {"knn_fooling_rate": metrics.knn_fooling_rate(
        None, None, None, t.bank[1], k=KNN_K, T=KNN_T, clean_neighbors=clean,
        adv_neighbors=neighbours)}


def retrieval(view: View) -> dict[str, Any] | None:
    """Recall@1/5/10 image->text (``i2t_r*``, over images) and text->image (``t2i_r*``, over
    captions); under a condition, ``retrieval_asr_*``: share of queries correct before and
    not after (C-PGC's attack success rate)."""
    t = view.task
    if view.texts is None or t.caption_owner is None or t.caption_owner.numel() == 0:
        return None
    hits = metrics.retrieval_hits(view.images, view.texts, t.caption_owner)
    view.memo["retrieval_hits"] = hits
    n_texts = int(t.caption_owner.numel())
    out: dict[str, Any] = {}
    for k, h in hits.items():
        out[k] = (float(h.float().mean()), n_texts if k.startswith("t2i") else t.n_items)
    if view.is_clean:
        return out
    before = view.clean.memo.get("retrieval_hits")
    if before is None:  # the clean view was not measured: compute its hits once, here
        before = metrics.retrieval_hits(view.clean.images, view.clean.texts, t.caption_owner)
        view.clean.memo["retrieval_hits"] = before
    for k, h in hits.items():
        if before[k].any():
            n = int(before[k].sum())
            out[f"retrieval_asr_{k}"] = (metrics.retrieval_asr(before[k], h), n)
    return out


def geometry(view: View) -> dict[str, Any] | None:
    """Alignment of image-caption pairs and uniformity of the images (Wang & Isola), clean."""
    t = view.task
    if not view.is_clean or view.texts is None or t.caption_owner is None \
            or t.caption_owner.numel() == 0 or view.images.shape[0] < 2:
        return None
    return {"alignment": metrics.alignment(view.images[t.caption_owner], view.texts),
            "uniformity": metrics.uniformity(view.images)}


def avqi(view: View) -> dict[str, Any] | None:
    """AVQI (:mod:`mmsec.avqi`) of the condition's image embeddings against the clean ones
    (``avqi``: in [0, 1], higher = attacked images camouflaged among clean ones), and per
    image layer (``avqi_<layer>``) over the views' layer activations."""
    if view.is_clean or view.images is view.clean.images or len(view.images) < 2:
        return None
    out: dict[str, Any] = {"avqi": avqi_components(view.clean.images, view.images)["avqi"]}
    if view.layers and view.clean.layers:
        n = min(len(next(iter(view.layers.values()))),
                len(next(iter(view.clean.layers.values()))))
        for name, value in layer_avqi(view.clean.layers, view.layers).items():
            out[f"avqi_{name}"] = (value, n)
    return out


BUILTIN_METRICS = (
    Metric("zero_shot", zero_shot, "zero-shot top-1/top-5; fooling rate and ASR under attack",
           relative=("fooling_rate", "asr")),
    Metric("knn", knn, "weighted kNN top-1 (k=20, T=0.07) and kNN fooling rate",
           relative=("knn_fooling_rate",)),
    Metric("retrieval", retrieval, "image->text / text->image recall@1/5/10 and retrieval ASR",
           relative=("retrieval_asr_",)),
    Metric("geometry", geometry, "alignment and uniformity of clean embeddings (Wang & Isola)"),
    Metric("avqi", avqi, "AVQI: attacked vs clean embeddings' cluster overlap, final and per "
                         "layer (higher = more vulnerable)", relative=("avqi", "avqi_"),
           layers=True),
)
