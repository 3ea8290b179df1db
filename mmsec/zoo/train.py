"""Train small CLIPs from scratch (``mmsec zoo train``): the shipped zoo models, and yours.

A zoo model is an open_clip ``CLIP`` built from a small config (a ModifiedResNet image
tower and a narrow text transformer) trained with the CLIP contrastive loss. Its text
tower reads either a vocabulary trimmed to the training texts (small and fast; any other
word is the unknown token, which mmsec warns about) or open_clip's full BPE vocabulary
(``vocab="full"``: every word is read, at the price of a 49,408-row token table).

``train_zoo("shapes")`` reproduces the shipped ``zoo:shapes`` (and ``"fashion"``
``zoo:fashion``) with their recorded schedules. Any other name trains on the data given
(any ``-d`` dataset: image folders, captions files, torchvision sets, plugins' sources),
at an image size chosen for the data, for at least ``min_steps`` steps, stopping early when
the held-out score has plateaued. The data is held in memory when it fits
(``$MMSEC_ZOO_MEMORY_MB``, default 2048) and read from disk batch by batch otherwise.

The result is ``NAME.safetensors`` (fp16 weights whose metadata carry the whole spec, so
``--pretrained FILE`` and ``-m zoo:FILE`` load it anywhere) and ``NAME.json`` (the same
spec, for listings), in the user zoo folder (``$MMSEC_ZOO`` or the user data folder) unless
``out_dir`` says otherwise. The figure recorded is measured on the saved fp16 weights.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import metrics
from ..data import ImageDataset, Subset, TensorDataset, load_images, subset
from ..errors import MmsecError, UsageError
from ..io import safetensors_bytes, write_atomic
from ..model import (
    CHECKPOINT_FORMAT,
    ZOO_DIR,
    ClipModel,
    TrimmedTokenizer,
    build_zoo_model,
    load_model,
    shipped_zoo_names,
    user_zoo_dirs,
)
from ..training import (
    Batches,
    CaptionTable,
    Optim,
    Plateau,
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
FULL_VOCAB = 49408  # open_clip's BPE vocabulary
AUGMENTS = ("none", "flip", "crop")

# The shipped zoo models: the data they learn from and their schedule (tuned on 2 CPU
# cores). Re-running one reproduces the shipped weights.
ZOO_RECIPES: dict[str, dict] = {
    "shapes": {"data": "procedural", "epochs": 12, "batch_size": 256, "lr": 2e-3,
               "weight_decay": 0.1, "warmup_steps": 100, "augment": "none",
               "description": "ModifiedResNet-mini CLIP trained on the procedural shapes set"},
    "fashion": {"data": "fashion-mnist", "epochs": 3, "batch_size": 256, "lr": 2e-3,
                "weight_decay": 0.1, "warmup_steps": 100, "augment": "flip",
                "description": "ModifiedResNet-mini CLIP trained on Fashion-MNIST"},
}

# Your data: enough steps on a small set, early stopping on the held-out score.
CUSTOM_RECIPE: dict[str, Any] = {
    "epochs": 30, "min_steps": 600, "batch_size": None, "lr": 2e-3, "weight_decay": 0.1,
    "warmup_steps": 100, "augment": "crop", "early_stop": True, "patience": 5,
    "min_delta": 0.005,
}


def _channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    x = images.float()
    if x.max() > 1.5:
        x = x.div(255)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def _embed_all(model: ClipModel, ds: ImageDataset, batch_size: int = 250) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for start in range(0, len(ds), batch_size):
            x, _ = load_images(ds, range(start, min(len(ds), start + batch_size)))
            out.append(model.encode_image(x.to(model.device)).cpu())
    return torch.cat(out) if out else torch.zeros(0, model.embed_dim)


def zero_shot_top1(model: ClipModel, ds: ImageDataset, batch_size: int = 500) -> float:
    """Zero-shot top-1 of ``model`` on ``ds`` with the dataset's class names and templates."""
    head = model.zero_shot_head(ds.classnames, ds.templates).cpu()
    preds = (_embed_all(model, ds, batch_size) @ head.t()).argmax(1)
    return metrics.clean_accuracy(preds, ds.labels())


