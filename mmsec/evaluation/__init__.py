"""The evaluation pipeline: embeddings per (model, dataset, condition), and probes over them.

- :mod:`.embed`: cached image and caption embeddings;
- :mod:`.views`: what probes read (``View``, ``Task``) and produce (``Row``), and the
  ``Metric`` a plugin registers;
- :mod:`.probes`: the built-in probes (zero-shot, kNN, retrieval, geometry);
- :mod:`.pipeline`: ``Evaluation``: clean and attacked views, measured by every probe.
"""

from .embed import EncodeReport, caption_table, encode_images, encode_texts, fill_cache
from .pipeline import Evaluation, resolve_target, rows_to_metrics
from .probes import BUILTIN_METRICS
from .views import Metric, Row, Task, View, flat_key

__all__ = [
    "BUILTIN_METRICS", "EncodeReport", "Evaluation", "Metric", "Row", "Task", "View",
    "caption_table", "encode_images", "encode_texts", "fill_cache", "flat_key",
    "resolve_target", "rows_to_metrics",
]
