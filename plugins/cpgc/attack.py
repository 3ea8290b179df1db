"""C-PGC: one universal image perturbation and one universal word substitution that break
image-text alignment, from contrastive generators (Fang et al., "One Perturbation is
Enough: On Generating Universal Adversarial Perturbations against Vision-Language
Pre-training Models", 2024; official code ffhibnese/CPGC_VLP_Universal_Attacks).

Image side. ``delta = G(z, c)`` (``nets.ImageGenerator``; ``c`` the caption embeddings of
the batch, attended to by cross-attention) is added to every image. Per scale (the
original and 0.5/0.75/1.25/1.5: down- or up-sampled and back, with Gaussian noise
sigma 0.05 before scaling, uniform +-eps pre-noise on all) the malicious contrastive loss
is, exactly as the official code computes it (the batch mean sits inside the log)::

    S_own = mean_b sum_{t in captions(b)}        exp(cos(f(x_b + delta), g(t)) / tau)
    S_tgt = mean_b sum_{t in captions(target(b))} exp(cos(f(x_b + delta), g(t)) / tau)
    L_img = sum_scales log(S_own / (S_own + S_tgt)) - alpha * SSE(f^(x + delta), f^(x))

with SSE the *sum* of squared differences of the normalised embeddings over the batch and
scales (the official ``MSELoss(size_average=False)``). ``target(b)``: ``target: batch``
(official) draws a random batch of 4 items and takes, per image, the one whose captions
have the lowest mean similarity to the clean image; ``target: farthest`` takes the item
whose mean caption embedding is farthest from the image over the whole training sample,
through the shared vector index.

Text side (``text``; default on when the data has real captions). Each caption's most
important non-stop word (masked-word KL, in the model's own tokenizer, ``words.py``) is
replaced by one learned embedding ``e = G_t(z_t, image embeddings)`` kept in the norm range
of the vocabulary's word embeddings::

    L_txt = log(S_own / (S_own + S_tgt)) - alpha * SSE(g(t_e), g(t))

with ``S_own`` the mean of ``exp(cos(g(t_e), f(own image)) / tau)`` and ``S_tgt`` the same
with the least similar image of the target batch. At the end ``e`` is snapped to the
nearest real word of the model's vocabulary (stop words skipped; the shared vector
index), which ``apply_text`` writes into captions: a readable word, shown in the report.

Defaults are the paper's: eps 12/255, 40 epochs, Adam 2e-4 (0.5, 0.999), batch 4,
tau 0.1, alpha 0.1; the official evaluation uses the last epoch. The official defects are
avoided: the generator is independent of the batch size; data are shuffled; the device
follows the run; the victim's weights get no gradients.

The control is uniform noise of the same eps and a random vocabulary word at the same
position.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from mmsec import (
    Artifact,
    Attack,
    Batches,
    CaptionTable,
    MmsecError,
    Optim,
    Options,
    VectorIndex,
    distributed,
    encode_images,
    encode_texts,
    fields,
    load_images,
    train,
)

from .nets import ImageGenerator, WordGenerator, resize_perturbation
from .words import (
    STOP_WORDS,
    important_words,
    placeholder_words,
    replace_word,
    substitution_slots,
)

SCALES = (0.5, 0.75, 1.25, 1.5)


class CPGC(Attack):
    """Universal image perturbation + universal word substitution (C-PGC)."""
    changes_model = False

    name = "cpgc"
    description = ("universal image perturbation and word substitution from contrastive "
                   "generators (C-PGC, 2024)")
    perturbs = ("image", "text")

    class Options(Options):
        eps: float = fields.eps(12 / 255)
        epochs: int = fields.epochs(40)
        steps: int | None = fields.total_steps()
        min_steps: int = fields.min_steps(0)
        batch_size: int = fields.batch_size(4)
        lr: float = fields.lr(2e-4, "Adam learning rate of both generators")
        beta1: float = Field(0.5, ge=0, lt=1, description="Adam beta1")
        beta2: float = Field(0.999, ge=0, lt=1, description="Adam beta2")
        tau: float = Field(0.1, gt=0, description="temperature of the contrastive loss")
        alpha: float = fields.weight(0.1, "weight of the (subtracted) feature-distance SSE")
        scales: list[float] = Field(default_factory=lambda: list(SCALES),
                                    description="extra scales of each batch (the original "
                                                "is always in)")
        noise_std: float = fields.weight(0.05, "Gaussian noise before scaling")
        target: Literal["batch", "farthest"] = Field(
            "batch", description="batch: least similar of a random batch of target_batch "
                                 "items (official); farthest: over the whole training sample")
        target_batch: int = fields.batch_size(4, "items in a random target batch")
        text: bool | None = Field(None, description="learn the word substitution (default: "
                                                    "when the data has real captions)")
        train_items: int | None = fields.train_items(1000)
        z_dim: int = Field(100, ge=1, description="size of the image generator's noise")
        g_width: int = Field(32, ge=8, description="width of the image generator's last stage")

    # ------------------------------------------------------------------ fit
    def fit(self, model, data, run) -> Artifact:
        o = self.options
        if len(data) < 2:
            raise MmsecError(f"{self.name}: needs at least two training items")
        n = len(data) if o.train_items is None else min(len(data), o.train_items)
        items = torch.randperm(len(data), generator=run.rng("train_items"))[:n].sort().values
        captions = CaptionTable(data, items)
        if len(captions) == 0:
            raise MmsecError(f"{self.name}: {data.describe()} has neither captions nor class "
                             "names (the contrastive loss needs texts)")
        use_text = data.has_captions if o.text is None else o.text
        device = model.device
        height, width = (int(v) for v in data[0][0].shape[-2:])
        size = max(8, 2 ** math.ceil(math.log2(max(height, width))))
        with run.timer("cpgc_prepare"):
            prep = _Prepared(model, data, items, captions, use_text, run)
        with run.seeded("init"):
            g_img = ImageGenerator(size, model.embed_dim, o.z_dim, o.g_width,
                                   generator=run.rng("z_image")).to(device)
            g_txt = WordGenerator(prep.word_width, model.embed_dim,
                                  generator=run.rng("z_text")).to(device) if use_text else None
        stream = run.seed_for("batches")
        bs = min(o.batch_size, n)

        def batches(epoch: int):
            gen = torch.Generator().manual_seed(stream + epoch)
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, bs):
                rows = perm[start:start + bs]
                targets = torch.randint(0, n, (o.target_batch,), generator=gen)
                seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
                yield rows, targets, seed

        loss = _Loss(o, model, data, prep, g_img, g_txt, (height, width))
        adam = {"kind": "adam", "lr": o.lr, "betas": (o.beta1, o.beta2), "schedule": "constant"}
        optims = {"image": Optim(g_img, **adam)}
        if g_txt is not None:
            optims["text"] = Optim(g_txt, **adam)
        with run.timer("cpgc_train"):
            out = train(loss, Batches(batches, -(-n // bs)), optims, epochs=o.epochs,
                        steps=o.steps, min_steps=o.min_steps, run=run,
                        slot="cpgc", desc=self.name,
                        train_modules=[g for g in (g_img, g_txt) if g is not None])
        with torch.no_grad():
            g_img.eval()
            delta = resize_perturbation(g_img(prep.caption_context(), o.eps), height, width,
                                        o.eps).cpu()
            tensors = {"delta": delta}
            meta = {"height": height, "width": width, "train_items": n, "steps": out.steps,
                    "text": bool(use_text)}
            if g_txt is not None:
                g_txt.eval()
                e = g_txt(prep.image_context(), prep.min_norm, prep.max_norm)
                word, sim = prep.snap(e)
                tensors["word_embedding"] = e.cpu()
                meta.update(word=word, word_cosine=sim, vocabulary_sample=prep.vocabulary_sample)
        art = self.artifact(tensors, meta)
        self._report(run, art, g_img, g_txt, out)
        return art

    # ------------------------------------------------------------------ apply
    def apply(self, artifact: Artifact, images: torch.Tensor, labels=None, *, victim=None,
              run=None) -> torch.Tensor:
        """Add the perturbation to ``images`` ``[B, 3, H, W]`` in [0, 1] (any size)."""
        delta = artifact.tensors["delta"].to(images.device, images.dtype)
        delta = resize_perturbation(delta, *images.shape[-2:], self.options.eps)
        return (images + delta).clamp(0, 1)

    def sides(self, artifact: Artifact) -> tuple[str, ...]:
        return ("image", "text") if artifact.meta.get("word") else ("image",)

    def apply_text(self, artifact: Artifact, texts, *, victim=None, run=None) -> list[str]:
        """Each caption with its most important word (for the victim model) replaced by the
        learned word; captions without a replaceable word are left as they are."""
        word = artifact.meta.get("word")
        if not word or victim is None:
            return list(texts)
        spans = self._spans(victim.model, list(texts))
        return [t if s is None else replace_word(t, s, word)
                for t, s in zip(texts, spans, strict=True)]

    def _spans(self, model, texts: list[str]):
        # the adversarial and the control conditions replace the same words: compute once
        key = (model.fingerprint, len(texts), hash(tuple(texts)))
        memo = self.__dict__.setdefault("_span_memo", {})
        if key not in memo:
            memo.clear()
            memo[key] = important_words(model, texts)
        return memo[key]

    def control(self, artifact: Artifact, seed: int = 0) -> Artifact:
        """Uniform noise of the same eps, and a random word at the same positions."""
        gen = torch.Generator().manual_seed(seed)
        eps = self.options.eps
        noise = (torch.rand(artifact.tensors["delta"].shape, generator=gen) * 2 - 1) * eps
        meta = {"control": "uniform noise, random word"}
        words = artifact.meta.get("vocabulary_sample") or []
        if artifact.meta.get("word") and words:
            meta["word"] = words[int(torch.randint(len(words), (1,), generator=gen))]
        return artifact.variant({"delta": noise}, **meta)

    # ------------------------------------------------------------------ report
    def _report(self, run, art: Artifact, g_img, g_txt, out) -> None:
        o, meta = self.options, art.meta
        delta = art.tensors["delta"]
        run.save_image("cpgc-delta", (delta / (2 * o.eps) + 0.5).clamp(0, 1),
                       scale=max(1, 128 // max(delta.shape[-2:])), report=True)
        state = {f"image.{k}": v for k, v in g_img.state_dict().items()}
        if g_txt is not None:
            state.update({f"text.{k}": v for k, v in g_txt.state_dict().items()})
        run.save_tensors("generators", state)
        run.metrics["cpgc_steps"] = float(out.steps)
        last = out.history[-1] if out.history else {}
        for k in ("loss_image", "loss_text"):
            if k in last:
                run.metrics[f"cpgc_{k}"] = float(last[k])
        if "word" in meta:
            run.set("cpgc_word", meta["word"])
            run.metrics["cpgc_word_cosine"] = float(meta["word_cosine"])
        keys = [k for k in ("loss_image", "loss_text", "img_contrastive", "img_sse",
                            "txt_contrastive", "txt_sse") if any(k in h for h in out.history)]
        lines = [
            f"{meta['steps']} steps of {o.batch_size} items over {meta['train_items']} training "
            f"items, eps {o.eps * 255:.0f}/255, target rule `{o.target}`, scales 1 + "
            f"{', '.join(f'{s:g}' for s in o.scales)}.",
            "",
            (f"Learned word: **{meta['word']}** (cosine {meta['word_cosine']:.3f} between the "
             "learned embedding and that word's)." if "word" in meta else
             "Text side off (no real captions, or `text: false`)."),
            "",
            "| epoch | " + " | ".join(keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
        for h in out.history:
            lines.append(f"| {int(h['epoch']) + 1} | "
                         + " | ".join(f"{h[k]:.4g}" if k in h else "" for k in keys) + " |")
        run.add_section("C-PGC training", "\n".join(lines))


class _Prepared:
    """What stays fixed while the generators train: clean embeddings of the training
    items and their captions, targets for ``farthest``, and the text side's slots."""

    def __init__(self, model, data, items: torch.Tensor, captions: CaptionTable,
                 use_text: bool, run) -> None:
        from mmsec import Subset

        self.items, self.captions, self.device = items, captions, model.device
        sub = Subset(data, items.tolist())
        self.image_emb = encode_images(model, sub, run.cache, progress=False).to(self.device)
        self.text_emb = encode_texts(model, captions.texts, run.cache).to(self.device)
        # each training item's mean caption embedding (the condition and the target space)
        self.item_text = captions.mean_embedding(items, self.text_emb.cpu()).to(self.device)
        # farthest-item targets as the paper defines them: exact search (kind="exact")
        index_text = VectorIndex(self.item_text, device=self.device, kind="exact")
        _, far = index_text.farthest(self.image_emb, 1)
        # [N] row of each image's target, on the host: a step looks its rows up there
        self.farthest_item = far[:, 0].cpu()
        self.use_text = use_text
        self.word_width = 0
        self.vocabulary_sample: list[str] = []
        if not use_text:
            return
        vocab = model.vocabulary()
        keep = [i for i, w in enumerate(vocab.words) if w not in STOP_WORDS and len(w) > 1]
        if not keep:
            raise MmsecError("cpgc: the model's vocabulary has no usable words for the text side")
        self.vocab_ids = vocab.ids[keep].to(self.device)
        self.vocab_words = [vocab.words[i] for i in keep]
        table = model.token_embedding.weight.detach()
        vocab_emb = table[self.vocab_ids]
        norms = vocab_emb.norm(dim=-1)
        self.min_norm, self.max_norm = float(norms.min()), float(norms.max())
        self.word_width = int(table.shape[1])
        self.vocab_index = VectorIndex(vocab_emb, device=self.device, kind="exact")
        # caption slots: the important word of each caption -> a placeholder token position
        spans = important_words(model, captions.texts)
        holders = placeholder_words(self.vocab_words)
        self.tokens, self.position = substitution_slots(model, captions.texts, spans, holders)
        self.tokens = self.tokens.to(self.device)
        index_img = VectorIndex(self.image_emb, device=self.device, kind="exact")
        _, far_img = index_img.farthest(self.text_emb, 1)
        self.farthest_image_of_text = far_img[:, 0].to(self.device)
        rng = torch.Generator().manual_seed(run.seed_for("vocabulary_sample"))
        pick = torch.randperm(len(self.vocab_words), generator=rng)[:64].tolist()
        self.vocabulary_sample = [self.vocab_words[i] for i in pick]

    def caption_context(self) -> torch.Tensor:
        """The image generator's final condition: the training items' caption embeddings."""
        return self.item_text[:1024]

    def image_context(self) -> torch.Tensor:
        return self.image_emb[:1024]

    def snap(self, e: torch.Tensor) -> tuple[str, float]:
        """The real word whose embedding is closest (cosine) to ``e``."""
        sims, idx = self.vocab_index.knn(e[None], 1)
        return self.vocab_words[int(idx[0, 0])], float(sims[0, 0])


