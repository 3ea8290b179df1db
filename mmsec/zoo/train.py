"""Train the embedded zoo models (``mmsec zoo train``).

A zoo model is an open_clip ``CLIP`` built from a small config (a ModifiedResNet
image tower and a narrow text transformer over a trimmed vocabulary) and
trained from scratch with the CLIP contrastive loss on a built-in or local
dataset. The result is written next to this file as ``NAME.json`` (config,
vocabulary, preprocessing, training settings and measured accuracy) and
``NAME.safetensors`` (fp16 weights), which ``load_model("zoo:NAME")`` reads.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from .. import metrics
from ..data import ImageDataset, TensorDataset, load_dataset, subset
from ..io import safetensors_bytes, write_atomic
from ..model import ZOO_DIR, ClipModel, TrimmedTokenizer, build_zoo_model
from ..training import (
    Batches,
    CaptionTable,
    Optim,
    contrastive_loss,
    seed_everything,
    stream_seed,
)
from ..training import train as run_training

log = logging.getLogger("mmsec.zoo")

MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16},
    "text_cfg": {"context_length": 20, "vocab_size": 0, "width": 128, "heads": 4, "layers": 2},
}

# Per zoo model: the data it learns from and its schedule (tuned on 2 CPU cores).
ZOO_RECIPES: dict[str, dict] = {
    "shapes": {"data": "procedural", "epochs": 12, "batch_size": 256, "lr": 2e-3,
               "weight_decay": 0.1, "warmup_steps": 100, "flip": False,
               "description": "ModifiedResNet-mini CLIP trained on the procedural shapes set"},
    "fashion": {"data": "fashion-mnist", "epochs": 3, "batch_size": 256, "lr": 2e-3,
                "weight_decay": 0.1, "warmup_steps": 100, "flip": True,
                "description": "ModifiedResNet-mini CLIP trained on Fashion-MNIST"},
}


def _channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    x = images[: 5000].float().div(255)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


def zero_shot_top1(model: ClipModel, ds: ImageDataset, batch_size: int = 500) -> float:
    """Zero-shot top-1 of ``model`` on ``ds`` with the dataset's class names and templates."""
    head = model.zero_shot_head(ds.classnames, ds.templates)
    preds = []
    with torch.no_grad():
        for start in range(0, len(ds), batch_size):
            idx = range(start, min(len(ds), start + batch_size))
            x = torch.stack([ds.load(i)[0] for i in idx])
            preds.append((model.encode_image(x) @ head.t()).argmax(1).cpu())
    return metrics.clean_accuracy(torch.cat(preds), ds.labels())


def train_zoo(
    name: str = "shapes", *, data: str | None = None, epochs: int | None = None,
    seed: int = 0, out_dir: Path | None = None, run=None, device: str = "cpu",
    train_items: int | None = None, test_items: int | None = None,
) -> dict:
    """Train zoo model ``name`` and write ``NAME.json`` + ``NAME.safetensors`` to ``out_dir``.

    Returns the spec written (with ``metrics.zero_shot_top1`` on the held-out split).
    """
    recipe = dict(ZOO_RECIPES.get(name, ZOO_RECIPES["shapes"]))
    if data:
        recipe["data"] = data
    if epochs:
        recipe["epochs"] = epochs
    out_dir = Path(out_dir or ZOO_DIR)
    seed_everything(seed)
    started = time.time()
    train = load_dataset(recipe["data"], split="train", seed=seed, n=train_items)
    test = subset(load_dataset(recipe["data"], split="test", seed=seed, n=test_items),
                  test_items, seed=seed)
    if train_items is not None and len(train) > train_items:
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        keep = keep[:train_items].sort().values
        train = TensorDataset(train.images[keep], train.labels()[keep], name=train.name,
                              split="train", classnames=train.classnames,
                              templates=train.templates,
                              captions=[train.captions(int(i)) for i in keep]
                              if train.has_captions else None)
    if not isinstance(train, TensorDataset):
        raise TypeError("zoo training needs an in-memory dataset (procedural, fashion-mnist)")
    captions = CaptionTable(train)
    texts = captions.texts
    prompts = [t.format(c) for c in test.classnames for t in test.templates]
    cfg = copy.deepcopy(MODEL_CFG)
    vocab = TrimmedTokenizer.build_vocab(texts + prompts, cfg["text_cfg"]["context_length"])
    cfg["text_cfg"]["vocab_size"] = len(vocab)
    mean, std = _channel_stats(train.images)
    spec = {"name": name, "description": recipe["description"], "model_cfg": cfg,
            "mean": mean, "std": std, "vocab": vocab, "dataset": recipe["data"],
            "classnames": list(test.classnames), "templates": list(test.templates),
            "weights": f"{name}.safetensors"}
    model = build_zoo_model(spec).to(device)
    tokens = model.tokenize(texts)
    bs = recipe["batch_size"]
    n = len(train)

    def batch_of(epoch: int):
        perm = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))
        gen = torch.Generator().manual_seed(stream_seed(seed, "zoo.captions", epoch))
        for s in range(0, n - bs + 1, bs):  # drop the short last batch (contrastive loss)
            idx = perm[s:s + bs]
            cap, _ = captions.sample(idx, torch.rand(len(idx), generator=gen))
            x = train.images[idx].float().div_(255)
            if recipe["flip"]:
                flip = torch.rand(len(idx), generator=gen) < 0.5
                x[flip] = x[flip].flip(-1)
            yield x, cap

    def step(batch, _ctx):
        x, cap = batch
        return {"loss": contrastive_loss(model, x, cap, tokens)}

    def on_epoch_end(_epoch: int, _means: dict) -> dict:
        return {"test_top1": zero_shot_top1(model, test)}

    total_steps = recipe["epochs"] * (n // bs)
    # short runs (tests, quick looks) must not spend all their steps warming up
    warmup = min(recipe["warmup_steps"], total_steps // 5)
    optim = Optim(model.clip, kind="adamw", lr=recipe["lr"], weight_decay=recipe["weight_decay"],
                  warmup_steps=warmup, schedule="cosine", grad_clip=1.0)
    result = run_training(step, Batches(batch_of, n // bs), optim, epochs=recipe["epochs"], run=run,
                   slot=f"zoo-{name}", train_modules=[model.clip], on_epoch_end=on_epoch_end,
                   desc=f"zoo {name}")
    top1 = zero_shot_top1(model, test)
    spec["train"] = {"seed": seed, "epochs": recipe["epochs"], "batch_size": bs, "lr": recipe["lr"],
                     "weight_decay": recipe["weight_decay"], "train_items": n,
                     "seconds": round(time.time() - started, 1),
                     "history": [{k: round(v, 4) for k, v in h.items()} for h in result.history]}
    spec["metrics"] = {"zero_shot_top1": round(top1, 4), "test_items": len(test)}
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / spec["weights"]
    state = {k: v.detach().cpu().half().contiguous() if v.is_floating_point() else v.cpu()
             for k, v in model.clip.state_dict().items()}
    write_atomic(weights, safetensors_bytes(state, {"format": "mmsec-zoo-v1", "name": name}))
    spec["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    write_atomic(out_dir / f"{name}.json", json.dumps(spec, indent=1))
    log.info("zoo %s: zero-shot top-1 %.4f on %s[test]", name, top1, recipe["data"])
    return spec
