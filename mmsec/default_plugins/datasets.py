"""The built-in data sources: procedural, imagefolder, captions, fashion-mnist, torchvision."""

from ..data import builtin_sources
from ..hookspecs import hookimpl


@hookimpl
def register_datasets(register):
    for source in builtin_sources():
        register(source)
