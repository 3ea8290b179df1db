"""The built-in probes: zero-shot, kNN, retrieval, embedding geometry."""

from ..evaluation.probes import BUILTIN_METRICS
from ..hookspecs import hookimpl


@hookimpl
def register_metrics(register):
    for metric in BUILTIN_METRICS:
        register(metric)
