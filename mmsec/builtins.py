"""mmsec's own default plugin: the host's data sources, model sources and metrics.

Registered like any plugin (through the hooks), but always loaded, whatever
``MMSEC_LOAD_PLUGINS`` says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import metrics
from .data import builtin_sources
from .hookspecs import hookimpl


@dataclass(frozen=True)
class ModelSource:
    """A family of models ``mmsec models`` lists: ``list_fn() -> [(name, pretrained tags)]``."""

    name: str
    list_fn: Any
    description: str = ""


def _zoo_models() -> list[tuple[str, list[str]]]:
    from .model import read_zoo_spec, zoo_names

    out = []
    for name in zoo_names():
        spec = read_zoo_spec(name)
        top1 = spec.get("metrics", {}).get("zero_shot_top1")
        out.append((f"zoo:{name}", [f"{spec.get('dataset')} zero-shot top-1 {top1}"]))
    return out


def _open_clip_models() -> list[tuple[str, list[str]]]:
    import open_clip

    tags: dict[str, list[str]] = {}
    for arch, tag in open_clip.list_pretrained():
        tags.setdefault(arch, []).append(tag)
    return [(m, tags.get(m, [])) for m in open_clip.list_models()]


@hookimpl
def register_datasets(register):
    for source in builtin_sources():
        register(source)


@hookimpl
def register_models(register):
    register(ModelSource("zoo", _zoo_models, "embedded CLIPs trained and shipped by mmsec"))
    register(ModelSource("open_clip", _open_clip_models,
                         "open_clip architectures; pretrained tags download on first use"))


@hookimpl
def register_metrics(register):
    for name, fn, text in (
        ("top1", metrics.topk_accuracy, "zero-shot top-1/top-5 accuracy"),
        ("fooling_rate", metrics.fooling_rate, "share of predictions an attack changes"),
        ("asr", metrics.attack_success_rate, "share of non-target images sent to the target"),
        ("clean_acc", metrics.clean_accuracy, "accuracy on clean images"),
        ("knn_acc", metrics.knn_accuracy, "weighted kNN accuracy (k=20, T=0.07)"),
        ("knn_fooling_rate", metrics.knn_fooling_rate, "share of kNN predictions changed"),
        ("recall", metrics.retrieval_recall, "image->text / text->image recall@1/5/10"),
        ("alignment", metrics.alignment, "mean distance of positive pairs (Wang & Isola)"),
        ("uniformity", metrics.uniformity, "log mean Gaussian potential (Wang & Isola)"),
    ):
        register(name, fn, text)
