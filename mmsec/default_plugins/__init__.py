"""mmsec's own default plugin: the host's data sources, model sources and metrics.

Registered like any plugin (through the hooks; llm and datasette do the same with their
``default_plugins``), and always loaded, whatever ``MMSEC_LOAD_PLUGINS`` says.
"""

from .datasets import register_datasets
from .metrics import register_metrics
from .models import register_models

mmsec_api_version = 2

__all__ = ["register_datasets", "register_metrics", "register_models"]
