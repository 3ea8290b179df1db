"""The shared contrastive step: captions of a dataset as ids, sampled per item, and the
CLIP loss over a batch of images and their captions.

Zoo training, backdoor implants and clean contrastive fine-tuning all train on
``(image, one of its captions)`` pairs: :class:`CaptionTable` turns a dataset's captions
(real ones, else the class name in every prompt template) into ids over one list of unique
texts, and :func:`contrastive_loss` encodes each unique caption of a batch once and applies
the multi-positive CLIP loss (pairs that share a caption are positives of each other).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .. import losses
from ..data import ImageDataset

__all__ = ["CaptionTable", "contrastive_loss"]


class CaptionTable:
    """Caption ids of ``items`` of ``data`` (default: every item) over ``texts``.

    ``ids`` is ``[n, W]`` (padded), ``count`` ``[n]`` the number of captions of each item;
    ``row[i]`` is the table row of dataset item ``i`` (-1 when not in the table). Items
    without real captions get the class name in every prompt template; items with neither
    have no caption (``count == 0``).
    """

    def __init__(self, data: ImageDataset, items: Sequence[int] | torch.Tensor | None = None
                 ) -> None:
        items = list(range(len(data))) if items is None else [int(i) for i in items]
        labels = data.labels() if data.classnames else None
        unique: dict[str, int] = {}
        per_item: list[list[int]] = []
        for i in items:
            caps = data.captions(i) if data.has_captions else []
            if not caps and labels is not None and int(labels[i]) >= 0:
                name = data.classnames[int(labels[i])]
                caps = [t.format(name) for t in data.templates]
            per_item.append([unique.setdefault(c, len(unique)) for c in caps])
        self.texts: list[str] = list(unique)
        self.items = torch.tensor(items, dtype=torch.long)
        self.row = torch.full((len(data),), -1, dtype=torch.long)
        self.row[self.items] = torch.arange(len(items))
        width = max((len(c) for c in per_item), default=0) or 1
        self.ids = torch.zeros(len(items), width, dtype=torch.long)
        self.count = torch.tensor([len(c) for c in per_item], dtype=torch.long)
        for r, c in enumerate(per_item):
            self.ids[r, :len(c)] = torch.tensor(c, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.texts)

    def captions_of(self, item: int) -> list[int]:
        """Caption ids of dataset item ``item``."""
        r = int(self.row[item])
        return self.ids[r, :int(self.count[r])].tolist()

    def sample(self, items: torch.Tensor | Sequence[int], u: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """One caption id per item, the ``u``-th quantile (``u`` in [0, 1) per item) of its
        captions; returns ``(ids [B], has_caption [B] bool)``."""
        rows = self.row[torch.as_tensor(items, dtype=torch.long)]
        count = self.count[rows]
        pick = (u * count.clamp(min=1)).long().clamp(max=self.ids.shape[1] - 1)
        return self.ids[rows, pick], count > 0

    def mean_embedding(self, items: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Normalised mean of each item's caption embeddings, shaped ``items.shape + [D]``."""
        rows = self.row[items.flatten()]
        mask = torch.arange(self.ids.shape[1])[None] < self.count[rows][:, None]
        emb = (text_emb[self.ids[rows]] * mask[..., None].to(text_emb.dtype)).sum(1)
        return F.normalize(emb, dim=-1).view(*items.shape, -1)


def contrastive_loss(model, images: torch.Tensor, caption_ids: torch.Tensor,
                     tokens: torch.Tensor) -> torch.Tensor:
    """CLIP loss of ``images`` ``[B, 3, H, W]`` against their captions (``caption_ids`` into
    ``tokens``, the token ids of every caption text); each unique caption is encoded once,
    and items sharing a caption are positives of each other."""
    img = model.encode_image(images)
    uniq, inverse = torch.unique(caption_ids, return_inverse=True)
    txt = model.encode_text(tokens[uniq.to(tokens.device)])[inverse.to(img.device)]
    return losses.clip_loss(img, txt, model.clip.logit_scale.exp(),
                            labels=caption_ids.to(img.device))
