"""The InverTune defense: options, the three stages and their report (see the package doc).

Shapes: clean images ``[N, 3, H, W]`` in [0, 1]; mask ``[1, 1, H, W]`` and pattern
``[1, 3, H, W]`` in [0, 1]; stage activations as ``ClipModel.forward_features(...,
pooled=False)`` returns them (ResNet ``[B, C, h, w]``, ViT ``[B, L, D]``).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from mmsec import (
    Artifact,
    Batches,
    Defense,
    MmsecError,
    Optim,
    Options,
    Subset,
    UsageError,
    fields,
    kmeans,
    load_images,
    train,
    write_atomic,
)
from mmsec.losses import ssim

from . import probes

Stage = Literal["identify", "invert", "tune"]
Family = Literal["patch", "additive", "warp"]

# Simulator defaults when the simulator is advclip: a short schedule (the paper's 20 epochs
# over a large set are for 224-px CLIPs; on the clean set a few epochs give a usable patch)
# and a 10% patch (at 32 px the 3% patch, 6 px, sent the predictions to a "sink" class
# of the model on all four zoo:shapes backdoors; 10% found the BadNets and WaNet targets).
SIMULATOR_DEFAULTS = {
    "advclip": {"epochs": 3, "batch_size": 32, "topology": "batch", "val_items": 0,
                "area": 0.1},
}


class InverTune(Defense):
    """Identify the target, invert the trigger, tune the critical activations away."""

    name = "invertune"
    description = ("backdoor removal from a small clean set: target identification, trigger "
                   "inversion, clustering-guided activation tuning (InverTune, 2025)")

    class Options(Options):
        stages: list[Stage] = Field(
            default_factory=lambda: ["identify", "invert", "tune"],
            description="stages to run (identify,invert,tune); invert needs a target "
                        "(identify or target), tune needs invert")
        clean_items: int = Field(1000, ge=8, description="clean images used (at most the "
                                                         "host's --clean-items)")
        target: str | None = Field(
            None, description="ablation only: the target class (name or index) instead of "
                              "identifying it")
        simulator: str = Field(
            "auto", description="auto: targeted trigger probes of every family per class "
                                "(see probes.py); or an attack plugin simulating an "
                                "untargeted universal attack (advclip, uap), or a saved "
                                "artifact FILE (.safetensors)")
        probe_families: list[Family] = Field(
            default_factory=lambda: ["patch", "additive", "warp"],
            description="auto: trigger families probed (patch,additive,warp)")
        probe_steps: int = Field(40, ge=1, le=100000, description="auto: Adam steps per probe")
        probe_batch: int = fields.batch_size(16, "auto: images per probe step (a patch probe "
                                                 "gets this many per place)")
        probe_patch_side: float = Field(0.3, gt=0, le=1, description="auto: patch probe side "
                                                                     "/ shorter image side")
        probe_patch_grid: int = Field(2, ge=1, le=8, description="auto: patch places per side "
                                                                 "(and the centre)")
        probe_patch_starts: int = Field(
            16, ge=1, le=64, description="auto: random starts per patch place, halved by "
                                         "training loss until one is left (a decoy-trained "
                                         "BadNets code is found from ~1 start in 3; see "
                                         "probes.py)")
        probe_eps: float = fields.eps(16 / 255, "auto: additive probe's L-inf budget")
        probe_warp_strength: float = Field(0.1, gt=0, le=0.5,
                                           description="auto: warp probe's largest "
                                                       "displacement / image side")
        probe_warp_grid: int = Field(4, ge=2, le=32, description="auto: warp control points "
                                                                 "per side")
        suspects: int = Field(
            3, ge=1, le=3, description="auto: classes inverted and tuned away: the top class "
                                       "and, up to this many in all, the other families' "
                                       "leaders with a lead of at least suspect_lead (a "
                                       "natural sink can outrank the target in another "
                                       "family); 1 = the top class only (the paper)")
        suspect_rounds: int = Field(
            3, ge=1, le=10, description="auto: invert+tune rounds of each suspect after the "
                                        "first, one class at a time after the first's rounds "
                                        "(fewer cost less accuracy where the top class is the "
                                        "target; see the package doc)")
        suspect_lead: float = Field(
            0.3, ge=0, description="auto: a family's leader this far ahead of its runner-up "
                                   "(log-odds) is a suspect next to the top class")
        min_confidence: float = Field(
            1.0, ge=0, description="auto: the top class's lead over the runner-up of its "
                                   "family (log-odds) below which the report says no class "
                                   "stands out")
        candidates: int = Field(16, ge=1, description="auto: classes probed (all when there "
                                                      "are at most this many; else the ones "
                                                      "untargeted probes drift to most)")
        simulator_options: dict = Field(
            default_factory=dict, description="options of the simulator plugin (advclip: "
                                              "a short schedule by default)")
        # stage 2: trigger inversion
        invert_epochs: int = fields.epochs(10, "trigger inversion epochs")
        invert_steps: int | None = fields.total_steps("trigger inversion steps (overrides "
                                                      "invert_epochs)")
        invert_min_steps: int = fields.min_steps(100, "at least this many inversion steps "
                                                      "(more epochs on a small clean set)")
        invert_batch: int = fields.batch_size(64, "trigger inversion batch size")
        invert_lr: float = fields.lr(0.01, "Adam learning rate of mask/pattern")
        w_ce: float = fields.weight(5.0, "weight of the target cross-entropy")
        w_embed: float = fields.weight(0.5, "weight of the pull to target images")
        w_ssim: float = fields.weight(1.0, "weight of 1-SSIM (pixels in [0, 1])")
        w_mask: float = fields.weight(0.01, "weight of the mask's L1 norm (sum)")
        temperature: float = Field(0.07, gt=0, description="CE temperature on cosines")
        mask_init: float = Field(0.1, gt=0, lt=1, description="initial mask value")
        # stage 3: activation tuning
        top_layers: int = Field(3, ge=1, description="stages tuned (largest shift first)")
        tune_steps: int = fields.steps(200, "fine-tuning steps")
        tune_batch: int = fields.batch_size(64, "clean images per step", minimum=2)
        tune_lr: float = fields.lr(1e-4, "AdamW lr (paper 2e-6 is for large pretrained CLIPs; "
                                         "see the docstring)")
        tune_weight_decay: float = fields.weight(1e-4, "AdamW weight decay")
        grad_clip: float = Field(1.0, gt=0, description="gradient norm clip")
        w_preserve: float = fields.weight(20.0, "weight of the embedding-preservation term "
                                                "(paper 0.5 at lr 2e-6; see the docstring)")
        w_invariance: float = fields.weight(
            1.0, "weight of ||f(trigger(x)) - f0(x)||: the triggered images' embeddings pulled "
                 "back to the original model's clean ones (mmsec extension; 0 = the paper)")
        tune_simulator: bool = Field(
            True, description="also tune away the simulator's perturbation (the one whose "
                              "prediction collapse identified the target; mmsec extension)")
        rounds: int = Field(3, ge=1, le=10, description="invert+tune rounds at most (paper: 1);"
                                                        " each later round inverts again on "
                                                        "the repaired model")
        min_tune_drop: float = Field(
            0.1, ge=0, le=1, description="a suspect's later round whose tuning lowers its "
                                         "inverted trigger's rate by less than this share "
                                         "(relative) is undone and ends that suspect's "
                                         "rounds: what tuning cannot move only costs accuracy"
                                         " (each suspect's first round is always kept); 0 = "
                                         "keep every round")
        stop_asr: float = Field(0.5, ge=0, le=1, description="a later round whose inverted "
                                                             "trigger reaches fewer clean images"
                                                             " than this ends the rounds")
        inversion: Literal["auto", "mask", "warp"] = Field(
            "auto", description="mask: mask + pattern (the paper); warp: also a learned smooth "
                                "flow field under them; auto: warp when a warp probe "
                                "identified the target")

        @field_validator("stages")
        @classmethod
        def _stages(cls, v: list[str]) -> list[str]:
            if not v:
                raise ValueError("at least one stage")
            order = ["identify", "invert", "tune"]
            return [s for s in order if s in v]

        @model_validator(mode="after")
        def _needs(self):
            if "tune" in self.stages and "invert" not in self.stages:
                raise ValueError("stage tune needs stage invert (its inverted trigger)")
            if "invert" in self.stages and "identify" not in self.stages and self.target is None:
                raise ValueError("stage invert needs stage identify or a target")
            return self

    # ------------------------------------------------------------------ apply
    def apply(self, model, data, run):
        o = self.options
        if not data.classnames:
            raise MmsecError("invertune: the clean data has no class names (zero-shot needed)")
        n = min(len(data), o.clean_items)
        idx = torch.randperm(len(data), generator=run.rng("clean_items"))[:n].tolist()
        x, y = load_images(data, idx)
        run.metrics["clean_items_used"] = float(n)
        head = model.zero_shot_head(data.classnames, data.templates).detach()
        names = list(data.classnames)
        true_target = _true_target(run.inputs.trigger, names)

        target = _parse_target(o.target, names) if o.target is not None else None
        suspects: list[_Suspect] = []
        if "identify" in o.stages:
            with run.timer("invertune_identify"):
                ranked, suspects = self.identify(model, data, idx, x, head, names, run,
                                                 true_target)
            if target is not None:  # ablation: the given target only
                top = suspects[0]
                suspects = [top if top.target == target else _Suspect(target, None, None)]
        else:
            suspects = [_Suspect(target, None, None)]
        if "invert" not in o.stages:
            return model
        kinds = ["warp" if o.inversion == "warp" or (o.inversion == "auto"
                                                     and sp.family == "warp") else "mask"
                 for sp in suspects]
        run.set("inversion", kinds[0])
        # the top class gets ``rounds``; then each other suspect its ``suspect_rounds``, one
        # class at a time (tuned together with the top class, each perturbation's share of a
        # step shrank and the top class's backdoor survived: zoo:shapes SIG, ASR 1.6% -> 7.6%)
        tune = "tune" in o.stages
        current, done = self._rounds(model, x, y, head, names, run, suspects[0], 0, kinds[0],
                                     o.rounds if tune else 1, tune=tune)
        run.metrics["rounds_done"] = float(done)
        tuned = 1
        for j, sp in enumerate(suspects[1:] if tune else [], start=1):
            current, done = self._rounds(current, x, y, head, names, run, sp, j, kinds[j],
                                         o.suspect_rounds, tune=True)
            tuned += done > 0
        run.metrics["suspects_tuned"] = float(tuned)
        return current

    def _rounds(self, model, x, y, head, names, run, sp, j: int, kind: str, rounds: int, *,
                tune: bool):
        """Up to ``rounds`` invert(+tune) rounds of suspect ``sp`` (``j``: its place, 0 for
        the top class); each later round inverts again on the repaired model, and a round
        whose inverted trigger reaches fewer than ``stop_asr`` of the clean images ends them
        (not the top class's first: it is tuned whatever it reaches); a later round whose
        tuning lowers its inverted trigger's rate by less than ``min_tune_drop`` is undone
        and ends them too (measured: the sinks' later rounds cost zoo:shapes SIG 1.1 CA
        points and stamps BadNets 1.6 for no ASR). Returns the model and the rounds kept."""
        o = self.options
        current, done = model, 0
        for r in range(rounds):
            tag = _round_tag(r) + _suspect_tag(j, sp.target)
            with run.timer(f"invertune_invert{tag}"):
                trig, inv_asr = self.invert(current, x, y, head, sp.target, names, run, r,
                                            warp=kind == "warp",
                                            init=sp.probe if r == 0 else None, tag=tag)
            if (j or r) and inv_asr < o.stop_asr:
                run.log.info("invertune: %r round %d: the inverted trigger reaches %.1f%% "
                             "(< %.0f%%): nothing left to tune", names[sp.target], r + 1,
                             100 * inv_asr, 100 * o.stop_asr)
                break
            if tune:
                with run.timer(f"invertune_tune{tag}"):
                    repaired, after = self.tune(current, x, trig, sp.target, head, run, r,
                                                extra=self._found_by(sp), tag=tag)
                kept = r == 0 or not after > (1 - o.min_tune_drop) * inv_asr
                run.metrics[f"round_kept{tag}"] = float(kept)
                if not kept:
                    run.log.info("invertune: %r round %d: the tuning left the inverted trigger "
                                 "at %.1f%% (from %.1f%%): round undone, no more rounds",
                                 names[sp.target], r + 1, 100 * after, 100 * inv_asr)
                    break
                current = repaired
            done += 1
        return current, done

    def _found_by(self, sp) -> list:
        """The perturbation that found suspect ``sp``, tuned away next to its inverted
        trigger (``tune_simulator``)."""
        if self.options.tune_simulator and sp.probe is not None:
            return [(sp.probe, sp.target)]
        return []

    # ------------------------------------------------------------------ stage 1
    def identify(self, model, data, idx, x, head, names, run, true_target):
        """Rank classes by how easily a universal change reaches them; returns the ranking
        and the suspects to invert and tune away (the top class first), each with the
        perturbation that found it (a function of pixels) and its trigger family (``None``
        for an untargeted simulator)."""
        o = self.options
        sim = o.simulator
        if sim == "auto":
            return self.identify_by_probes(model, x, head, names, run, true_target)
        if sim.endswith(".safetensors") or Path(sim).exists():
            artifact = Artifact.load(sim)
            attack = run.registry.attack_for(artifact)
            run.log.info("invertune: simulator artifact %s (plugin %s)", sim, artifact.plugin)
        else:
            opts = {**SIMULATOR_DEFAULTS.get(sim, {}), **o.simulator_options}
            fields = getattr(run.registry.attack(sim).Options, "model_fields", {})
            if "train_items" in fields:  # the simulator trains on the whole clean subset
                opts.setdefault("train_items", len(idx))
            if not run.registry.attack(sim).universal:
                raise UsageError(f"invertune: simulator {sim!r} is not a universal attack")
            run.log.info("invertune: fitting simulator %s on %d clean images", sim, len(idx))
            attack, fitted = run.fit_attack(sim, model, Subset(data, idx), opts,
                                            child="simulator")
            artifact = fitted.artifact
            artifact.save(run.artifacts_dir / "simulator.safetensors")  # reusable as FILE
        with torch.no_grad():
            clean = _predict(model, x, head)
            adv = torch.cat([_predict(model, attack.perturb(artifact, xb), head)
                             for xb in x.split(256)])
        c = len(names)
        share_clean = torch.bincount(clean, minlength=c).float() / len(clean)
        share_adv = torch.bincount(adv, minlength=c).float() / len(adv)
        rise = share_adv - share_clean
        ranked = torch.argsort(rise, descending=True, stable=True).tolist()
        rows = [{"rank": r + 1, "class": i, "name": names[i], "share_clean": float(share_clean[i]),
                 "share_adv": float(share_adv[i]), "rise": float(rise[i])}
                for r, i in enumerate(ranked)]
        write_atomic(run.artifacts_dir / "target_ranking.json", json.dumps(rows, indent=1))
        run.metrics["identified_target"] = float(ranked[0])
        run.metrics["target_rank_1_rise"] = float(rise[ranked[0]])
        run.metrics["simulator_fooling_rate"] = float((clean != adv).float().mean())
        run.set("identified_target_name", names[ranked[0]])
        known = _record_true_target(run, ranked, true_target, names)
        table = "\n".join(f"| {r['rank']} | {r['name']} | {r['share_clean']:.3f} | "
                          f"{r['share_adv']:.3f} | {r['rise']:+.3f} |" for r in rows)
        run.add_section("InverTune 1: target identification", (
            f"Simulator `{sim}` on {len(x)} clean images (fooling rate "
            f"{run.metrics['simulator_fooling_rate']:.1%}). Suspected target: "
            f"**{names[ranked[0]]}** (class {ranked[0]}).{known}\n\n"
            f"| rank | class | share clean | share attacked | rise |\n|---|---|---|---|---|\n"
            f"{table}\n"))
        return ranked, [_Suspect(ranked[0], lambda pixels: attack.perturb(artifact, pixels),
                                 None)]

    def identify_by_probes(self, model, x, head, names, run, true_target):
        """``simulator: auto``: a targeted probe of each family towards each candidate class
        (``probes.py``); a class's score is its lead over the other classes in its best
        family (``probes.leads``), the top class is the suspected target, and its lead is
        the confidence."""
        o = self.options
        h, w = x.shape[-2:]
        c = len(names)
        clean = _predict(model, x, head)
        candidates = list(range(c))
        if c > o.candidates:
            candidates = self.screen(model, x, clean, head, run)
        scores = torch.zeros(len(o.probe_families), c)
        best: dict[int, probes.ProbeResult] = {}
        trials: dict[tuple[str, int], probes.ProbeResult] = {}
        gen = run.rng("probes")
        total = len(candidates) * len(o.probe_families)
        with run.progress(total=total, desc="invertune target probes") as bar:
            for fi, fam in enumerate(o.probe_families):
                for k in candidates:
                    pool = x[clean != k]
                    if len(pool) < 4:
                        continue
                    cut = max(2, int(0.7 * len(pool)))
                    probe = self._probe(fam, h, w, gen)
                    res = probes.fit_probe(model, head, probe, k, pool[:cut], pool[cut:],
                                           steps=o.probe_steps, batch=o.probe_batch, gen=gen,
                                           temperature=o.temperature)
                    scores[fi, k] = res.rate
                    trials[fam, k] = res
                    bar.update(1)
        # each family's best class, by how far it leads the runner-up (log-odds): a
        # natural "sink" is easy to reach in every family but has near rivals, a backdoor
        # target is reached from nearly every image by its own family, far ahead of the rest
        cand = torch.tensor(candidates)
        lead = torch.full_like(scores, -math.inf)
        lead[:, cand] = probes.leads(scores[:, cand])
        score, fam_idx = lead.max(0)
        ranked = torch.argsort(score, descending=True, stable=True).tolist()
        top = ranked[0]
        z = float(score[top])
        for k in candidates:  # the perturbation of the family that scored the class
            fam = o.probe_families[int(fam_idx[k])]
            best[k] = trials.get((fam, k), best.get(k))
        fam_of = {k: best[k].family if best.get(k) is not None else "" for k in range(c)}
        probed = set(candidates)
        rows = [{"rank": r + 1, "class": i, "name": names[i],
                 "lead": float(score[i]) if i in probed else None, "family": fam_of[i],
                 **{f"rate_{f}": float(scores[j, i]) if i in probed else None
                    for j, f in enumerate(o.probe_families)}}
                for r, i in enumerate(ranked)]
        write_atomic(run.artifacts_dir / "target_ranking.json", json.dumps(rows, indent=1))
        run.metrics["identified_target"] = float(top)
        run.metrics["target_probe_rate"] = float(scores[fam_idx[top], top])
        run.metrics["target_lead"] = z
        run.metrics["target_lead_second"] = float(score[ranked[1]]) if c > 1 else 0.0
        confident = z >= o.min_confidence
        run.metrics["target_confident"] = float(confident)
        run.set("identified_target_name", names[top])
        run.set("identified_family", fam_of[top])
        known = _record_true_target(run, ranked, true_target, names)
        if not confident:
            run.log.warning("invertune: no class stands out (lead %.2f < %.2f): the model may "
                            "have no backdoor, or one of a family not probed; tuning the "
                            "top class %r anyway", z, o.min_confidence, names[top])
        fams = ", ".join(o.probe_families)
        table = "\n".join(
            f"| {r['rank']} | {r['name']} | "
            + " | ".join(f"{r[f'rate_{f}']:.3f}" for f in o.probe_families)
            + f" | {r['lead']:+.2f} | {r['family']} |" for r in rows if r["lead"] is not None)
        run.add_section("InverTune 1: target identification", (
            f"Targeted probes ({fams}; {o.probe_steps} steps of {o.probe_batch} images) "
            f"towards each of {len(candidates)} classes on {len(x)} clean images; a class's "
            f"score is its lead in its best family: its log-odds of success on held-out "
            f"images minus the best other class's (negative: how far behind). Suspected "
            f"target: **{names[top]}** (class {top}, {fam_of[top]} probe, lead {z:+.2f}"
            f"; next {float(score[ranked[1]]) if c > 1 else 0:+.2f}; "
            f"{'confident' if confident else 'NOT confident'} at {o.min_confidence:g})."
            f"{known}\n\n| rank | class | " + " | ".join(o.probe_families)
            + " | lead | family |\n|---|---|" + "---|" * (len(o.probe_families) + 2)
            + f"\n{table}\n"))
        found = best.get(top)
        if found is not None and found.family == "patch":
            run.save_image("probe-patch", _on_grey(found, h, w), scale=8, report=True)
        suspects = [_Suspect(top, found, fam_of[top] or None)]
        # the other families' leaders, strongest first: a natural sink (reached from nearly
        # every image by a patch or a full-image pattern on a small model) can lead its
        # family by more than the target leads its own
        others = []
        for fi, fam in enumerate(o.probe_families):
            k = int(lead[fi].argmax())
            v = float(lead[fi, k])
            if k != top and v >= o.suspect_lead and (fam, k) in trials:
                others.append((v, k, fam))
        for _v, k, fam in sorted(others, key=lambda t: -t[0]):
            if len(suspects) < o.suspects and k not in [sp.target for sp in suspects]:
                suspects.append(_Suspect(k, trials[fam, k], fam))
        run.set("suspects", [names[sp.target] for sp in suspects])
        run.metrics["suspect_count"] = float(len(suspects))
        if true_target is not None:
            run.metrics["true_target_suspected"] = float(
                true_target in [sp.target for sp in suspects])
        if len(suspects) > 1:
            run.add_section("InverTune 1b: suspects", (
                "Inverted and tuned away (each family's leader at least "
                f"{o.suspect_lead:g} ahead of its runner-up, up to {o.suspects}): "
                + ", ".join(f"`{names[sp.target]}` ({sp.family})" for sp in suspects)
                + ". A later suspect whose inverted trigger reaches fewer than "
                f"{o.stop_asr:.0%} of the clean images is dropped.\n"))
        return ranked, suspects

    def _probe(self, family: str, h: int, w: int, gen: torch.Generator,
               starts: int | None = None) -> nn.Module:
        o = self.options
        if family == "patch":
            return probes.PatchProbe(h, w, o.probe_patch_side, o.probe_patch_grid, gen,
                                    starts or o.probe_patch_starts)
        if family == "additive":
            return probes.AdditiveProbe(h, w, o.probe_eps)
        return probes.WarpProbe(h, w, o.probe_warp_grid, o.probe_warp_strength, gen)

    def screen(self, model, x, clean, head, run) -> list[int]:
        """More classes than ``candidates``: keep those untargeted probes of each family
        drift to most (their rise in prediction share), best first, round-robin."""
        o = self.options
        h, w = x.shape[-2:]
        c = head.shape[0]
        gen = run.rng("screen")
        share = torch.bincount(clean, minlength=c).float() / len(clean)
        lists = []
        for fam in o.probe_families:
            probe = self._probe(fam, h, w, gen, starts=1)  # untargeted: no halving
            if isinstance(probe, probes.PatchProbe):
                probe.place = None
            probes.fit_probe(model, head, probe, None, x, x[:0], steps=o.probe_steps,
                             batch=o.probe_batch, gen=gen, clean=clean)
            if isinstance(probe, probes.PatchProbe):
                probe.place = None
            with torch.no_grad():
                adv = _predict(model, torch.cat([probe(b.to(model.device)).cpu()
                                                 for b in x.split(256)]), head)
            rise = torch.bincount(adv, minlength=c).float() / len(adv) - share
            lists.append(torch.argsort(rise, descending=True, stable=True).tolist())
        out: list[int] = []
        for i in range(c):
            for lst in lists:
                if lst[i] not in out:
                    out.append(lst[i])
        return out[:o.candidates]

    # ------------------------------------------------------------------ stage 2
    def invert(self, model, x, y, head, target: int, names, run, rnd: int = 0, *,
               warp: bool = False, init=None, tag: str | None = None):
        """Learn mask and pattern (and with ``warp`` a smooth flow field under them) that
        send non-target images to ``target``; returns the inverted trigger (a function of
        the pixels) and the share of non-target clean images it sends to the target.

        ``init``: the patch or warp probe that identified the target starts the search where
        it found the backdoor (its place and pattern, or its flow field).

        ``rnd`` is the round (0-based; keys of later rounds end in ``_r2``, ``_r3``, ...);
        ``tag`` overrides that suffix (later suspects add ``_c<class>``).
        Each round's inversion has its own checkpoint slot, so a resumed run continues it (or
        reuses it when it had finished).
        """
        o = self.options
        others = x[y != target]
        if len(others) == 0:
            raise MmsecError("invertune: no clean non-target images to invert the trigger on")
        device = model.device
        tag = _round_tag(rnd) if tag is None else tag
        tgt_imgs = x[y == target]
        with torch.no_grad():
            if len(tgt_imgs):
                tgt_emb = F.normalize(torch.cat([model.encode_image(b.to(device))
                                                 for b in tgt_imgs.split(256)]).mean(0), dim=-1)
            else:  # no target image in the clean set: its text embedding
                tgt_emb = head[target]
        h, w = x.shape[-2:]
        trig = _Trigger(h, w, o.mask_init, run.rng(f"pattern{tag}"),
                        warp=(o.probe_warp_grid, o.probe_warp_strength) if warp else None)
        trig.start_from(getattr(init, "probe", None))
        trig = trig.to(device)
        n, bs = len(others), min(o.invert_batch, len(others))
        steps_per_epoch = max(1, math.ceil(n / bs))
        label = torch.full((bs,), target, device=device, dtype=torch.long)

        def batches(epoch: int):
            perm = torch.randperm(n, generator=run.rng(f"invert{tag}.epoch{epoch}"))
            for b in range(steps_per_epoch):
                yield others[perm[b * bs:(b + 1) * bs]].to(device)

        def step(xb, _ctx):
            trig.project()
            m, _ = trig()
            xp = trig.apply(xb)
            emb = model.encode_image(xp)
            ce = F.cross_entropy(emb @ head.t() / o.temperature, label[:len(xb)])
            pull = (emb - tgt_emb).norm(dim=-1).mean()
            sim = 1 - ssim(xp, xb)
            l1 = m.sum()
            loss = o.w_ce * ce + o.w_embed * pull + o.w_ssim * sim + o.w_mask * l1
            return {"loss": loss, "ce": ce.detach(), "pull": pull.detach(),
                    "one_minus_ssim": sim.detach(), "mask_l1": l1.detach()}

        out = train(step, Batches(batches, steps_per_epoch),
                    Optim(trig, kind="adam", lr=o.invert_lr, schedule="constant"),
                    epochs=o.invert_epochs, steps=o.invert_steps,
                    min_steps=o.invert_min_steps, run=run, slot=f"invert{tag}",
                    desc=f"invertune trigger inversion{tag}")
        trig.project()
        frozen = copy.deepcopy(trig).requires_grad_(False)
        with torch.no_grad():
            mask, pattern = (v.detach().clone() for v in trig())
            preds = torch.cat([_predict(model, frozen.apply(b.to(device)), head)
                               for b in others.split(256)])
        last = out.history[-1] if out.history else {}
        inv_asr = float((preds == target).float().mean())
        run.metrics.update({f"inversion_{k}{tag}": float(v) for k, v in last.items()
                            if k != "epoch"})
        run.metrics[f"inverted_asr{tag}"] = inv_asr
        run.metrics[f"inverted_mask_l1{tag}"] = float(mask.sum())
        mask_c, pattern_c = mask[0].expand(3, -1, -1).cpu(), pattern[0].cpu()
        saved = {"mask": mask[0].cpu(), "pattern": pattern_c}
        if frozen.warp is not None:
            saved["flow"] = frozen.warp.flow()[0].cpu()
            run.metrics[f"inverted_warp_mean_displacement{tag}"] = frozen.warp_displacement()
        run.save_tensors(f"inverted_trigger{tag}", saved,
                         metadata={"target": str(target), "target_name": names[target],
                                   "plugin": "invertune"})
        img = tag.replace("_", "-")
        run.save_image(f"inverted-mask{img}", mask_c, scale=8, report=True)
        run.save_image(f"inverted-pattern{img}", pattern_c, scale=8, report=True)
        grey = torch.full_like(pattern_c, 0.5)
        run.save_image(f"inverted-trigger{img}", mask_c * pattern_c + (1 - mask_c) * grey,
                       scale=8, report=True)
        real = _real_trigger_preview(run, h, w) if not tag else None
        if real is not None:
            run.save_image("real-trigger", real, scale=8, report=True)
        title = ("InverTune 2: trigger inversion" + (f" (round {rnd + 1})" if rnd else "")
                 + (f", suspect `{names[target]}`" if "_c" in tag else ""))
        run.add_section(title, (
            f"Target `{names[target]}`; {o.invert_epochs} epochs of {steps_per_epoch} steps on "
            f"{n} non-target clean images. Last epoch: "
            + ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k != "epoch")
            + f". The inverted trigger sends {inv_asr:.1%} of them to the target; mask L1 "
            f"{float(mask.sum()):.1f} px. Images: `inverted-mask.png`, `inverted-pattern.png`, "
            f"`inverted-trigger.png` (on grey)"
            + (f"; under them a learned warp, mean displacement "
               f"{frozen.warp_displacement():.2%} of the side" if frozen.warp is not None else "")
            + (", `real-trigger.png` (the real trigger on grey, for comparison only)."
               if real is not None else ".") + "\n"))
        return frozen.apply, inv_asr

    # ------------------------------------------------------------------ stage 3
    def tune(self, model, x, trigger, target: int, head, run, rnd: int = 0, *, extra=(),
             tag: str | None = None):
        """Fine-tune a copy's image tower so the inverted ``trigger`` (a function of the
        pixels) towards ``target`` and the ``extra`` perturbations (the probe or simulator
        that found the suspect, as ``(function, target)`` pairs) no longer move the critical
        neurons of the most shifted stages, while clean embeddings stay where they were.
        Returns the repaired copy and the share of clean non-target images the trigger still
        sends to the target through it (``inverted_asr_after_tune``)."""
        o = self.options
        poisons = [trigger] + [p for p, _ in extra]
        device = model.device
        tag = _round_tag(rnd) if tag is None else tag
        repaired = copy.deepcopy(model)
        layers = model.layer_names()
        probe = x[:min(len(x), 256)].to(device)
        with torch.no_grad():
            _, a = model.forward_features(probe, layers, pooled=False)
            aps = [model.forward_features(p(probe), layers, pooled=False)[1] for p in poisons]
            # relative shift per stage, averaged over the trigger and the probe
            shift = {n: sum(float(((a[n] - ap[n]).flatten(1).norm(dim=1)
                                   / a[n].flatten(1).norm(dim=1).clamp_min(1e-8)).mean())
                            for ap in aps) / len(aps) for n in layers}
            chosen = sorted(layers, key=lambda n: -shift[n])[:o.top_layers]
            masks = {}  # (trigger, stage) -> critical neurons
            for i, ap in enumerate(aps):
                for n in chosen:
                    elem = (a[n] - ap[n]).abs().mean(0).flatten()  # element-wise shift
                    # every neuron trains the split (a few thousand 1-D points: cheap)
                    cent, assign = kmeans(elem[:, None], 2, seed=run.seed,
                                          max_points_per_centroid=None)
                    hi = int(cent[:, 0].argmax())
                    masks[i, n] = (assign == hi).float().view(a[n].shape[1:]).to(device)
            orig = torch.cat([model.encode_image(b.to(device)) for b in x.split(256)])
        run.metrics.update({f"shift_{n}{tag}": v for n, v in shift.items()})
        run.metrics.update({f"critical_share_{n}{tag}": float(masks[0, n].mean())
                            for n in chosen})
        run.set(f"tuned_layers{tag}", chosen)
        run.metrics[f"tuned_layer_count{tag}"] = float(len(chosen))

        visual = repaired.clip.visual
        n = len(x)
        bs = min(o.tune_batch, n)
        steps_per_epoch = min(o.tune_steps, 50)

        def batches(epoch: int):
            g = run.rng(f"tune{tag}.epoch{epoch}")
            for _ in range(steps_per_epoch):
                sel = torch.randint(0, n, (bs,), generator=g)
                yield x[sel].to(device), orig[sel.to(orig.device)]

        def step(batch, _ctx):
            xb, ob = batch
            # the tower stays in eval mode: triggered images must not shift batch-norm statistics
            emb, acts = repaired.forward_features(
                torch.cat([xb, *(p(xb) for p in poisons)]), chosen, pooled=False)
            act_loss = 0.0
            for name in chosen:
                ac, *ats = acts[name].split(len(xb))
                for i, at in enumerate(ats):
                    mk = masks[i, name]
                    # norms over the whole batch: a per-image ratio explodes on images whose
                    # critical neurons are silent (ReLU zeros) and drowns the other terms
                    act_loss = act_loss + ((mk * (ac - at)).norm()
                                           / (mk * ac).norm().clamp_min(1e-6))
            keep = (emb[:len(xb)] - ob).norm(dim=-1).mean()
            loss = act_loss + o.w_preserve * keep
            out = {"act": act_loss.detach(), "preserve": keep.detach()}
            if o.w_invariance:  # a triggered image's embedding back to its clean one
                inv = (emb[len(xb):].view(len(poisons), len(xb), -1) - ob).norm(dim=-1).mean()
                loss = loss + o.w_invariance * inv
                out["invariance"] = inv.detach()
            return {"loss": loss, **out}

        out = train(step, Batches(batches, steps_per_epoch),
                    Optim(visual, kind="adamw", lr=o.tune_lr, weight_decay=o.tune_weight_decay,
                          schedule="cosine", grad_clip=o.grad_clip),
                    steps=o.tune_steps, run=run, slot=f"tune{tag}",
                    desc=f"invertune activation tuning{tag}")
        repaired.eval()
        hist = out.history
        m = {"tune_steps_done": float(out.steps)}
        if hist:
            m["tune_act_loss_first"] = float(hist[0].get("act", 0))
            m["tune_act_loss_last"] = float(hist[-1].get("act", 0))
            m["tune_preserve_last"] = float(hist[-1].get("preserve", 0))
            if "invariance" in hist[-1]:
                m["tune_invariance_last"] = float(hist[-1]["invariance"])
        with torch.no_grad():
            sample = x[:512].to(device)
            before = _predict(model, sample, head).to(device)

            def rate(p, target):
                keep = sample[before != target]
                return (float((_predict(repaired, p(keep), head) == target).float().mean())
                        if len(keep) else float("nan"))

            sims = [rate(p, t) for p, t in extra]
            m["inverted_asr_after_tune"] = rate(trigger, target)
            if sims:
                m["simulator_target_rate_after_tune"] = sims[0]
        run.metrics.update({k + tag: v for k, v in m.items()})
        rows = "\n".join(f"| {n} | {shift[n]:.4f} | {'yes' if n in chosen else ''} | "
                         f"{(f'{float(masks[0, n].mean()):.1%}' if n in chosen else '')} |"
                         for n in layers)
        title = ("InverTune 3: clustering-guided activation tuning"
                 + (f" (round {rnd + 1})" if rnd else "")
                 + (f", suspect class {target}" if "_c" in tag else ""))
        run.add_section(title, (
            f"{out.steps} AdamW steps (lr {o.tune_lr:g}, wd {o.tune_weight_decay:g}, cosine, "
            f"clip {o.grad_clip:g}) of {bs} clean images on the image tower. Activation loss "
            f"{m.get('tune_act_loss_first', float('nan')):.4f} -> "
            f"{m.get('tune_act_loss_last', float('nan')):.4f}; target rate after tuning "
            f"(clean non-target images): inverted trigger {m['inverted_asr_after_tune']:.1%}"
            + (f", probes/simulator {', '.join(f'{v:.1%}' for v in sims)}" if sims else "")
            + ".\n\n"
            f"| stage | relative shift | tuned | critical neurons |\n|---|---|---|---|\n{rows}\n"))
        return repaired, m["inverted_asr_after_tune"]


class _Trigger(nn.Module):
    """Mask ``[1, 1, H, W]`` and pattern ``[1, 3, H, W]`` as free parameters kept in [0, 1],
    and optionally a smooth warp under them: ``x' = m*t + (1-m)*warp(x)``.

    Direct parameters (projected back into [0, 1] before every step) rather than sigmoids of
    logits: with Adam at lr 0.01 a logit moves ~0.01 per step, so 150 steps could not open a
    mask from 0.1; a direct value can cross the whole range. The warp is a
    :class:`probes.WarpProbe` (a low-resolution offset lattice, upsampled: smooth by
    construction, bounded displacement); mask and pattern cannot express a warp (WaNet).
    """

    def __init__(self, h: int, w: int, mask_init: float, gen: torch.Generator,
                 warp: tuple[int, float] | None = None) -> None:
        super().__init__()
        self.mask = nn.Parameter(torch.full((1, 1, h, w), float(mask_init)))
        self.pattern = nn.Parameter(torch.rand(1, 3, h, w, generator=gen))
        self.warp = probes.WarpProbe(h, w, warp[0], warp[1], gen) if warp else None
        if self.warp is not None:  # the warp alone first: an open mask would mask it out
            with torch.no_grad():
                self.mask.fill_(min(float(mask_init), 0.01))

    def start_from(self, probe: nn.Module | None) -> None:
        """Start where a probe found the backdoor: a patch probe's place and pattern (mask
        0.9 there), or a warp probe's flow field (when this trigger has a warp)."""
        with torch.no_grad():
            if isinstance(probe, probes.PatchProbe) and probe.place is not None:
                t, left = probe.places[probe.place]
                s = probe.s
                self.mask[..., t:t + s, left:left + s] = 0.9
                self.pattern[..., t:t + s, left:left + s] = probe.patterns[probe.place].cpu()
            elif isinstance(probe, probes.WarpProbe) and self.warp is not None:
                self.warp.offsets.copy_(probe.offsets.detach().cpu())

    def project(self) -> None:
        with torch.no_grad():
            self.mask.clamp_(0, 1)
            self.pattern.clamp_(0, 1)
        if self.warp is not None:
            self.warp.project()

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mask, self.pattern

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        base = self.warp(x) if self.warp is not None else x
        return self.mask * self.pattern + (1 - self.mask) * base

    def warp_displacement(self) -> float:
        """Mean displacement of the warp, as a share of the image side."""
        if self.warp is None:
            return 0.0
        with torch.no_grad():
            off = F.interpolate(torch.tanh(self.warp.offsets), size=(self.warp.h, self.warp.w),
                                mode="bicubic", align_corners=True)
            return float(self.warp.strength * off.norm(dim=1).mean())