def retrieval_r1(model: ClipModel, ds: ImageDataset) -> dict[str, float]:
    """Image->text and text->image recall@1 over ``ds``'s captions."""
    texts, owner = [], []
    for i in range(len(ds)):
        for c in ds.captions(i):
            texts.append(c)
            owner.append(i)
    if not texts:
        return {}
    with torch.no_grad():
        txt = model.encode_text(texts).cpu()
    rec = metrics.retrieval_recall(_embed_all(model, ds), txt, torch.tensor(owner), ks=(1,))
    return {"i2t_r1": rec["i2t_r1"], "t2i_r1": rec["t2i_r1"]}


def held_out_score(model: ClipModel, ds: ImageDataset) -> dict[str, float]:
    """What a zoo model is judged by: zero-shot top-1 with class names, else recall@1."""
    if ds.classnames:
        return {"zero_shot_top1": zero_shot_top1(model, ds)}
    r = retrieval_r1(model, ds)
    return {**r, "r1_mean": 0.5 * (r["i2t_r1"] + r["t2i_r1"])} if r else {}


def _native_size(ds: ImageDataset) -> int:
    size = getattr(ds, "size", None)
    if size:
        return int(min(size))
    return int(min(ds.load(0)[0].shape[-2:]))


def choose_image_size(native: int) -> int:
    """The zoo tower's input: a multiple of 32 (the ResNet's stride); 32 px for small images,
    64 px above 48 px (larger costs 4x per step on a CPU for little gain at this width)."""
    return 32 if native <= 48 else 64


