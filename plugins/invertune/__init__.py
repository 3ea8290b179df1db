"""InverTune: backdoor removal for CLIP without the poisoned data (2025; Goodman-liyu/InverTune).

Three stages, each selectable (``stages``) and reported on its own:

1. **Target identification by adversarial simulation** : ``simulator: auto`` (the
   default) probes every candidate class with a short *targeted* universal trigger of each
   family (``probes.py``: a patch at the corners and the centre, an L-inf perturbation of
   the whole image, a smooth warp) and ranks the classes by their lead in their best family:
   the log-odds of a class's held-out success rate minus the best other class's in the
   same family. The top class is the suspected target; its lead is the confidence
   (``min_confidence``), and its probe is the simulated trigger tuned away in stage 3. ``simulator: PLUGIN`` keeps the paper's untargeted form: a universal attack
   from another registered plugin (``advclip``, ``uap``) or a saved artifact FILE, classes
   ranked by the rise of their prediction share.
2. **Trigger inversion** : a mask ``m`` in [0, 1] and a pattern ``t`` in
   [0, 1], ``x' = m*t + (1-m)*x`` on non-target clean images (``inversion: warp``, chosen by
   ``auto`` when a warp probe identified the target: ``x' = m*t + (1-m)*warp(x)`` with a
   learned smooth flow field, which a mask cannot express), starting from the identifying
   patch or warp probe, with
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

Why targeted probes. An untargeted universal attack (the paper's simulator) sends the
predictions to whichever class is easiest: the backdoor target when the attack happens to
be of the trigger's family, else a natural "sink" class of the model, and nothing in its
ranking tells the two apart (on the zoo implants: a UAP found the Blended and SIG targets
in 15 of 16 runs, the WaNet ones in 3 of 8; an AdvCLIP patch the BadNets ones in 1 of 8).
Probing each class with each family turns this into a comparison between classes: a sink
is easy to reach in every family but has near rivals in each, a backdoor target is reached
from nearly every image by its own family, well ahead of the runner-up (on zoo:shapes +
BadNets: the target 99.6% with a patch, the next class 83%; the sink 88% with an L-inf
perturbation, the target itself 66% behind it). Where that fails, and why (BadNets trained with decoys), is in the README.

Suspects. On a small model a natural sink can lead its own family by more than the
target leads the target's: a 10-px patch sends 99% of zoo:shapes images to "ring" and an
L-inf 16/255 pattern 98-99%, so on a weak WaNet implant "ring" ranked first (lead 2.6, the
target 0.4 in the warp family), and on a short SIG implant the patch sink outranked the SIG
target (3.5 vs 1.8) once the patch probe had 16 starts. Telling the two apart from the
probes alone failed on every rule tried (lead gap, lead ratio, reach in a second family), so
InverTune does not choose:
the top class and every other family's leader at least ``suspect_lead`` (0.3) ahead of
its runner-up, up to ``suspects`` (3; 1 = the top class only, as the paper), are inverted
and tuned away. The top class gets its ``rounds`` as before, then each other
suspect its own ``suspect_rounds`` (3) of inversion and tuning, one class at a time (tuned
all together in one pass, each perturbation's share of a step shrank and the top class's
backdoor survived: zoo:shapes SIG, 7.6% ASR left instead of 1.2%). One round per other
suspect was not enough where the target is one of them (the CI's short SIG implant: 26.7%
ASR left with 1, 8.9% with 3; zoo:shapes WaNet: 28.5% and 15.9%); where the top class was
already the target the extra rounds on a sink cost accuracy (zoo:shapes SIG, two sinks: CA
-2.0 points with 1, -3.1 with 3, ASR 1.2% left either way). Figures in the README.

Where mmsec departs from the paper, and why (measured on the zoo models, see the README):

- ``tune_simulator`` (default on): stage 3 also tunes away the simulator's perturbation,
  the one whose prediction collapse identified the target, next to the inverted trigger
  (the activation loss sums over both, each with its own critical neurons). On zoo:shapes
  + BadNets the inverted trigger alone left ASR at 96.8%; with the simulator's patch, 7.3%.

- ``rounds`` (default 3; the paper does 1): each later round inverts a trigger again on
  the repaired model and tunes that away too. On zoo:shapes + SIG (target given) one round
  left ASR at 60%, 400 tuning steps in one round at 25%, three rounds at 4.6%.
- ``stop_asr`` (0.5): a later round whose freshly inverted trigger reaches fewer than half
  of the clean non-target images ends the rounds (nothing left to tune; saves its tuning).
- ``min_tune_drop`` (0.1): a suspect's later round whose tuning lowers its inverted
  trigger's rate by less than 10% (relative) is undone and ends that suspect's rounds. A
  sink's trigger is found again at ~100% every round (so ``stop_asr`` never ends them) and
  its later rounds often leave it there (1.00 -> 1.00) while costing accuracy: undoing
  them took zoo:shapes SIG from CA -3.1 to -2.0 and stamps BadNets from -3.2 to -1.6 at the
  same ASR, and cut the CPU time by 13% over the 8 zoo implants (24% on SIG, 28% on
  stamps BadNets). The cost: on Fashion-MNIST WaNet the third
  round (0.99 -> 0.93) had still helped, ASR left 6.6% -> 9.6%.
- ``w_invariance`` (1): the tuning also pulls a triggered image's embedding back to the
  original model's embedding of the clean image. On zoo:shapes + WaNet (target given, warp
  inversion, one round) ASR 95.6 -> 48.0% without it, -> 40.4% with it (CA 98.1 / 97.9).
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
