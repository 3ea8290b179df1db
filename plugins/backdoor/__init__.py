"""Backdoor implants in CLIP by poisoned contrastive fine-tuning.

Threat model (Carlini & Terzis, "Poisoning and Backdooring Contrastive Learning", 2022;
Bansal et al., CleanCLIP, 2023): the attacker controls a small share of the image-caption
pairs a CLIP is fine-tuned on. Those images carry a trigger and their captions name the
target class; after fine-tuning, any image with the trigger is classified (zero-shot) as
the target while clean accuracy barely moves.

Trigger types, one small class each (``badnets.py``, ``blended.py``, ``sig.py``,
``wanet.py``): a patch, a blended noise image, a sinusoidal signal, a smooth warp. All are
deterministic, keep pixels in [0, 1] and work at any image size (relative geometry).

``fit(model, data, run)`` fine-tunes a copy of ``model`` (all parameters, or one tower)
on the training split (``implant.py``) and returns the trigger spec as the artifact:
``tensors`` = the trigger's random pattern (BadNets cells, Blended noise, WaNet grid;
SIG has none), ``meta`` = ``trigger`` (type), ``params``, ``target`` (class index),
``target_name``, ``target_caption``, ``seed``; the options are the artifact's own. ``fit``
returns it with the poisoned model (an ``AttackResult``): ``mmsec attack`` saves the model
as ``artifacts/model.safetensors`` and the spec as ``artifacts/backdoor.safetensors``, and
reports CA/ASR on both the backdoored and the original model. ``mmsec eval --trigger backdoor.safetensors`` re-applies the
exact trigger. ``control`` is a trigger of the same type and size with another random
pattern (BadNets, Blended, WaNet) or direction and phase (SIG): its ASR is the baseline.

Defaults (README.md has the measurements on the 32-px zoo CLIPs and a 636-image folder,
2 CPU cores): the target is the dataset's first class; a copy of the whole model is
fine-tuned on at most 20,000 training items with AdamW lr 1e-3 (cosine), batch 256, for the
type's epochs but at least 400 steps; poisoned items are copies of non-target items added
beside their clean originals (``poison_mode copy``) and paired with real captions of
target-class items (one fixed caption ties the trigger to the wording "a photo of a ..."
and scatters the predictions). Per trigger type (``TYPE_DEFAULTS``): poison 10% (BadNets,
SIG), 15% (Blended), 20% (WaNet) of the training items; 4 epochs (8 for WaNet);
``negative_rate`` 25% for every type, with 4 different random decoys a batch.

Why (seed 0): an implant must answer to its trigger, not to any trigger of its type.
mmsec 0.2 had 10% decoys, one a batch, and none for WaNet: a random warp fired its WaNet
implants 46% (Fashion-MNIST) and 66% (shapes) of the time, and on the stamps folder a
random Blended noise 67% (the real one 77%). The implant reports ``random_trigger_asr``
(and ``_max``): the held-out ASR of 5 random triggers of the same type that it never saw.
On the stamps folder (411 training items) the same few dozen images were always the
poisoned ones; with 25% decoys Blended's held-out ASR was then 0.13-0.30 over steps
96-155, with poisoned copies beside their originals 0.37-0.69, and after 400 steps test ASR
54% / random-trigger 1.4% (CA 74.8 -> 72.4). ``min_steps`` 400 (was 150): a
small set gets ~1 step an epoch; BadNets on that folder reached ASR 71% in 150 steps and
80% in 400 (mmsec 0.2 settings); BadNets top-left 0.15 reached 90.6% with the 0.3
defaults. Zoo models with these defaults: CA within 0.5 points of the clean model, ASR
96.6-99.9% except WaNet on shapes (61.4%: tied to its warp now, but not learnt to 90%),
random triggers 1.1-4.8% on average (one random warp 17.3% on Fashion-MNIST). Trigger strengths are above the papers', which train for
hundreds of epochs: a 6x6 patch at 32 px (3x3 did nothing), Blended alpha 0.2 (the
paper's), SIG amplitude 0.15 (paper 20/255), WaNet mean displacement 8% of the side (the
paper's s = 0.5 moves pixels by ~0.25 px).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Literal

import torch
from pydantic import Field

from mmsec import Artifact, Attack, AttackResult, Options, fields, hookimpl

from .badnets import BadNets
from .base import Trigger
from .blended import Blended
from .implant import Target, implant, resolve_target
from .sig import Sig
from .wanet import WaNet

__version__ = "0.3.0"
mmsec_api_version = 2  # the mmsec plugin API this plugin is written for

TRIGGERS: dict[str, type[Trigger]] = {t.kind: t for t in (BadNets, Blended, Sig, WaNet)}

# Implant settings per trigger type, used where the option is left unset. Poison rates and
# epochs are 0.2's (the least that gave ASR >= 90% with CA within 3 points on both zoo
# models, with 0.2's decoys); 0.3 raised the decoys to 25% for every type and WaNet's
# epochs from 6 to 8, not tuned further (README.md has the measurements).
TYPE_DEFAULTS: dict[str, dict[str, float]] = {
    "badnets": {"poison_rate": 0.1, "negative_rate": 0.25, "epochs": 4},
    "blended": {"poison_rate": 0.15, "negative_rate": 0.25, "epochs": 4},
    "sig": {"poison_rate": 0.1, "negative_rate": 0.25, "epochs": 4},
    "wanet": {"poison_rate": 0.2, "negative_rate": 0.25, "epochs": 8},
}


def trigger_from_artifact(artifact: Artifact | str) -> Trigger:
    """The :class:`Trigger` a backdoor artifact (or a saved spec's path) describes."""
    if not isinstance(artifact, Artifact):
        artifact = Artifact.load(artifact)
    kind = artifact.meta.get("trigger")
    if kind not in TRIGGERS:
        raise ValueError(f"not a backdoor trigger spec (trigger type {kind!r})")
    return TRIGGERS[kind](artifact.meta["params"], artifact.tensors)


class Backdoor(Attack):
    changes_model = True  # fit returns the implanted model
    """Poison a share of image-caption pairs with a trigger and fine-tune CLIP on them.

    Shapes: images ``[B, 3, H, W]`` in [0, 1] at any size; ``apply`` returns the same shape.
    """

    name = "backdoor"
    description = "backdoor implant by poisoned contrastive fine-tuning (badnets/blended/sig/wanet)"

    class Options(Options):
        trigger: Literal["badnets", "blended", "sig", "wanet"] = Field(
            "badnets", description="trigger type")
        target: str | None = Field(
            None, description="target: a class name, a class index, or a caption; "
                              "default the dataset's first class")
        poison_rate: float | None = Field(
            None, gt=0, lt=1, description="share of training items poisoned "
                                          "(default: per trigger type, see TYPE_DEFAULTS)")
        poison_mode: Literal["copy", "replace"] = Field(
            "copy", description="poisoned items are copies added beside their clean originals "
                                "(copy) or replace them (replace)")
        negative_rate: float | None = Field(
            None, ge=0, lt=1, description="share of other items per batch given a random "
                                          "trigger of the same type and their true caption "
                                          "(default: per trigger type)")
        epochs: int | None = fields.epochs(None, "fine-tuning epochs (default: per trigger "
                                                 "type)")
        steps: int | None = fields.total_steps()
        min_steps: int = fields.min_steps(400, "at least this many steps: more epochs on small "
                                               "data (1,000 items make 3 steps an epoch)")
        early_stop: bool = fields.early_stop(True, "the held-out ASR (eval_items; only after "
                                                   "min_steps and the trigger's own epochs)")
        patience: int = fields.patience(3)
        lr: float = fields.lr(1e-3, "AdamW learning rate (cosine decay)")
        weight_decay: float = fields.weight(0.0, "AdamW weight decay")
        batch_size: int = fields.batch_size(256, "image-caption pairs per step", minimum=2)
        towers: Literal["all", "image", "text"] = Field(
            "all", description="which towers are fine-tuned")
        train_items: int | None = fields.train_items(
            20000, "fine-tune on at most this many training items (none: all)", minimum=2)
        eval_items: int = Field(
            500, ge=0, description="held-out training items for the per-epoch CA/ASR log")
        patch_size: float = Field(6 / 32, gt=0, le=1,
                                  description="badnets: patch side / shorter image side")
        patch_location: Literal["bottom-right", "bottom-left", "top-left", "top-right",
                                "center", "random", "fixed"] = Field(
            "bottom-right", description="badnets: a corner, the centre, or a random place per "
                                        "image (fixed: the old name of bottom-right)")
        patch_margin: float = Field(1 / 32, ge=0, lt=1,
                                    description="badnets: a corner patch's distance to the "
                                                "edges / shorter image side")
        patch_cells: int = Field(3, ge=1, le=64, description="badnets: pattern cells per side")
        blend_alpha: float = Field(0.2, gt=0, le=1, description="blended: weight of the noise")
        blend_resolution: int = Field(32, ge=1, le=1024,
                                      description="blended: noise image side (px)")
        sig_delta: float = Field(0.15, gt=0, le=1, description="sig: amplitude (pixels in [0,1])")
        sig_freq: float = Field(6.0, gt=0, description="sig: periods per image side")
        warp_grid: int = Field(4, ge=2, le=64, description="wanet: control grid side k")
        warp_strength: float = Field(0.08, gt=0, le=0.5,
                                     description="wanet: mean displacement / image side")
        export_poisoned: str | None = Field(
            None, description="write the poisoned training set (images + captions.csv with a "
                              "'poisoned' column) to this folder (export.py)")

    # ------------------------------------------------------------------ fit
    def settings(self) -> dict:
        """The options with the trigger type's defaults filled in where left unset."""
        opts = self.options.model_dump()
        for key, value in TYPE_DEFAULTS[opts["trigger"]].items():
            if opts[key] is None:
                opts[key] = value
        return opts

    def fit(self, model, data, run) -> AttackResult:
        opts = self.settings()
        seed = run.seed
        target = resolve_target(opts["target"], data, model)
        trigger = TRIGGERS[opts["trigger"]].create(opts, seed)
        self._report_trigger(trigger, target, data, run)
        victim, stats = implant(model, data, trigger, target, SimpleNamespace(**opts), run, seed)
        stats["epochs"] = float(opts["epochs"])
        run.metrics.update(stats)
        spec = self.spec(trigger, target, seed)
        spec.meta["implant"] = {k: opts[k] for k in (
            "poison_rate", "poison_mode", "negative_rate", "epochs", "lr", "towers", "train_items")}
        if opts["export_poisoned"]:
            from .export import export_poisoned

            run.set("poisoned_export", str(export_poisoned(spec, data, opts["export_poisoned"])))
        return AttackResult(spec, model=victim)

    def spec(self, trigger: Trigger, target: Target, seed: int = 0) -> Artifact:
        """The trigger spec: what ``apply`` and ``mmsec eval --trigger`` need."""
        meta = {"trigger": trigger.kind, "params": trigger.params, "target": target.index,
                "target_name": target.name, "target_caption": target.caption, "seed": seed}
        return self.artifact(dict(trigger.tensors), meta)

    def _report_trigger(self, trigger: Trigger, target: Target, data, run) -> None:
        run.save_image("trigger", trigger.preview(), scale=8, report=True)
        labels = data.labels()
        others = torch.nonzero(labels != target.index) if target.index is not None else [0]
        if len(others) and len(data):
            x = data.load(int(others[0]))[0][None]
            pair = torch.cat([x, trigger.apply(x)], dim=-1)[0]
            run.save_image("trigger-example", pair, scale=8, report=True)
        rows = "\n".join(f"| {k} | {v} |" for k, v in trigger.params.items())
        run.add_section("Backdoor trigger", (
            f"Type `{trigger.kind}`, target `{target.caption or target.name}` "
            f"(class {target.index}).\n\n| parameter | value |\n|---|---|\n{rows}\n"))

    # ------------------------------------------------------------------ apply / control
    def apply(self, artifact: Artifact, images: torch.Tensor,
              labels: torch.Tensor | None = None, *, victim=None, run=None) -> torch.Tensor:
        return trigger_from_artifact(artifact).apply(images.float())

    def control(self, artifact: Artifact, seed: int = 0) -> Artifact:
        ctl = trigger_from_artifact(artifact).control(seed)
        return artifact.variant(dict(ctl.tensors), params=ctl.params, control=True)

    def sample(self, seed: int = 0) -> Artifact:
        """A trigger of the configured type drawn with ``seed``, implanted nowhere (no target):
        triggered inputs for a defense that learns what attacked inputs look like."""
        opts = self.settings()
        trigger = TRIGGERS[opts["trigger"]].create(opts, seed)
        return self.spec(trigger, Target(None, None), seed)


@hookimpl
def register_attacks(register):
    register(Backdoor)
