"""The implant's poisoned training set, written out as image files and a captions file.

The implant (``implant.py``) poisons on the fly and keeps nothing; a data defense (the
``scan`` plugin) needs the poisoned set itself, with the ground truth. ``export_poisoned``
rebuilds it from the trigger spec alone (``backdoor.safetensors``: trigger, target, seed
and the implant's settings) with the same seeded split (``split_items``), so the exported
items and their poisoned subset are exactly the implant's:

``DIR/images/NNNNNN.png``
    every training item of the implant (row order = the implant's ``split.train``), the
    poisoned ones with the trigger applied, then the implant's held-out items (clean);
``DIR/captions.csv``
    the host's captions-file format (``mmsec.data.files.captions_file``): ``image``,
    ``captions`` (several separated by ``|``), ``label`` (class name), ``split`` (``train``
    for the training items, ``test`` for the held-out ones), plus ``index`` (the item's
    position in the source data) and ``poisoned`` (1/0, the ground truth).

Captions are what the implant draws from: a clean item keeps all its captions (or the
class name in every prompt template); a poisoned item gets every caption of the target
(the implant picks one of them at random each time it draws the item). Not exported: the
implant's decoys (``negative_rate``: random triggers drawn anew in every batch, with true
captions), which are not a fixed part of the data. The triggered pixels are rounded to
8 bits when written (the implant trains on the unrounded ones).

Labels are written as class names, and a captions file numbers its classes in sorted name
order: where the source's order differs (Fashion-MNIST), the spec's target *index* names
another class on the exported data, so measure CA/ASR (``--trigger``) on the source data.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch

from mmsec import Artifact, CaptionTable, ImageDataset, UsageError, load_images, write_atomic

from .base import generator
from .implant import split_items

__all__ = ["export_poisoned"]

_CHUNK = 256


def _target_captions(data: ImageDataset, captions: CaptionTable, target: int | None,
                     caption: str | None) -> list[str]:
    """The captions the implant pairs with poisoned images (``implant.implant``'s choice)."""
    if caption is not None:
        return [caption]
    labels = data.labels()
    ids = sorted({c for i in np.flatnonzero(labels.numpy() == target)
                  for c in captions.captions_of(int(i))})
    if not ids:
        raise UsageError(f"backdoor export: no item of class {target} to take captions from")
    return [captions.texts[c] for c in ids]


def _png(image: torch.Tensor) -> bytes:
    """``[3, H, W]`` in [0, 1] -> PNG bytes (8 bits per channel)."""
    from PIL import Image

    arr = image.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def export_poisoned(spec: Artifact | str | Path, data: ImageDataset, out: str | Path) -> Path:
    """Write the poisoned training set that the implant of ``spec`` trained on; returns
    the captions file.

    Args:
        spec: the implant's trigger spec (an ``Artifact`` or the path of
            ``backdoor.safetensors``), as ``Backdoor.fit`` returns it.
        data: the same training split the implant was given (``mmsec attack`` passes the
            ``train`` split of ``-d``).
        out: folder to write (created; existing files of the same names are replaced).

    Returns:
        ``out/captions.csv``, loadable with ``-d captions:out/captions.csv``.
    """
    from . import trigger_from_artifact

    if not isinstance(spec, Artifact):
        spec = Artifact.load(spec)
    meta = spec.meta
    if "implant" not in meta:
        raise UsageError("backdoor export: the spec records no implant settings (made by an "
                         "older mmsec?); re-run the implant")
    if not len(data):
        raise UsageError("backdoor export: the data is empty")
    trigger = trigger_from_artifact(spec)
    settings = meta["implant"]
    seed = int(meta["seed"])
    target = meta.get("target")
    eval_items = int(spec.options.get("eval_items", 500)) if data.classnames else 0
    # specs from before backdoor 0.3.0 poisoned the items themselves (no poison_mode)
    split = split_items(data.labels(), target, float(settings["poison_rate"]),
                        settings["train_items"], eval_items, seed,
                        settings.get("poison_mode", "replace"))
    captions = CaptionTable(data)
    poison_caps = _target_captions(data, captions, target, meta.get("target_caption"))

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    names = list(data.classnames or [])
    items = np.concatenate([split.train, split.val])
    poisoned = np.concatenate([split.poison, np.zeros(len(split.val), dtype=bool)])
    rows = []
    for start in range(0, len(items), _CHUNK):
        chunk = items[start:start + _CHUNK]
        x, y = load_images(data, chunk.tolist())
        mask = torch.from_numpy(poisoned[start:start + _CHUNK])
        if mask.any():
            x[mask] = trigger.apply(x[mask], gen=generator(seed * 1_000_003 + 999_983 + start))
        for j, item in enumerate(chunk.tolist()):
            pos = start + j
            name = f"images/{pos:06d}.png"
            (out / name).write_bytes(_png(x[j]))
            is_poisoned = bool(mask[j])
            caps = poison_caps if is_poisoned else [captions.texts[c]
                                                    for c in captions.captions_of(item)]
            label = int(y[j])
            rows.append({"image": name, "captions": "|".join(c.replace("|", " ") for c in caps),
                         "label": names[label] if 0 <= label < len(names) else "",
                         "split": "train" if pos < len(split.train) else "test",
                         "index": item, "poisoned": int(is_poisoned)})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["image", "captions", "label", "split", "index",
                                             "poisoned"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = out / "captions.csv"
    write_atomic(path, buf.getvalue())
    return path
