"""GRACE for CLIP: layer-wise latent geometry that detects attacked inputs and restores
their embeddings (after "ALKALI ... GRACE ... AVQI", 2025, written for LLM alignment; this
adaptation to CLIP is mmsec's own, documented in docs/grace.md).

1. **Attacked inputs from the registered attack plugins**, never hard-coded: each family is
   a plugin name (``advclip``, ``uap``, ``pgd``, ``cpgc``), ``plugin:key=value,...`` (e.g.
   ``backdoor:trigger=sig``) or a saved artifact FILE. Universal attacks are fitted in a
   child run on the training part of the clean items (short schedules, ``FAMILY_DEFAULTS``);
   an attack that can draw an instance without fitting (``Attack.sample``: a backdoor's
   random trigger) is drawn; per-image attacks (PGD) run on each image.
2. **Layer-wise latent**: every image layer's pooled activation (ResNet stages, ViT blocks;
   ``ClipModel.forward_features``) is standardised with clean statistics, projected to
   ``dim`` and normalised; a learned softmax over layers (the attention profile) mixes them
   into the latent ``z``. The base model stays frozen; only this head trains.
3. **Losses**: (a) separation: clean ``z`` towards one prototype, attacked towards the
   other (a logistic loss on the prototype logit); (b) cohesion: every training family's
   latents pulled to one shared attacked centre (family means and items); (c) restoration:
   a gated MLP (gate = the detector's probability) moves an attacked image's embedding back
   to its clean one, while clean embeddings are kept (``w_keep``).
4. **Outputs**: the detector (``artifacts/grace-detector.safetensors``: threshold at
   ``fpr`` on held-out clean items; ``mmsec eval --detector FILE``), the hardened model (an
   :class:`mmsec.AdaptedModel`: the frozen model with the restorer), the attention profile
   (a plot in the report), per family AUROC / TPR, AVQI before (the model's own embedding
   and layers) and after (GRACE's latent), top-1 attacked -> restored, and an adaptive PGD
   that also minimises the detector's logit.
"""

from __future__ import annotations

from .defense import Grace, family_name, parse_family

__version__ = "0.1.0"
mmsec_api_version = 2  # the mmsec plugin API this plugin is written for

from mmsec import hookimpl  # noqa: E402


@hookimpl
def register_defenses(register):
    register(Grace)


__all__ = ["Grace", "family_name", "parse_family", "register_defenses"]
