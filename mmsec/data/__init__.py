"""Datasets: one small interface (``ImageDataset``) every source implements, and the sources.

Modules: ``base`` (the interface, subsets, batches of items), ``procedural`` (the built-in
default data), ``files`` (image folders and caption files), ``fashion`` (Fashion-MNIST),
``tvsets`` (torchvision datasets from a local root), ``sources`` (``-d SPEC`` resolution).
"""

from .base import DEFAULT_TEMPLATES, ImageDataset, Subset, TensorDataset, load_images, subset
from .fashion import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, fashion_mnist, read_idx
from .files import IMAGE_EXTENSIONS, FileImageDataset, captions_file, imagefolder
from .procedural import PROCEDURAL_SIZES, procedural_shapes
from .sources import DEFAULT_DATASET, DatasetSource, builtin_sources, load_dataset, parse_spec

__all__ = [
    "DEFAULT_DATASET", "DEFAULT_TEMPLATES", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR",
    "IMAGE_EXTENSIONS", "PROCEDURAL_SIZES", "DatasetSource", "FileImageDataset",
    "ImageDataset", "Subset", "TensorDataset", "builtin_sources", "captions_file",
    "fashion_mnist", "imagefolder", "load_dataset", "load_images", "parse_spec",
    "procedural_shapes", "read_idx", "subset",
]
