"""AdvCLIP: universal adversarial patch from a GAN generator (Zhou et al., ACM MM 2023).

``mmsec attack --plugin advclip`` trains the patch generator against the model's
frozen encoders and measures the patch on the evaluation split next to a
uniform-noise patch of the same size and place; ``mmsec eval --attack-artifact
artifacts/advclip.safetensors`` applies a saved patch to any model and data.
See ``attack.py`` for the method and ``topology.py`` for the graph terms.
"""

from __future__ import annotations

from mmsec import hookimpl

from .attack import AdvCLIP

__version__ = "0.2.0"
mmsec_api_version = 2  # the mmsec plugin API this plugin is written for
__all__ = ["AdvCLIP", "register_attacks"]


@hookimpl
def register_attacks(register):
    register(AdvCLIP)
