"""The GRACE defense: attacked inputs from the registered attack plugins, a layer-attention
latent that separates them from clean ones, a detector and a gated restorer (see the
package docstring and docs/grace.md)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from pydantic import Field

from mmsec import (
    AdaptedModel,
    Artifact,
    Batches,
    Defense,
    MmsecError,
    Optim,
    Options,
    Subset,
    UsageError,
    Victim,
    fields,
    load_images,
    metrics,
    pgd,
    train,
)
from mmsec.avqi import avqi as avqi_score
from mmsec.avqi import layer_avqi

from .net import GraceNet

__all__ = ["Grace", "family_name", "parse_family"]

#: Short schedules for the attacks GRACE fits to get examples (the attacks' own defaults
#: are for a real attack; GRACE needs their kind of input, not their best instance).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "advclip": {"epochs": 3, "batch_size": 32, "topology": "batch", "val_items": 0},
    "uap": {"epochs": 5},
    "cpgc": {"epochs": 3},
}

DETECTOR_FILE = "grace-detector.safetensors"


def parse_family(spec: str) -> tuple[str, dict[str, Any]]:
    """``"plugin"`` or ``"plugin:key=value+key=value"`` (values read as YAML scalars), or a
    saved artifact FILE -> ``(name or FILE, options)``."""
    if spec.endswith(".safetensors"):
        return spec, {}
    name, _, rest = spec.partition(":")
    opts: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split("+"))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"grace: family {spec!r}: expected plugin:key=value+key=value")
        opts[key.strip()] = yaml.safe_load(value)
    return name.strip(), opts


def family_name(spec: str) -> str:
    """A metric-safe name for a family spec (``backdoor:trigger=sig`` -> ``backdoor_sig``)."""
    if spec.endswith(".safetensors"):
        return re.sub(r"\W+", "_", Path(spec).stem)
    name, opts = parse_family(spec)
    return re.sub(r"\W+", "_", "_".join([name, *(str(v) for v in opts.values())]))


def _split_features(feats: tuple[torch.Tensor, dict[str, torch.Tensor]], idx: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    emb, layers = feats
    return emb[idx], {k: v[idx] for k, v in layers.items()}


class Grace(Defense):
    """Layer-wise latent geometry: detect attacked inputs and restore their embeddings."""

    name = "grace"
    description = ("GRACE for CLIP: layer-attention latent separating attacked from clean "
                   "inputs (all attack families cohesive), a detector and a gated embedding "
                   "restorer on the frozen model (ALKALI, 2025)")

    class Options(Options):
        clean_items: int = Field(1000, ge=16, description="clean images used (at most the "
                                                          "host's --clean-items)")
        train_families: list[str] = Field(
            default_factory=lambda: ["advclip", "uap"],
            description="attack families trained on: registered attack plugins "
                        "(plugin or plugin:key=value+key=value) or saved artifact FILEs")
        heldout_families: list[str] = Field(
            default_factory=lambda: ["pgd", "backdoor:trigger=badnets",
                                     "backdoor:trigger=blended", "backdoor:trigger=sig",
                                     "backdoor:trigger=wanet"],
            description="families only measured (never trained on)")
        family_options: dict[str, dict] = Field(
            default_factory=dict, description="options per attack plugin, over GRACE's "
                                              "short schedules (advclip, uap, cpgc)")
        calibration: float = Field(0.25, gt=0, lt=1, description="share of the clean items "
                                                                 "kept out of training (the "
                                                                 "threshold and the report)")
        fpr: float = Field(0.05, gt=0, lt=1, description="detector's false-positive rate on "
                                                         "the held-out clean items")
        dim: int = Field(64, ge=2, le=4096, description="latent width per layer projection")
        hidden: int = Field(256, ge=1, le=65536, description="restorer hidden width")
        temperature: float = Field(0.1, gt=0, description="prototype logit temperature")
        steps: int = fields.steps(600, "training steps")
        batch_size: int = fields.batch_size(128, "clean items per step (and as many attacked)",
                                            minimum=2)
        lr: float = fields.lr(2e-3, "AdamW learning rate (cosine)")
        weight_decay: float = fields.weight(1e-4, "AdamW weight decay")
        w_separation: float = fields.weight(1.0, "(a) clean vs attacked prototype CE")
        w_cohesion: float = fields.weight(1.0, "(b) attack families pulled to one cluster")
        w_restore: float = fields.weight(1.0, "(c) attacked embedding -> its clean one")
        w_keep: float = fields.weight(1.0, "clean embeddings left unchanged by the restorer")
        restore: bool = Field(True, description="train the restorer and return the hardened "
                                                "model (else the model as it was)")
        adaptive: bool = Field(True, description="also run a PGD that minimises the "
                                                 "detector's score (the report's adaptive "
                                                 "rows)")
        adaptive_eps: float = fields.eps(4 / 255, "adaptive PGD's L-inf budget")
        adaptive_steps: int = fields.steps(10, "adaptive PGD iterations")
        adaptive_weight: float = fields.weight(1.0, "weight of the detector logit in the "
                                                    "adaptive PGD's loss")

    # ------------------------------------------------------------------ host contract
    def build_adapter(self, spec: Mapping[str, Any]) -> GraceNet:
        return GraceNet.from_spec(spec)

    def detection_scores(self, artifact: Artifact, embeddings: torch.Tensor,
                         layers: Mapping[str, torch.Tensor]) -> torch.Tensor:
        net = self.build_adapter(artifact.meta["net"])
        net.load_state_dict(artifact.tensors)
        net.eval()
        missing = [k for k in net.names if k not in layers]
        if missing:
            raise MmsecError(f"grace detector: the model has no layer(s) {missing} (trained "
                             f"on {net.names}); use it with the model it was trained on")
        with torch.no_grad():
            return net.score({k: v.float().cpu() for k, v in layers.items()})

    # ------------------------------------------------------------------ apply
    def apply(self, model, data, run):
        o = self.options
        if not data.classnames:
            raise MmsecError("grace: the clean data has no class names (zero-shot needed)")
        specs = list(dict.fromkeys([*o.train_families, *o.heldout_families]))
        if not o.train_families:
            raise UsageError("grace: train_families is empty")
        names = [family_name(s) for s in specs]
        if len(set(names)) != len(names):
            raise UsageError(f"grace: two families share a name: {names}")
        for spec in specs:  # fail on a bad family before any heavy work
            name, opts = parse_family(spec)
            if name.endswith(".safetensors"):
                if not Path(name).is_file():
                    raise UsageError(f"grace: family artifact {name} does not exist")
            else:
                run.attack(name, {**FAMILY_DEFAULTS.get(name, {}),
                                  **o.family_options.get(name, {}), **opts})
        n = min(len(data), o.clean_items)
        perm = torch.randperm(len(data), generator=run.rng("clean_items"))[:n]
        n_cal = max(8, round(n * o.calibration))
        if n - n_cal < 8:
            raise UsageError(f"grace: {n} clean items leave too few to train on")
        idx = perm.tolist()
        tr, cal = torch.arange(n_cal, n), torch.arange(n_cal)
        x, y = load_images(data, idx)
        run.metrics["clean_items_used"] = float(n)
        head = model.zero_shot_head(data.classnames, data.templates).detach()
        device = model.device

        victim = Victim(model, data.classnames, data.templates)
        with run.timer("grace_features"):
            clean = self._features(model, x)
            fam: dict[str, tuple] = {}
            for spec, name in zip(specs, names, strict=True):
                attack, artifact = self._family(spec, model, Subset(data, [idx[i] for i in tr]),
                                                run)
                fam[name] = self._features(model, x, y, attack, artifact, victim, run, name)
        train_names = [family_name(s) for s in o.train_families]

        # ---------------------------------------------------------------- train
        widths = {k: v.shape[1] for k, v in clean[1].items()}
        with run.seeded("grace_init"):
            net = GraceNet(widths, clean[0].shape[1], o.dim, o.hidden, o.temperature)
        net.set_stats(_split_features(clean, tr)[1])
        net = net.to(device)
        self._train(net, clean, fam, train_names, tr, run, device)
        net.eval()

        # ---------------------------------------------------------------- measure
        with torch.no_grad():
            s_clean_cal = net.score(_to(_split_features(clean, cal)[1], device)).cpu()
        threshold = float(torch.quantile(s_clean_cal, 1 - o.fpr))
        run.metrics["detector_threshold"] = threshold
        run.metrics["detector_clean_fpr"] = float((s_clean_cal > threshold).float().mean())
        rows = self._report(net, clean, fam, train_names, cal, y, head, threshold, run, device)
        profile = net.profile().detach().cpu()
        for k, w in zip(net.names, profile.tolist(), strict=True):
            run.metrics[f"attention_{k}"] = w
        artifact = Artifact(self.name, options=self.options_dict(),
                            tensors={k: v.detach().cpu() for k, v in net.state_dict().items()},
                            meta={"net": net.spec(), "threshold": threshold, "fpr": o.fpr,
                                  "train_families": o.train_families,
                                  "heldout_families": o.heldout_families,
                                  "model": model.fingerprint})
        path = artifact.save(run.artifacts_dir / DETECTOR_FILE)
        run.set("detector", str(path))
        self._plot_profile(net.names, profile, run)
        hardened = AdaptedModel(model, self, net, net.names, net.spec())
        if o.adaptive:
            with run.timer("grace_adaptive"):
                self._adaptive(model, hardened, net, x[cal], y[cal], head, threshold, run)
        run.add_section("GRACE", self._section(rows, net.names, profile, run.metrics))
        return hardened if o.restore else model

    # ------------------------------------------------------------------ families
    def _family(self, spec: str, model, data, run) -> tuple[Any, Artifact]:
        """The attack plugin and artifact that make a family's inputs: a saved artifact, a
        drawn one (``Attack.sample``), or one fitted on the training items in a child run."""
        name, opts = parse_family(spec)
        if name.endswith(".safetensors"):
            if not Path(name).exists():
                raise UsageError(f"grace: family artifact {name} does not exist")
            artifact = Artifact.load(name)
            return run.registry.attack_for(artifact), artifact
        opts = {**FAMILY_DEFAULTS.get(name, {}), **self.options.family_options.get(name, {}),
                **opts}
        attack = run.attack(name, opts)
        artifact = attack.sample(run.seed_for(f"family.{spec}"))
        if artifact is None:
            fields_ = getattr(type(attack).Options, "model_fields", {})
            if "train_items" in fields_ and "train_items" not in opts:
                opts["train_items"] = len(data)
            run.log.info("grace: %s %s for its attacked inputs",
                         "fitting" if attack.universal else "configuring", spec)
            attack, fitted = run.fit_attack(name, model, data, opts,
                                            child=f"family-{family_name(spec)}")
            artifact = fitted.artifact
        # reusable: mmsec eval --attack-artifact / --detector on the same family
        artifact.save(run.artifacts_dir / f"family-{family_name(spec)}.safetensors")
        return attack, artifact

    def _features(self, model, x, y=None, attack=None, artifact=None, victim=None, run=None,
                  name=None, batch: int = 128):
        """(normalised embeddings [N, D], {layer: pooled [N, C]}) of ``x`` (attacked first
        when an attack is given), on the CPU."""
        embs, acts_all = [], {}
        device = model.device
        for s in range(0, len(x), batch):
            xb = x[s:s + batch].to(device)
            if attack is not None:
                yb = y[s:s + batch].to(device)
                xb = attack.perturb(artifact, xb, yb, victim=victim, run=run)
                if s == 0:
                    run.save_image(f"example-{name}", torch.cat([x[0], xb[0].cpu()], dim=-1),
                                   scale=4)
            with torch.no_grad():
                emb, acts = model.forward_features(xb)
            embs.append(emb.cpu())
            for k, a in acts.items():
                acts_all.setdefault(k, []).append(a.float().cpu())
        return torch.cat(embs), {k: torch.cat(v) for k, v in acts_all.items()}

    # ------------------------------------------------------------------ training
    def _train(self, net: GraceNet, clean, fam, train_names, tr, run, device) -> None:
        o = self.options
        n_tr = len(tr)
        bs = min(o.batch_size, n_tr)
        per_fam = max(1, bs // len(train_names))
        steps_per_epoch = max(1, math.ceil(n_tr / bs))

        def batches(epoch: int):
            g = run.rng(f"grace.epoch{epoch}")
            for _ in range(steps_per_epoch):
                ic = tr[torch.randperm(n_tr, generator=g)[:bs]]
                ia = [tr[torch.randperm(n_tr, generator=g)[:per_fam]] for _ in train_names]
                yield ic, ia

        def step(batch, _ctx):
            ic, ia = batch
            e_c, l_c = _split_features(clean, ic)
            e_c, l_c = e_c.to(device), _to(l_c, device)
            r_c, s_c = net.restore(e_c, l_c)
            zs, ss, rs, targets = [], [], [], []
            for name, i in zip(train_names, ia, strict=True):
                e_a, l_a = _split_features(fam[name], i)
                r_a, s_a = net.restore(e_a.to(device), _to(l_a, device))
                zs.append(net.latent(_to(l_a, device)))
                ss.append(s_a)
                rs.append(r_a)
                targets.append(clean[0][i].to(device))
            s_a = torch.cat(ss)
            # (a) separation: clean -> prototype 0, attacked -> prototype 1
            sep = 0.5 * (F.softplus(s_c).mean() + F.softplus(-s_a).mean())
            # (b) cohesion: every family's attacked latents around one shared centre
            centre = torch.cat(zs).mean(0)
            coh = sum((z.mean(0) - centre).pow(2).sum() for z in zs) / len(zs) \
                + (torch.cat(zs) - centre).pow(2).sum(1).mean()
            loss = o.w_separation * sep + o.w_cohesion * coh
            out = {"separation": sep.detach(), "cohesion": coh.detach()}
            if o.restore:
                # (c) restoration of the attacked embedding to the clean one; clean kept
                rest = (1 - F.cosine_similarity(torch.cat(rs), torch.cat(targets))).mean()
                keep = (1 - F.cosine_similarity(r_c, e_c)).mean()
                loss = loss + o.w_restore * rest + o.w_keep * keep
                out.update(restore=rest.detach(), keep=keep.detach())
            return {"loss": loss, **out}

        train(step, Batches(batches, steps_per_epoch),
              Optim(net, kind="adamw", lr=o.lr, weight_decay=o.weight_decay),
              steps=o.steps, run=run, slot="grace", train_modules=[net],
              desc="grace training")

    # ------------------------------------------------------------------ report
    def _report(self, net, clean, fam, train_names, cal, y, head, threshold, run, device):
        """Per family on the held-out clean items: detection AUROC / TPR, AVQI before (the
        model's own layers and embedding) and after (GRACE's latent), top-1 attacked and
        restored."""
        e_c, l_c = _split_features(clean, cal)
        yc = y[cal]
        with torch.no_grad():
            s_c = net.score(_to(l_c, device)).cpu()
            z_c = net.latent(_to(l_c, device)).cpu()
            r_c, _ = net.restore(e_c.to(device), _to(l_c, device))
        top1 = _top1(e_c, head, yc)
        run.metrics["clean_top1_before"] = top1
        run.metrics["clean_top1_after"] = _top1(r_c.cpu(), head, yc)
        rows = []
        for name, feats in fam.items():
            e_a, l_a = _split_features(feats, cal)
            with torch.no_grad():
                s_a = net.score(_to(l_a, device)).cpu()
                z_a = net.latent(_to(l_a, device)).cpu()
                r_a, _ = net.restore(e_a.to(device), _to(l_a, device))
            truth = torch.cat([torch.zeros(len(s_c)), torch.ones(len(s_a))]).bool()
            layers_before = layer_avqi(l_c, l_a)
            m = {"detect_auroc": metrics.auroc(torch.cat([s_c, s_a]), truth),
                 "detect_tpr": float((s_a > threshold).float().mean()),
                 "avqi_before": avqi_score(e_c, e_a),
                 "avqi_layers_before": sum(layers_before.values()) / len(layers_before),
                 "avqi_after": avqi_score(z_c, z_a),
                 "top1_attacked": _top1(e_a, head, yc),
                 "top1_restored": _top1(r_a.cpu(), head, yc)}
            for k, v in m.items():
                run.metrics[f"{k}_{name}"] = v
            rows.append((name, "seen" if name in train_names else "held out", m))
        for group in ("seen", "held out"):
            sel = [m for _, g, m in rows if g == group]
            if sel:
                key = group.replace(" ", "")
                for k in ("detect_auroc", "detect_tpr", "avqi_before", "avqi_after"):
                    run.metrics[f"{k}_{key}_mean"] = sum(m[k] for m in sel) / len(sel)
        return rows

    def _adaptive(self, model, hardened, net, x, y, head, threshold, run) -> None:
        """PGD on the held-out clean items against the hardened model's zero-shot
        prediction, with and without ``- adaptive_weight * detector logit`` in its loss."""
        o = self.options
        device = model.device
        head_d = head.to(device)

        def attack(weight: float) -> tuple[float, float]:
            tpr, acc, n = 0.0, 0.0, 0
            for s in range(0, len(x), 64):
                xb, yb = x[s:s + 64].to(device), y[s:s + 64].to(device)

                def loss_fn(xa, yb=yb):
                    emb, acts = model.forward_features(xa)
                    r, score = net.restore(emb, acts)
                    logits = F.normalize(r, dim=-1) @ head_d.t() * 100
                    return F.cross_entropy(logits, yb) - weight * score.mean()

                xa = pgd(loss_fn, xb, eps=o.adaptive_eps, step_size=o.adaptive_eps / 4,
                         steps=o.adaptive_steps, generator=run.rng(f"adaptive{s}.{weight}"))
                with torch.no_grad():
                    emb, acts = model.forward_features(xa)
                    r, score = net.restore(emb, acts)
                    pred = (F.normalize(r, dim=-1) @ head_d.t()).argmax(1)
                tpr += float((score > threshold).float().sum())
                acc += float((pred == yb).float().sum())
                n += len(xb)
            return tpr / n, acc / n

        for label, weight in (("pgd", 0.0), ("adaptive", o.adaptive_weight)):
            tpr, acc = attack(weight)
            run.metrics[f"{label}_detect_tpr"] = tpr
            run.metrics[f"{label}_top1_hardened"] = acc

    def _plot_profile(self, names, profile, run) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            run.log.info("grace: matplotlib not installed; the attention profile is in the "
                         "report's table only")
            return
        import io

        fig, ax = plt.subplots(figsize=(max(3, 0.5 * len(names) + 1), 2.5), dpi=100)
        ax.bar(range(len(names)), profile.tolist(), color="#4477aa")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("attention")
        ax.set_title("GRACE layer-attention profile", fontsize=9)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        import numpy as np
        from PIL import Image

        img = torch.from_numpy(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
                               .copy()).permute(2, 0, 1).float() / 255
        run.save_image("attention-profile", img, report=True)

    def _section(self, rows, names, profile, m) -> str:
        lines = ["Detection on the held-out clean items and their attacked versions "
                 f"(threshold at {self.options.fpr:.0%} FPR: clean FPR "
                 f"{m['detector_clean_fpr']:.1%}).", "",
                 "| family | trained on | AUROC | TPR | AVQI before -> after (latent) | "
                 "top-1 attacked -> restored |", "|---|---|---|---|---|---|"]
        for name, group, r in rows:
            lines.append(f"| {name} | {'yes' if group == 'seen' else 'no'} | "
                         f"{r['detect_auroc']:.3f} | {r['detect_tpr']:.1%} | "
                         f"{r['avqi_before']:.3f} -> {r['avqi_after']:.3f} | "
                         f"{r['top1_attacked']:.1%} -> {r['top1_restored']:.1%} |")
        lines += ["", f"Clean top-1 {m['clean_top1_before']:.1%} -> {m['clean_top1_after']:.1%}."]
        if "adaptive_detect_tpr" in m:
            lines.append(f"PGD (eps {self.options.adaptive_eps * 255:.0f}/255) against the "
                         f"hardened model: detected {m['pgd_detect_tpr']:.1%}; adaptive PGD "
                         f"that also lowers the detector's score: detected "
                         f"{m['adaptive_detect_tpr']:.1%}, top-1 {m['adaptive_top1_hardened']:.1%}.")
        lines += ["", "Layer attention: " + ", ".join(
            f"{k} {w:.2f}" for k, w in zip(names, profile.tolist(), strict=True))]
        return "\n".join(lines)


def _to(layers: Mapping[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in layers.items()}


def _top1(emb: torch.Tensor, head: torch.Tensor, y: torch.Tensor) -> float:
    pred = metrics.zero_shot_logits(emb.float().cpu(), head.cpu()).argmax(1)
    return metrics.clean_accuracy(pred, y.cpu())