class _Loss:
    """One step: the text generator's loss (if any), then the image generator's."""

    def __init__(self, o, model, data, prep: _Prepared, g_img, g_txt, size) -> None:
        self.o, self.model, self.data, self.prep = o, model, data, prep
        self.g_img, self.g_txt, self.size = g_img, g_txt, size

    def __call__(self, batch, ctx) -> dict[str, torch.Tensor]:
        rows_cpu, targets, seed = batch
        p, device = self.prep, self.prep.device
        # the indexing into host tables uses the batch's own CPU rows: reading them back
        # from the device would wait for the GPU several times a step
        rows_cpu = rows_cpu.cpu()
        rows, targets = rows_cpu.to(device), targets.to(device)
        gen = torch.Generator().manual_seed(seed)
        items = p.items[rows_cpu]
        x = load_images(self.data, items)[0].to(device)
        out: dict[str, torch.Tensor] = {}
        if self.g_txt is not None:
            out.update(self._text(rows, rows_cpu, targets))
        out.update(self._image(x, rows, rows_cpu, targets, gen))
        return out

    # image side
    def _image(self, x, rows, rows_cpu, targets, gen) -> dict[str, torch.Tensor]:
        o, p = self.o, self.prep
        cond = p.item_text[rows]
        delta = self.g_img(cond, o.eps)
        delta = resize_perturbation(delta, *x.shape[-2:], o.eps)
        views = _scaled_views(x, o.eps, o.scales, o.noise_std, gen)
        ids, count = p.captions.ids, p.captions.count
        own = [ids[int(r), :int(count[int(r)])] for r in rows_cpu]
        tgt = self._image_targets(rows, rows_cpu, targets)
        loss = x.new_zeros(())
        sse = x.new_zeros(())
        for view in views:
            adv = self.model.encode_image((view + delta).clamp(0, 1))
            with torch.no_grad():
                clean = self.model.encode_image(view)
            loss = loss + _contrastive(adv, p.text_emb, own, [own_of(p, t) for t in tgt], o.tau)
            # a sum over the batch: over the global batch under torchrun
            sse = sse + distributed.gather((adv - clean).pow(2).sum(-1)).sum()
        total = loss - o.alpha * sse
        return {"image": total, "img_contrastive": loss.detach(), "img_sse": sse.detach()}

    def _image_targets(self, rows, rows_cpu, targets) -> list[int]:
        p = self.prep
        if self.o.target == "farthest":  # no device read-back
            return p.farthest_item[rows_cpu].tolist()
        clean = p.image_emb[rows]  # [B, D]
        sims = clean @ p.item_text[targets].t()  # mean caption similarity per target item
        return targets[sims.argmin(1)].tolist()

    # text side
    def _text(self, rows, rows_cpu, targets) -> dict[str, torch.Tensor]:
        o, p = self.o, self.prep
        ids, count = p.captions.ids, p.captions.count
        caps_cpu = torch.cat([ids[int(r), :int(count[int(r)])] for r in rows_cpu])
        owner = torch.cat([torch.full((int(count[int(r)]),), i) for i, r in
                           enumerate(rows_cpu)])
        keep = p.position[caps_cpu] >= 0
        # under torchrun the means below are over the global batch's captions: a process
        # whose rows have none still joins the gathers (with no rows)
        if not distributed.any_process(bool(keep.any())):
            return {}
        e = self.g_txt(p.image_emb[rows], p.min_norm, p.max_norm)
        if bool(keep.any()):
            own_t, tgt_t, sse_t = self._text_terms(e, rows, targets, caps_cpu[keep],
                                                   owner[keep].to(p.device))
        else:
            own_t = tgt_t = sse_t = e.reshape(len(e), -1)[:0, 0]  # [0], in the graph
        s_own = distributed.gather(own_t).mean()
        s_tgt = distributed.gather(tgt_t).mean()
        contrastive = torch.log(s_own / (s_own + s_tgt))
        sse = distributed.gather(sse_t).sum()
        return {"text": contrastive - o.alpha * sse, "txt_contrastive": contrastive.detach(),
                "txt_sse": sse.detach()}

    def _text_terms(self, e, rows, targets, caps_cpu, owner):
        """Per kept caption: ``exp(cos / tau)`` to its own and to its target image, and the
        squared distance of its adversarial embedding to the clean one."""
        o, p = self.o, self.prep
        caps = caps_cpu.to(p.device)
        tokens = p.tokens[caps]
        emb = self.model.token_embedding(tokens).detach()
        pos = p.position[caps_cpu].to(p.device)
        onehot = F.one_hot(pos, tokens.shape[1]).to(emb.dtype)[..., None]  # [M, L, 1]
        emb = emb * (1 - onehot) + onehot * e.to(emb.dtype)
        adv = self.model.encode_text(tokens, embeddings=emb)
        clean = p.text_emb[caps]
        own_img = p.image_emb[rows][owner]  # [M, D]
        if o.target == "farthest":
            tgt_img = p.image_emb[p.farthest_image_of_text[caps]]
        else:
            cand = p.image_emb[targets]  # [T, D]
            choice = (adv.detach() @ cand.t()).argmin(1)
            tgt_img = cand[choice]
        return (torch.exp((adv * own_img).sum(-1) / o.tau),
                torch.exp((adv * tgt_img).sum(-1) / o.tau),
                (adv - clean).pow(2).sum(-1))


