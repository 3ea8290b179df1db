"""Shared fixtures. Tests never touch the user's cache and never show progress bars."""

from __future__ import annotations

import os

import pytest

# One cache for the whole session (set before mmsec reads it), so generated data and
# embeddings are made once per test run, never in the user's own cache.
_SESSION_CACHE = None


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    global _SESSION_CACHE
    _SESSION_CACHE = tmp_path_factory.mktemp("mmsec-cache")
    old = {k: os.environ.get(k) for k in ("MMSEC_CACHE_DIR", "MMSEC_PROGRESS", "MMSEC_ZOO")}
    os.environ["MMSEC_CACHE_DIR"] = str(_SESSION_CACHE)
    os.environ["MMSEC_PROGRESS"] = "0"
    os.environ["MMSEC_ZOO"] = str(tmp_path_factory.mktemp("user-zoo"))  # never the user's
    yield _SESSION_CACHE
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def zoo_model():
    """The embedded default model (trained, shipped weights), on the CPU."""
    from mmsec.model import load_model

    return load_model(device="cpu")


@pytest.fixture(scope="session")
def shapes_test():
    """The procedural test split (2,000 items)."""
    from mmsec.data import procedural_shapes

    return procedural_shapes(split="test")


@pytest.fixture
def tiny_vit():
    """A randomly initialised open_clip ViT CLIP, small enough for unit tests."""
    import open_clip
    from open_clip.model import CLIP

    from mmsec.model import ClipModel

    clip = CLIP(embed_dim=32,
                vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 3,
                            "head_width": 32},
                text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                          "layers": 1})
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    return ClipModel(clip, tok, name="tiny-vit", pretrained=None, image_size=32,
                     mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (``pytestmark = usefixtures("one_thread")``).

    These models are tiny, and on a busy 2-core machine two OpenMP threads spin against
    each other (test_advclip.py took 240 s with 2 threads, 27 s with 1).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
