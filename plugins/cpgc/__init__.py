"""C-PGC: one universal image perturbation and one universal word substitution that break
image-text alignment on any open_clip model (see ``attack.py`` for the method).

``mmsec attack --plugin cpgc`` trains both generators against the model's frozen encoders
and measures image-only, text-only and both conditions (zero-shot and retrieval attack
success rates) next to a control of uniform noise and a random word;
``mmsec eval --attack-artifact artifacts/cpgc.safetensors`` applies both parts to another
model and captions dataset (transfer).
"""

from __future__ import annotations

from mmsec import hookimpl

from .attack import CPGC

__version__ = "0.2.0"
mmsec_api_version = 2  # the mmsec plugin API this plugin is written for

__all__ = ["CPGC", "register_attacks"]


@hookimpl
def register_attacks(register):
    register(CPGC)
