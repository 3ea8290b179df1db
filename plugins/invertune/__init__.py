"""InverTune: backdoor removal for CLIP without the poisoned data (2025; Goodman-liyu/InverTune).

Three stages, each selectable (``stages``) and reported on its own:

1. **Target identification by adversarial simulation** : a universal
   patch/perturbation from another registered attack plugin (``simulator``, default
   ``advclip`` with a short schedule fitted on the clean set, or a saved artifact FILE) is
   applied to the clean images; classes are ranked by the rise of their share of the
   zero-shot predictions. The top class is the suspected target.
2. **Trigger inversion** : a mask ``m`` in [0, 1] and a pattern ``t`` in
   [0, 1], ``x' = m*t + (1-m)*x`` on non-target clean images, with
   ``5*CE(cos(f(x'), T)/0.07, y_tgt) + 0.5*||f^(x') - f^(x_tgt)|| + 1*(1 - SSIM(x', x))
   + 0.01*||m||_1``, SSIM on [0, 1] pixels (the official code computes it on normalised
   tensors), Adam 0.01, batch 64, 10 epochs.
3. **Clustering-guided activation tuning** : stages of the image tower
   (ResNet ``layer1..4`` or ViT ``block0..N``; the official code handles ResNets only) are
   ranked by the inverted trigger's relative activation shift; in the top ``top_layers``,
   k-means (k=2, the shared FAISS helper ``mmsec.kmeans``) on the element-wise shifts keeps
   the critical neurons (the cluster with the larger mean); the image tower is fine-tuned
   with the masked activation loss plus ``w_preserve*||f^_theta(x) - f^_theta0(x)||``
   (paper 0.5, default 20: see below; AdamW, wd 1e-4, cosine, clip 1.0, 200 steps of 64
   clean images). Stages 2 and 3 repeat ``rounds`` times on the repaired model.

The defense only uses its small clean set (``clean_items``, at most the host's
``--clean-items``); never the poisoned data, the real trigger or the true target
(``target`` is an ablation override). When the run knows the real trigger (``mmsec
defend --trigger`` / ``trigger_from:``), the report shows it next to the inverted one and
says whether the identified target is the real one; nothing else reads it.

Simulators. ``advclip`` (the default, as in the paper) runs a short schedule with a 10%
patch; it can find patch-like backdoors (BadNets), but whether a short GAN schedule lands
in the backdoor is a matter of the random draw: on the zoo BadNets implants it ranked the
real target first for 1 of 4 seeds on zoo:shapes and 0 of 4 on zoo:fashion (README). A
patch does not imitate a full-image trigger: for Blended, SIG and WaNet use ``-o simulator
uap`` (the built-in universal L-inf perturbation, 16/255), which found the Blended and SIG
targets in 15 of 16 runs and the WaNet ones in 3 of 8. A simulator that misses the
backdoor sends the predictions to a "sink" class of the model instead, and the report's
ranking then names that class; there is no reliable rule to tell the two apart from the
clean set alone (prediction-share rise and inversion mask size were both tried).

Where mmsec departs from the paper, and why (measured on the zoo models, see the README):

- ``tune_simulator`` (default on): stage 3 also tunes away the simulator's perturbation,
  the one whose prediction collapse identified the target, next to the inverted trigger
  (the activation loss sums over both, each with its own critical neurons). On zoo:shapes
  + BadNets the inverted trigger alone left ASR at 96.8%; with the simulator's patch, 7.3%.

- ``rounds`` (default 3; the paper does 1): each later round inverts a trigger again on
  the repaired model and tunes that away too. On zoo:shapes + SIG (target given) one round
  left ASR at 60%, 400 tuning steps in one round at 25%, three rounds at 4.6%.
- ``tune_lr`` 1e-4 and ``w_preserve`` 20 (paper: 2e-6 and 0.5, for large pretrained CLIPs
  that barely move at 2e-6). At 1e-4 with 0.5, tuning with the *real* BadNets trigger
  removed the backdoor (ASR 99.8 -> 3) but cost 27 points of CA; with 20 it cost 0.8.
- the activation loss divides norms taken over the whole batch; per image, the ratio
  explodes on images whose critical neurons are silent (ReLU zeros: 3e5 seen at step 0).

Where the inversion fails: the decoy-trained BadNets implants of the backdoor plugin (the
``negative_rate`` decoys teach the model to ignore every other pattern at the trigger's
place) cannot be inverted by the mask/pattern search: on zoo:shapes the inverted triggers
are sparse natural adversarial pixels of the target class (3-5% of their mass on the real
patch), and even a search restricted to an 8x8 window around the real patch reaches only
30% ASR. Tuning removes those perturbations, not the backdoor; the simulator's patch is
what removes most of it there (see ``tune_simulator``).
"""

from __future__ import annotations

from .defense import InverTune

__version__ = "0.2.0"
mmsec_api_version = 2  # the mmsec plugin API this plugin is written for

from mmsec import hookimpl  # noqa: E402


@hookimpl
def register_defenses(register):
    register(InverTune)


__all__ = ["InverTune", "register_defenses"]
