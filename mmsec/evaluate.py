"""Evaluation shared by every command: cached embeddings, zero-shot, retrieval, attacks.

Clean embeddings always go through the EmbeddingCache (keyed by the model's
fingerprint and each item's content hash), so evaluating the same model on
the same data twice encodes nothing the second time. Attacked images are new
pixels and are encoded directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import metrics
from .cache import EmbeddingCache, VectorIndex, content_hash
from .data import ImageDataset
from .errors import MmsecError

DEFAULT_BATCH = 256


def load_batch(ds: ImageDataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack items ``indices`` of ``ds``: ``(images [B,3,H,W] in [0,1], labels [B])``."""
    items = [ds.load(i) for i in indices]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def iterate(ds: ImageDataset, batch_size: int = DEFAULT_BATCH, progress: Callable | None = None,
            desc: str = "batches"):
    """Yield ``(indices, images, labels)`` batches over ``ds`` in order."""
    starts = range(0, len(ds), batch_size)
    if progress is not None:
        starts = progress(starts, desc=desc, total=len(starts))
    for s in starts:
        idx = list(range(s, min(len(ds), s + batch_size)))
        x, y = load_batch(ds, idx)
        yield idx, x, y


def encode_images(model, ds: ImageDataset, cache: EmbeddingCache, *,
                  batch_size: int = DEFAULT_BATCH, progress: bool = True) -> torch.Tensor:
    """Normalised image embeddings ``[N,D]`` (CPU float32) of all of ``ds``, through the cache."""
    keys = [ds.key(i) for i in range(len(ds))]

    def encode(idx: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_image(load_batch(ds, idx)[0]).cpu()

    return cache.encode(model.fingerprint, "image", keys, encode, batch_size, progress,
                        desc=f"encoding {ds.describe()}")


def encode_texts(model, texts: Sequence[str], cache: EmbeddingCache, *,
                 batch_size: int = 1024) -> torch.Tensor:
    """Normalised text embeddings ``[M,D]`` (CPU float32), through the cache."""
    keys = [content_hash(t) for t in texts]

    def encode(idx: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model.encode_text([texts[i] for i in idx]).cpu()

    return cache.encode(model.fingerprint, "text", keys, encode, batch_size, progress=False)


def caption_table(ds: ImageDataset) -> tuple[list[str], torch.Tensor]:
    """All captions of ``ds`` and the index of each caption's image."""
    texts, owner = [], []
    for i in range(len(ds)):
        for c in ds.captions(i):
            texts.append(c)
            owner.append(i)
    return texts, torch.tensor(owner, dtype=torch.long)


def predict(emb: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    return metrics.zero_shot_logits(emb, head.cpu()).argmax(1)


def evaluate_model(model, ds: ImageDataset, cache: EmbeddingCache, *,
                   bank: ImageDataset | None = None, batch_size: int = DEFAULT_BATCH,
                   progress: bool = True) -> dict[str, float]:
    """Clean metrics of ``model`` on ``ds``.

    ``zs_top1``/``zs_top5`` when the data has classes; ``knn_top1`` (k=20, T=0.07)
    against ``bank`` (a labelled training split) when given; retrieval recall@1/5/10
    both ways plus alignment/uniformity when the data has real captions.
    """
    out: dict[str, float] = {}
    emb = encode_images(model, ds, cache, batch_size=batch_size, progress=progress)
    labels = ds.labels()
    if ds.classnames:
        head = model.zero_shot_head(ds.classnames, ds.templates)
        acc = metrics.topk_accuracy(metrics.zero_shot_logits(emb, head.cpu()), labels, ks=(1, 5))
        out.update({"zs_top1": acc["top1"], "zs_top5": acc["top5"]})
    if bank is not None and bank.classnames:
        bank_emb = encode_images(model, bank, cache, batch_size=batch_size, progress=progress)
        sims, idx = VectorIndex(bank_emb).knn(emb, 20)
        out["knn_top1"] = metrics.knn_accuracy(None, labels, None, bank.labels(), k=20, T=0.07,
                                               neighbors=(sims, idx),
                                               num_classes=len(bank.classnames))
    if ds.has_captions:
        texts, owner = caption_table(ds)
        text_emb = encode_texts(model, texts, cache)
        out.update(metrics.retrieval_recall(emb, text_emb, owner))
        out["alignment"] = metrics.alignment(emb[owner], text_emb)
        out["uniformity"] = metrics.uniformity(emb)
    return out


def attacked_embeddings(model, attack, artifact, ds: ImageDataset, *,
                        batch_size: int = DEFAULT_BATCH, progress: Callable | None = None,
                        desc: str = "attacking") -> torch.Tensor:
    """Embeddings ``[N,D]`` of ``attack.apply(artifact, images, labels)`` over all of ``ds``."""
    out = []
    for _, x, y in iterate(ds, batch_size, progress, desc):
        adv = attack.apply(artifact, x.to(model.device), y.to(model.device))
        with torch.no_grad():
            out.append(model.encode_image(adv).cpu())
    return torch.cat(out)


def resolve_target(artifact, ds: ImageDataset) -> int | None:
    """The class index a targeted artifact (a backdoor trigger) aims at, in ``ds``'s classes.

    Artifacts carry ``meta["target_name"]`` (matched by name, so a trigger made on one
    split or dataset evaluates on another) and/or ``meta["target"]`` (an index).
    """
    name, index = artifact.meta.get("target_name"), artifact.meta.get("target")
    if name is not None and ds.classnames and name in ds.classnames:
        return ds.classnames.index(name)
    if name is not None and ds.classnames:
        raise MmsecError(f"the trigger targets class {name!r}, which {ds.describe()} lacks "
                         f"(classes: {', '.join(ds.classnames[:10])} ...)")
    return None if index is None else int(index)


def attack_metrics(model, ds: ImageDataset, clean_emb: torch.Tensor, adv_emb: torch.Tensor,
                   *, prefix: str = "", bank: tuple[torch.Tensor, torch.Tensor] | None = None,
                   cache: EmbeddingCache | None = None, target: int | None = None,
                   ) -> dict[str, float]:
    """Zero-shot, kNN and retrieval effects of replacing ``clean_emb`` with ``adv_emb``.

    Keys (with ``prefix``): ``clean_top1``, ``adv_top1``, ``fooling_rate``;
    ``clean_acc`` (CA) and ``asr`` when the attack has a ``target`` class;
    ``knn_fooling_rate`` when ``bank = (bank_emb, bank_labels)``; retrieval
    ``adv_i2t_r1`` ... and ``retrieval_asr_*`` when the data has captions.
    """
    out: dict[str, float] = {}
    labels = ds.labels()
    if ds.classnames:
        head = model.zero_shot_head(ds.classnames, ds.templates)
        clean_pred, adv_pred = predict(clean_emb, head), predict(adv_emb, head)
        out["clean_top1"] = metrics.clean_accuracy(clean_pred, labels)
        out["adv_top1"] = metrics.clean_accuracy(adv_pred, labels)
        out["fooling_rate"] = metrics.fooling_rate(clean_pred, adv_pred)
        if target is not None:
            out["clean_acc"] = out["clean_top1"]
            out["asr"] = metrics.attack_success_rate(adv_pred, labels, target)
    if bank is not None:
        index = VectorIndex(bank[0])
        out["knn_fooling_rate"] = metrics.knn_fooling_rate(
            None, None, None, bank[1], k=20, T=0.07, clean_neighbors=index.knn(clean_emb, 20),
            adv_neighbors=index.knn(adv_emb, 20))
    if ds.has_captions and cache is not None:
        texts, owner = caption_table(ds)
        text_emb = encode_texts(model, texts, cache)
        before = metrics.retrieval_hits(clean_emb, text_emb, owner)
        after = metrics.retrieval_hits(adv_emb, text_emb, owner)
        for k, hits in after.items():
            out[f"clean_{k}"] = float(before[k].float().mean())
            out[f"adv_{k}"] = float(hits.float().mean())
            if before[k].any():
                out[f"retrieval_asr_{k}"] = metrics.retrieval_asr(before[k], hits)
    return {f"{prefix}{k}": v for k, v in out.items()}


def evaluate_attack(model, ds: ImageDataset, attack, artifact, cache: EmbeddingCache, *,
                    control=None, bank: ImageDataset | None = None,
                    batch_size: int = DEFAULT_BATCH, progress: Callable | None = None,
                    ) -> dict[str, float]:
    """Clean vs attacked metrics on ``ds`` (see ``attack_metrics``), and the same for ``control``."""
    clean = encode_images(model, ds, cache, batch_size=batch_size, progress=progress is not None)
    bank_t = None
    if bank is not None:
        bank_t = (encode_images(model, bank, cache, batch_size=batch_size,
                                progress=progress is not None), bank.labels())
    target = resolve_target(artifact, ds)
    adv = attacked_embeddings(model, attack, artifact, ds, batch_size=batch_size,
                              progress=progress, desc="attack")
    out = attack_metrics(model, ds, clean, adv, bank=bank_t, cache=cache, target=target)
    if control is not None:
        ctrl = attacked_embeddings(model, attack, control, ds, batch_size=batch_size,
                                   progress=progress, desc="control")
        out.update({k: v for k, v in attack_metrics(model, ds, clean, ctrl, prefix="control_",
                                                     bank=bank_t, cache=cache,
                                                     target=target).items()
                    if not k.startswith("control_clean")})
    return out
