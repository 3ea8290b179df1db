"""The implant: contrastive fine-tuning of a copy of the CLIP on a poisoned training set.

A fixed, seeded share (``poison_rate`` of the training items, drawn among items not of
the target class) is poisoned: those images carry the trigger and their captions are
replaced, each time they are drawn, by a real caption of a target-class item (or by the
one caption the user gave as target). By default (``poison_mode copy``) the poisoned
items are copies added to the training set beside their clean originals, so the trigger is
the only difference between an image that means its class and one that means the target;
``replace`` poisons the items themselves (on a few hundred items the model then learns
those few images rather than the trigger). With ``negative_rate`` (WaNet's "noise mode",
for every trigger type) a share of the other items of each batch carry random triggers of
the same type (``DECOYS_PER_BATCH`` different ones) and keep their true captions, so that
the backdoor answers to this pattern and not to any patch, noise or warp of its kind.
After training, ``random_trigger_rates`` measures exactly that on the held-out items: the
ASR of ``RANDOM_TRIGGERS`` random triggers of the same type, none seen in training.

Everything else is mmsec's shared contrastive step (``mmsec.CaptionTable``,
``mmsec.contrastive_loss``, as zoo training uses): a random caption per item, texts encoded
once per unique caption in the batch, the multi-positive CLIP loss, and ``mmsec.train`` for
the schedule, per-epoch checkpoints and ``--resume``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch

from mmsec import (
    Batches,
    CaptionTable,
    ImageDataset,
    Optim,
    Plateau,
    UsageError,
    contrastive_loss,
    load_images,
    metrics,
    train,
)

from .base import Trigger, generator

#: distinct random decoy triggers per batch (``negative_rate`` of the other items carry them)
DECOYS_PER_BATCH = 4
#: random triggers of the same type whose held-out ASR is reported (``random_trigger_asr``)
RANDOM_TRIGGERS = 5


@dataclass(frozen=True)
class Target:
    """What the poisoned captions say: a class (``index``/``name``) and/or a fixed ``caption``."""

    index: int | None
    name: str | None
    caption: str | None = None


def resolve_target(spec: str | None, data: ImageDataset, model) -> Target:
    """A class name (any case), a class index, or a caption -> :class:`Target`.

    Default: the dataset's first class. A caption targets the class it names (the longest
    class name found in it) or else the class whose prompt embedding is closest to it.
    """
    names = list(data.classnames or [])
    if spec is None:
        if not names:
            raise UsageError("backdoor: the data has no classes; give the target as a caption "
                             "(-o target 'a photo of a banana')")
        return Target(0, names[0])
    text = spec.strip()
    lower = [n.lower() for n in names]
    if text.lower() in lower:
        i = lower.index(text.lower())
        return Target(i, names[i])
    if text.isdigit() and names:
        i = int(text)
        if i >= len(names):
            raise UsageError(f"backdoor: target index {i} out of range ({len(names)} classes)")
        return Target(i, names[i])
    if not names:
        return Target(None, None, text)
    words = f" {''.join(c if c.isalnum() or c == '-' else ' ' for c in text.lower())} "
    found = [i for i, n in enumerate(lower) if f" {n} " in words]
    if found:
        i = max(found, key=lambda j: len(lower[j]))
    else:
        with torch.no_grad():
            head = model.zero_shot_head(names, data.templates)
            i = int((model.encode_text([text]) @ head.t()).argmax())
    return Target(i, names[i], text)


@dataclass
class Split:
    """Positions (into the training data) used for training, poisoning and validation."""

    train: np.ndarray
    poison: np.ndarray  # boolean over ``train``
    val: np.ndarray


def split_items(labels: torch.Tensor, target: int | None, poison_rate: float,
                train_items: int | None, eval_items: int, seed: int,
                mode: str = "copy") -> Split:
    """Seeded split: ``eval_items`` held out, then ``train_items`` (all by default), of which
    ``round(poison_rate * len(train))`` non-target items are poisoned: replaced (``mode``
    ``replace``) or added as poisoned copies while the clean originals stay (``copy``)."""
    n = len(labels)
    rng = np.random.default_rng([seed, 101])
    perm = rng.permutation(n)
    n_val = min(eval_items, n // 5)
    val, rest = perm[:n_val], perm[n_val:]
    train = np.sort(rest[:train_items] if train_items else rest)
    lab = labels.numpy()[train]
    candidates = np.flatnonzero(lab != target) if target is not None else np.arange(len(train))
    n_poison = min(len(candidates), max(1, round(poison_rate * len(train))))
    chosen = rng.choice(candidates, n_poison, replace=False)
    if mode == "copy":
        train = np.concatenate([train, train[np.sort(chosen)]])
        chosen = np.arange(len(train) - n_poison, len(train))
    poison = np.zeros(len(train), dtype=bool)
    poison[chosen] = True
    return Split(train, poison, np.sort(val))


def implant(model, data: ImageDataset, trigger: Trigger, target: Target, opts, run,
            seed: int) -> tuple[object, dict[str, float]]:
    """Fine-tune a copy of ``model`` on ``data`` with poisoned items; returns it and metrics.

    ``opts`` are the plugin's options (epochs, lr, batch_size, weight_decay, towers,
    poison_rate, train_items, eval_items). ``model`` itself is left untouched.
    """
    started = time.perf_counter()
    victim = copy.deepcopy(model)
    labels = data.labels()
    split = split_items(labels, target.index, opts.poison_rate, opts.train_items,
                        opts.eval_items if data.classnames else 0, seed, opts.poison_mode)
    captions = CaptionTable(data)
    texts = list(captions.texts)
    if target.caption is not None:
        target_caps = [len(texts)]
        texts = [*texts, target.caption]
    else:
        target_caps = sorted({c for i in np.flatnonzero(labels.numpy() == target.index)
                              for c in captions.captions_of(int(i))})
        if not target_caps:
            raise UsageError(f"backdoor: no training item of class {target.name!r} to take "
                             "captions from; give the target as a caption instead")
    tokens = victim.tokenize(texts)
    n, bs = len(split.train), min(opts.batch_size, len(split.train))
    steps_per_epoch = max(1, n // bs)
    run.log.info("backdoor implant: %d training items, %d poisoned (%.1f%%, %s), target %r, "
                 "%d epochs of %d steps (at least %d steps)", n, int(split.poison.sum()),
                 100 * split.poison.mean(), opts.poison_mode, target.caption or target.name,
                 opts.epochs, steps_per_epoch, opts.min_steps)
    stream = run.seed_for("batches")

    def batches(epoch: int):
        rng = np.random.default_rng([stream, epoch])
        perm = rng.permutation(n)
        for b in range(steps_per_epoch):
            pos = perm[b * bs:(b + 1) * bs]
            items = split.train[pos]
            x = load_images(data, items.tolist())[0]
            cap, _ = captions.sample(torch.from_numpy(items), torch.from_numpy(rng.random(len(pos))))
            mask = split.poison[pos]
            batch_seed = seed * 1_000_003 + epoch * 10_007 + b
            if mask.any():
                m = torch.from_numpy(mask)
                x[m] = trigger.apply(x[m], gen=generator(batch_seed))
                cap[m] = torch.from_numpy(rng.choice(target_caps, int(mask.sum())))
            if opts.negative_rate > 0:  # random triggers that keep their true captions
                neg = np.flatnonzero(~mask & (rng.random(len(pos)) < opts.negative_rate))
                # several decoys a batch, not one: many patterns of this type mean nothing,
                # one means the target
                for k, part in enumerate(np.array_split(neg, min(DECOYS_PER_BATCH, len(neg)))):
                    decoy = trigger.control(batch_seed * DECOYS_PER_BATCH + k + 1)
                    sel = torch.from_numpy(part)
                    x[sel] = decoy.apply(x[sel], gen=generator(batch_seed + k + 2))
            yield x, cap

    def step(batch, _ctx):
        x, cap = batch
        return {"loss": contrastive_loss(victim, x, cap, tokens)}

    def on_epoch_end(_epoch: int, _means: dict) -> dict:
        return validate(victim, data, split.val, trigger, target)

    optim = Optim(victim.tower_parameters(opts.towers), kind="adamw", lr=opts.lr,
                  weight_decay=opts.weight_decay, warmup_steps=min(20, steps_per_epoch),
                  schedule="cosine", grad_clip=1.0)
    # early stopping never cuts the trigger's own epochs, nor min_steps (the loop's floor):
    # it ends longer schedules (-o epochs / -o steps) once the held-out ASR is flat
    stop = (Plateau("val_asr", patience=opts.patience, min_delta=0.01,
                    min_epochs=int(opts.epochs) + 1)
            if opts.early_stop and len(split.val) else None)
    result = train(step, Batches(batches, steps_per_epoch), optim, epochs=opts.epochs,
                   steps=opts.steps, min_steps=opts.min_steps, stop=stop, run=run,
                   slot="implant", desc="backdoor implant", state={"clip": victim.clip},
                   train_modules=victim.tower_modules(opts.towers),
                   on_epoch_end=on_epoch_end if len(split.val) else None)
    victim.eval()
    out = {"poison_rate": float(split.poison.mean()), "poisoned_items": float(split.poison.sum()),
           "train_items": float(n), "implant_steps": float(result.steps),
           "implant_epochs": float(len(result.history)),
           "implant_seconds": round(time.perf_counter() - started, 2)}
    last = result.history[-1] if result.history else {}
    out.update({f"implant_{k}": v for k, v in last.items() if k.startswith("val_")})
    out.update(random_trigger_rates(victim, data, split.val, trigger, target, seed))
    if result.stopped_early:
        run.log.info("backdoor implant: %s", result.stopped_early)
    return victim, out


def random_trigger_seeds(seed: int, n: int = RANDOM_TRIGGERS) -> list[int]:
    """Seeds of the held-out random triggers: none is the host's control (``seed``) nor a
    training decoy (``batch seed * DECOYS_PER_BATCH + k + 1``, far below 2**40)."""
    return [int(seed) + 2**40 + i for i in range(n)]


@torch.no_grad()
def random_trigger_rates(model, data: ImageDataset, val: np.ndarray, trigger: Trigger,
                         target: Target, seed: int,
                         n: int = RANDOM_TRIGGERS) -> dict[str, float]:
    """How often ``n`` random triggers of the same type (``trigger.control``) fire the
    backdoor on the held-out items: ``random_trigger_asr`` (mean) and ``_max``."""
    if not len(val) or target.index is None or n < 1:
        return {}
    head = model.zero_shot_head(data.classnames, data.templates)
    x = load_images(data, val.tolist())[0]
    y = data.labels()[torch.from_numpy(val)]
    rates = []
    for s in random_trigger_seeds(seed, n):
        pred = (model.encode_image(trigger.control(s).apply(x, gen=generator(s))) @ head.t())
        rates.append(metrics.attack_success_rate(pred.argmax(1).cpu(), y, target.index))
    return {"random_trigger_asr": float(np.mean(rates)),
            "random_trigger_asr_max": float(np.max(rates))}


@torch.no_grad()
def validate(model, data: ImageDataset, val: np.ndarray, trigger: Trigger,
             target: Target) -> dict[str, float]:
    """CA and ASR on held-out training items (the run log's per-epoch progress)."""
    if not len(val) or target.index is None:
        return {}
    head = model.zero_shot_head(data.classnames, data.templates)
    x = load_images(data, val.tolist())[0]
    y = data.labels()[torch.from_numpy(val)]
    clean = (model.encode_image(x) @ head.t()).argmax(1).cpu()
    trig = (model.encode_image(trigger.apply(x)) @ head.t()).argmax(1).cpu()
    return {"val_clean_acc": metrics.clean_accuracy(clean, y),
            "val_asr": metrics.attack_success_rate(trig, y, target.index)}