def own_of(p: _Prepared, row: int) -> torch.Tensor:
    """Caption ids of training row ``row``."""
    return p.captions.ids[row, :int(p.captions.count[row])]


def _contrastive(adv: torch.Tensor, text_emb: torch.Tensor, own: list[torch.Tensor],
                 tgt: list[torch.Tensor], tau: float) -> torch.Tensor:
    """``log(S_own / (S_own + S_tgt))`` with the batch mean inside the log (official); under
    torchrun the mean is over the global batch."""
    s_own = torch.stack([torch.exp(adv[b] @ text_emb[own[b].to(adv.device)].t() / tau).sum()
                         for b in range(len(own))])
    s_tgt = torch.stack([torch.exp(adv[b] @ text_emb[tgt[b].to(adv.device)].t() / tau).sum()
                         for b in range(len(tgt))])
    s_own, s_tgt = distributed.gather(s_own).mean(), distributed.gather(s_tgt).mean()
    return torch.log(s_own / (s_own + s_tgt))


def _scaled_views(x: torch.Tensor, eps: float, scales, noise_std: float,
                  gen: torch.Generator) -> list[torch.Tensor]:
    """The original (with uniform +-eps pre-noise) and each scale: Gaussian noise, resized to
    ``scale`` and back (bicubic), clamped to [0, 1]."""
    h, w = x.shape[-2:]
    # (per-item noise drawn as one process draws it, under torchrun too)
    base = (x + (distributed.global_rand(x.shape, generator=gen).to(x.device) * 2 - 1)
            * eps).clamp(0, 1)
    views = [base]
    for s in scales:
        noisy = base + distributed.global_randn(x.shape, generator=gen).to(x.device) * noise_std
        small = F.interpolate(noisy, size=(max(1, int(s * h)), max(1, int(s * w))),
                              mode="bicubic", align_corners=False).clamp(0, 1)
        views.append(F.interpolate(small, size=(h, w), mode="bicubic",
                                   align_corners=False).clamp(0, 1))
    return views
