"""The built-in model sources: the embedded zoo (``zoo:NAME``, the default) and open_clip."""

from ..hookspecs import hookimpl
from ..model import builtin_model_sources


@hookimpl
def register_models(register):
    for source in builtin_model_sources():
        register(source)