def _on_grey(perturb, h: int, w: int) -> torch.Tensor:
    """A perturbation applied to a mid-grey image ``[3, H, W]`` (for the report)."""
    return perturb(torch.full((1, 3, h, w), 0.5))[0].detach().cpu().clamp(0, 1)


class _Suspect:
    """A class to invert and tune away: ``probe`` is the perturbation that found it (a
    function of pixels, or ``None``), ``family`` its trigger family (``None``: unknown)."""

    def __init__(self, target: int, probe, family: str | None) -> None:
        self.target, self.probe, self.family = target, probe, family


def _suspect_tag(j: int, target: int) -> str:
    """Suffix of a later suspect's keys and files (``_c<class>``); the top class has none."""
    return "" if j == 0 else f"_c{target}"


def _round_tag(rnd: int) -> str:
    """Suffix of a round's metric keys and files: ``""`` for the first, then ``_r2``, ..."""
    return "" if rnd == 0 else f"_r{rnd + 1}"


def _predict(model, pixels: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    return (model.encode_image(pixels.to(model.device)) @ head.t()).argmax(1).cpu()


def _parse_target(spec: str, names: list[str]) -> int:
    lower = [n.lower() for n in names]
    if spec.lower() in lower:
        return lower.index(spec.lower())
    if spec.isdigit() and int(spec) < len(names):
        return int(spec)
    raise UsageError(f"invertune: unknown target {spec!r} (classes: {', '.join(names)})")


def _true_target(spec: Artifact | None, names: list[str]) -> int | None:
    """The real target when the run was given the trigger spec (for the report only)."""
    if spec is None:
        return None
    meta = spec.meta
    if meta.get("target_name") in names:
        return names.index(meta["target_name"])
    t = meta.get("target")
    return int(t) if isinstance(t, int) and 0 <= t < len(names) else None


def _real_trigger_preview(run, h: int, w: int) -> torch.Tensor | None:
    """The real trigger on a grey image, when the run knows it (report only)."""
    spec = run.inputs.trigger
    if spec is None:
        return None
    attack = run.registry.attack_for(spec)
    return attack.perturb(spec, torch.full((1, 3, h, w), 0.5))[0].clamp(0, 1)


def _record_true_target(run, ranked: list[int], true_target: int | None, names) -> str:
    """Where the real target (known to the run from its trigger spec, never used by the
    defense) ranked: metrics ``true_target_rank`` / ``target_identified`` and a sentence for
    the report ("" when the run does not know it)."""
    if true_target is None:
        return ""
    rank = ranked.index(true_target) + 1
    run.metrics["true_target_rank"] = float(rank)
    run.metrics["target_identified"] = float(rank == 1)
    return (f" The real target (from the trigger spec the run knows; not used by the "
            f"defense) is `{names[true_target]}`, ranked {rank}.")