def _same_items(a: ImageDataset, b: ImageDataset) -> bool:
    if len(a) != len(b):
        return False
    probe = range(0, len(a), max(1, len(a) // 16))
    return all(a.key(i) == b.key(i) for i in probe)


def _hash_holdout(ds: ImageDataset, percent: int = 20) -> tuple[list[int], list[int]]:
    """A train/test split of one set by a hash of each item's content key (stable)."""
    train, test = [], []
    for i in range(len(ds)):
        h = int(hashlib.sha1(ds.key(i).encode()).hexdigest()[:8], 16)
        (test if h % 100 < percent else train).append(i)
    return train, test


def _in_memory(ds: ImageDataset, budget_mb: int) -> TensorDataset | None:
    """``ds`` as uint8 in memory when it fits ``budget_mb`` (else None: read batch by batch)."""
    if isinstance(ds, TensorDataset):
        return ds
    c, h, w = ds.load(0)[0].shape
    if len(ds) * c * h * w > budget_mb * 2**20:
        return None
    chunks = []
    for start in range(0, len(ds), 256):
        x, _ = load_images(ds, range(start, min(len(ds), start + 256)))
        chunks.append((x * 255).round().to(torch.uint8))
    caps = [ds.captions(i) for i in range(len(ds))] if ds.has_captions else None
    return TensorDataset(torch.cat(chunks), ds.labels(), name=ds.name, split=ds.split,
                         classnames=ds.classnames, templates=ds.templates, captions=caps)


def _random_resized_crop(x: torch.Tensor, gen: torch.Generator,
                         scale: tuple[float, float] = (0.6, 1.0)) -> torch.Tensor:
    """A random crop of 60-100 % of each image's area (aspect 3/4-4/3), resized back."""
    import torch.nn.functional as F

    n, _, h, w = x.shape
    out = torch.empty_like(x)
    area = torch.empty(n).uniform_(*scale, generator=gen)
    logr = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    u = torch.rand(n, 2, generator=gen)
    for i in range(n):
        r = math.exp(float(logr[i]))
        ch = max(1, min(h, round(math.sqrt(float(area[i]) * h * w / r))))
        cw = max(1, min(w, round(math.sqrt(float(area[i]) * h * w * r))))
        top, left = int(u[i, 0] * (h - ch + 1)), int(u[i, 1] * (w - cw + 1))
        crop = x[i:i + 1, :, top:top + ch, left:left + cw]
        out[i] = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False,
                               antialias=True)[0]
    return out


def _context_length(texts: Sequence[str], given: int | None) -> int:
    if given:
        return int(given)
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    longest = max((len(tok.encode(t)) for t in texts[:20000]), default=0)
    return int(min(77, max(20, longest + 2)))


def zoo_out_dir(name: str, out_dir: Path | None) -> Path:
    """Where ``train_zoo`` writes: ``out_dir``, else the first user zoo folder. A shipped
    name needs ``out_dir`` (``zoo:NAME`` always means the shipped model)."""
    if out_dir is not None:
        if name in shipped_zoo_names() and Path(out_dir).resolve() == ZOO_DIR.resolve():
            raise UsageError(f"--out-dir {out_dir} is where the shipped zoo:{name} is "
                             "installed; write the reproduction to another folder")
        return Path(out_dir)
    if name in shipped_zoo_names():
        raise UsageError(f"zoo:{name} ships with mmsec and keeps that name; write the "
                         f"reproduction elsewhere with --out-dir DIR (then load it with "
                         f"-m zoo:DIR/{name}.safetensors), or choose another --name")
    return user_zoo_dirs()[0]


def train_zoo(
    name: str = "shapes", *, data: str | None = None, epochs: int | None = None,
    steps: int | None = None, min_steps: int | None = None, batch_size: int | None = None,
    lr: float | None = None, image_size: int | None = None, vocab: str = "data",
    augment: str | None = None, early_stop: bool | None = None, seed: int = 0,
    out_dir: Path | None = None, run=None, device: str = "cpu",
    train_items: int | None = None, test_items: int | None = None, registry=None,
    strict: bool = False,
) -> dict:
    """Train zoo model ``name`` and write ``NAME.json`` + ``NAME.safetensors``.

    A shipped name with no other ``data`` follows its recorded recipe; anything else needs
    ``data`` and uses the recipe for your own data (see the module doc). Returns the spec
    written (``metrics`` measured on the saved fp16 weights).
    """
    shipped = name in ZOO_RECIPES and (data is None or data == ZOO_RECIPES[name]["data"])
    if not shipped and not data:
        raise UsageError(f"zoo model {name!r} is not shipped: give the data to train on "
                         "(-d imagefolder:DIR, -d captions:FILE.jsonl, ...)")
    recipe: dict[str, Any] = ({"early_stop": False, "min_steps": 0, **ZOO_RECIPES[name]}
                              if shipped else {**CUSTOM_RECIPE, "data": data,
                                               "description": f"small CLIP trained on {data}"})
    for key, value in (("epochs", epochs), ("min_steps", min_steps), ("lr", lr),
                       ("batch_size", batch_size), ("augment", augment),
                       ("early_stop", early_stop)):
        if value is not None:
            recipe[key] = value
    if recipe["augment"] not in AUGMENTS:
        raise UsageError(f"augment must be one of {', '.join(AUGMENTS)}")
    if vocab not in ("data", "full"):
        raise UsageError("vocab must be 'data' (trimmed to the training texts) or 'full'")
    if image_size is not None and (image_size < 32 or image_size % 32):
        raise UsageError(f"--image-size {image_size}: the zoo's ResNet tower needs a multiple "
                         "of 32 (32, 64, 96, ...)")
    out_dir = zoo_out_dir(name, Path(out_dir) if out_dir else None)
    if registry is None:
        from ..registry import get_registry

        registry = get_registry()
    seed_everything(seed)
    started = time.time()

    def load(split: str, n: int | None, size: int | None) -> ImageDataset:
        kw: dict[str, Any] = {"image_size": size} if size else {}
        return registry.load_dataset(recipe["data"], split=split, seed=seed, n=n,
                                     strict=strict, **kw)

    probe = load("test", 8, None)
    size = image_size or (MODEL_CFG["vision_cfg"]["image_size"] if shipped
                          else choose_image_size(_native_size(probe)))
    train = load("train", train_items, size if not shipped else None)
    test = load("test", test_items, size if not shipped else None)
    for ds in (train, test):
        if ds.skipped:
            log.warning("%d unreadable item(s) left out of %s", ds.skipped, ds.describe())
    holdout = None
    if _same_items(train, test):  # one set for every split (a captions file without splits)
        tr, te = _hash_holdout(train)
        if not tr or not te:
            raise MmsecError(f"{train.describe()}: too few items to hold 20% out for testing")
        holdout = f"20% of {train.describe()} held out by a hash of each image"
        train, test = Subset(train, tr), Subset(train, te)
        log.info("%s has no separate test split: %s", recipe["data"], holdout)
    train = subset(train, train_items, seed=seed)
    test = subset(test, test_items, seed=seed)
    if len(train) < 8:
        raise MmsecError(f"{train.describe()}: {len(train)} training items; a CLIP needs more")
    budget = int(os.environ.get("MMSEC_ZOO_MEMORY_MB", "2048"))
    memory = _in_memory(train, budget)
    if memory is None:
        log.info("%s does not fit %d MB: images are read from disk batch by batch",
                 train.describe(), budget)
    source = memory if memory is not None else train

    captions = CaptionTable(source)
    if len(captions) == 0:
        raise MmsecError(f"{train.describe()} has neither captions nor class names: nothing "
                         "to pair the images with")
    texts = captions.texts
    prompts = [t.format(c) for c in (test.classnames or []) for t in test.templates]
    cfg = copy.deepcopy(MODEL_CFG)
    cfg["vision_cfg"]["image_size"] = int(size)
    if not shipped:
        cfg["text_cfg"]["context_length"] = _context_length(texts + prompts, None)
    if vocab == "full":
        token_ids: list[int] | str = "full"
        cfg["text_cfg"]["vocab_size"] = FULL_VOCAB
    else:
        token_ids = TrimmedTokenizer.build_vocab(texts + prompts, cfg["text_cfg"]["context_length"])
        cfg["text_cfg"]["vocab_size"] = len(token_ids)
    mean, std = _channel_stats(load_images(source, range(min(len(source), 5000)))[0])
    spec: dict[str, Any] = {
        "name": name, "description": recipe["description"], "model_cfg": cfg,
        "mean": mean, "std": std, "vocab": token_ids, "dataset": recipe["data"],
        "classnames": list(test.classnames or []), "templates": list(test.templates),
        "weights": f"{name}.safetensors"}
    model = build_zoo_model(spec).to(device)
    tokens = model.tokenize(texts)
    n = len(source)
    bs = int(recipe["batch_size"] or min(256, max(16, (n // 4) // 8 * 8)))
    if n < bs:
        bs = max(2, n)
    per_epoch = n // bs

    def batch_of(epoch: int):
        perm = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))
        gen = torch.Generator().manual_seed(stream_seed(seed, "zoo.captions", epoch))
        for s in range(0, n - bs + 1, bs):  # drop the short last batch (contrastive loss)
            idx = perm[s:s + bs]
            cap, _ = captions.sample(idx, torch.rand(len(idx), generator=gen))
            x = load_images(source, idx)[0]
            if recipe["augment"] in ("flip", "crop"):
                flip = torch.rand(len(idx), generator=gen) < 0.5
                x[flip] = x[flip].flip(-1)
            if recipe["augment"] == "crop":
                x = _random_resized_crop(x, gen)
            yield x.to(device), cap

    def step(batch, _ctx):
        x, cap = batch
        return {"loss": contrastive_loss(model, x, cap, tokens)}

    monitor_set = subset(test, 1000, seed=seed)
    monitored = "test_top1" if test.classnames else "test_r1"

    def on_epoch_end(_epoch: int, _means: dict) -> dict:
        score = held_out_score(model, monitor_set)
        key = "zero_shot_top1" if "zero_shot_top1" in score else "r1_mean"
        return {monitored: score.get(key, float("nan"))}

    steps_planned = (int(steps) if steps else
                     max(int(recipe["epochs"]) * per_epoch, int(recipe.get("min_steps") or 0)))
    # short runs (tests, quick looks) must not spend all their steps warming up
    warmup = min(int(recipe["warmup_steps"]), steps_planned // 5)
    optim = Optim(model.clip, kind="adamw", lr=float(recipe["lr"]),
                  weight_decay=float(recipe["weight_decay"]), warmup_steps=warmup,
                  schedule="cosine", grad_clip=1.0)
    stop = (Plateau(monitored, patience=int(recipe["patience"]),
                    min_delta=float(recipe["min_delta"]), min_epochs=3)
            if recipe.get("early_stop") else None)
    log.info("zoo %s: %d training items at %d px, batch %d, %d steps planned%s", name, n, size,
             bs, steps_planned, " (early stop on " + monitored + ")" if stop else "")
    result = run_training(step, Batches(batch_of, per_epoch), optim, steps=steps_planned,
                          run=run, slot=f"zoo-{name}", train_modules=[model.clip],
                          on_epoch_end=on_epoch_end, stop=stop, desc=f"zoo {name}",
                          min_steps=0 if steps else int(recipe.get("min_steps") or 0))
    spec["train"] = {
        "seed": seed, "epochs": len(result.history), "steps": int(result.steps),
        "steps_planned": steps_planned, "stopped_early": result.stopped_early,
        "batch_size": bs, "lr": float(recipe["lr"]), "weight_decay": recipe["weight_decay"],
        "augment": recipe["augment"], "image_size": int(size), "train_items": n,
        "test_items": len(test), "held_out": holdout, "vocab": vocab,
        "seconds": round(time.time() - started, 1),
        "history": [{k: round(v, 4) for k, v in h.items()} for h in result.history]}
    spec = _save_and_measure(model, spec, out_dir, test, device)
    score = spec["metrics"]
    log.info("zoo %s: %s on %s (saved fp16 weights)", name,
             ", ".join(f"{k} {v:.4f}" for k, v in score.items() if isinstance(v, float)),
             test.describe())
    return spec


def _save_and_measure(model: ClipModel, spec: dict, out_dir: Path, test: ImageDataset,
                      device: str) -> dict:
    """Write the fp16 weights (spec in their metadata), measure the saved file on ``test``,
    then write the spec with that figure beside it (and in the file's metadata)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / spec["weights"]
    state = {k: v.detach().cpu().half().contiguous() if v.is_floating_point() else v.cpu()
             for k, v in model.clip.state_dict().items()}

    def write(spec_now: dict) -> None:
        meta = {**model.checkpoint_metadata(), "format": CHECKPOINT_FORMAT,
                "model": f"zoo:{spec_now['name']}", "zoo": json.dumps(spec_now),
                "name": spec_now["name"]}
        write_atomic(weights, safetensors_bytes(state, meta))

    write(spec)
    saved = load_model(pretrained=str(weights), device=device)
    score = held_out_score(saved, test)
    spec = {**spec, "metrics": {**{k: round(v, 4) for k, v in score.items()},
                                "test_items": len(test), "measured_on": "saved fp16 weights"}}
    write(spec)
    spec["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    write_atomic(out_dir / f"{spec['name']}.json", json.dumps(spec, indent=1))
    return {**spec, "path": str(weights)}
