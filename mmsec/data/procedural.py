"""The built-in procedural image-caption dataset ("shapes"), the default data.

Colour images of one shape on a low-contrast background, with attributes (shape, colour,
texture, size, position) and captions describing them. The shape is the class (10
classes). Every image is a pure function of ``(seed, split, index)``, so the data is
identical on every machine and needs no download. Images are rendered at 2x and
box-filtered down for anti-aliasing, and memoised on disk in the cache folder.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError
from .base import TensorDataset

log = logging.getLogger("mmsec.data")

__all__ = ["PROCEDURAL_SIZES", "SHAPES", "TEMPLATES", "attributes", "captions",
           "procedural_shapes", "render"]

SHAPES = (
    "circle", "square", "triangle", "star", "cross",
    "ring", "diamond", "hexagon", "heart", "crescent",
)
COLOURS = {
    "red": (0.85, 0.15, 0.12),
    "green": (0.15, 0.7, 0.2),
    "blue": (0.15, 0.3, 0.9),
    "yellow": (0.92, 0.85, 0.1),
    "purple": (0.6, 0.2, 0.75),
    "orange": (0.95, 0.55, 0.1),
    "cyan": (0.1, 0.8, 0.85),
    "white": (0.95, 0.95, 0.95),
}
TEXTURES = ("plain", "striped", "dotted", "checkered")
SIZES = ("small", "large")
POSITIONS = {
    "centre": (0.0, 0.0),
    "top left": (-0.35, -0.35),
    "top right": (0.35, -0.35),
    "bottom left": (-0.35, 0.35),
    "bottom right": (0.35, 0.35),
}
TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a drawing of a {}.",
    "a {}.",
    "an image of a {}.",
)
_SPLIT_IDS = {"train": 0, "test": 1, "val": 2}


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of a unit-radius shape on coordinates ``x, y`` (already centred and scaled)."""
    r = np.hypot(x, y)
    if shape == "circle":
        return r < 1.0
    if shape == "square":
        return np.maximum(abs(x), abs(y)) < 0.8
    if shape == "triangle":
        return (y < 0.7) & (y > -1.0 + 1.7 * abs(x) * 1.0) & (abs(x) < 1.0)
    if shape == "star":
        theta = np.arctan2(y, x) + np.pi / 2
        return r < 0.5 + 0.5 * np.abs(np.cos(2.5 * theta)) ** 2
    if shape == "cross":
        return ((abs(x) < 0.3) & (abs(y) < 1.0)) | ((abs(y) < 0.3) & (abs(x) < 1.0))
    if shape == "ring":
        return (r < 1.0) & (r > 0.6)
    if shape == "diamond":
        return abs(x) + abs(y) < 1.0
    if shape == "hexagon":
        ax, ay = abs(x), abs(y)
        return (ay < 0.85) & (0.5 * ay + 0.866 * ax < 0.9)
    if shape == "heart":
        hx, hy = x * 1.15, -y * 1.15 + 0.15
        return (hx**2 + hy**2 - 1) ** 3 - hx**2 * hy**3 < 0
    if shape == "crescent":
        return (r < 1.0) & (np.hypot(x - 0.45, y + 0.1) > 0.75)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, x: np.ndarray, y: np.ndarray, phase: float) -> np.ndarray:
    """Pattern in {0,1}: where the shape shows its secondary (darker) tone."""
    if texture == "plain":
        return np.zeros_like(x, dtype=bool)
    if texture == "striped":
        return np.sin((x + y) * 9.0 + phase) > 0.3
    if texture == "dotted":
        return (np.sin(x * 10 + phase) * np.sin(y * 10 + phase)) > 0.45
    if texture == "checkered":
        return (np.floor(x * 3.2 + phase) + np.floor(y * 3.2 + phase)) % 2 == 0
    raise ValueError(f"unknown texture {texture!r}")


def _draw_attributes(rng: np.random.Generator, index: int) -> dict:
    """The item's attributes: the first draws of its generator (``render`` continues it)."""
    label = index % len(SHAPES)
    return {
        "label": label, "shape": SHAPES[label],
        "colour": list(COLOURS)[rng.integers(len(COLOURS))],
        "texture": TEXTURES[rng.integers(len(TEXTURES))],
        "size": SIZES[rng.integers(len(SIZES))],
        "position": list(POSITIONS)[rng.integers(len(POSITIONS))],
    }


def attributes(seed: int, split: str, index: int) -> dict:
    """Attributes of one item without rendering it (identical to ``render(...)[1]``)."""
    return _draw_attributes(np.random.default_rng([seed, _SPLIT_IDS[split], index]), index)


def render(seed: int, split: str, index: int, size: int = 32) -> tuple[np.ndarray, dict]:
    """Render one item: ``(uint8 image [size, size, 3], attributes dict)``.

    Labels cycle through the classes (balanced splits); the other attributes are
    drawn from a generator seeded by ``(seed, split, index)``.
    """
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    attrs = _draw_attributes(rng, index)
    shape, colour, size_name, position = (attrs[k] for k in ("shape", "colour", "size", "position"))
    texture = attrs["texture"]

    hi = size * 2
    grid = (np.arange(hi) + 0.5) / hi * 2 - 1  # [-1, 1]
    gx, gy = np.meshgrid(grid, grid)
    cx, cy = POSITIONS[position]
    cx += rng.uniform(-0.08, 0.08)
    cy += rng.uniform(-0.08, 0.08)
    radius = (0.38 if size_name == "small" else 0.6) * rng.uniform(0.9, 1.1)
    if size_name == "large":  # keep large shapes inside the frame
        cx, cy = cx * 0.6, cy * 0.6
    angle = rng.uniform(-0.25, 0.25)
    dx, dy = (gx - cx) / radius, (gy - cy) / radius
    x = np.cos(angle) * dx - np.sin(angle) * dy
    y = np.sin(angle) * dx + np.cos(angle) * dy
    mask = _shape_mask(shape, x, y)
    pattern = _texture(texture, x, y, rng.uniform(0, 6.28))

    # Low-contrast background: a muted tint with a soft gradient and faint noise.
    bg = rng.uniform(0.3, 0.6) + rng.uniform(-0.08, 0.08, size=3)
    grad = rng.uniform(-0.08, 0.08) * gx[..., None] + rng.uniform(-0.08, 0.08) * gy[..., None]
    img = np.clip(bg + grad + rng.normal(0, 0.03, size=(hi, hi, 3)), 0, 1)
    fg = np.array(COLOURS[colour]) * rng.uniform(0.85, 1.0)
    shade = np.where(pattern[..., None], fg * 0.45, fg)
    img = np.where(mask[..., None], shade, img)
    img = img.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
    return (img * 255 + 0.5).astype(np.uint8), attrs


def captions(attrs: dict) -> list[str]:
    """Five captions of one item, from terse (class name only) to fully descriptive."""
    s, c, t, z, p = (attrs[k] for k in ("shape", "colour", "texture", "size", "position"))
    tex = "" if t == "plain" else f"{t} "
    return [
        f"a photo of a {s}.",
        f"a {c} {s}.",
        f"a {z} {tex}{s}.",
        f"a drawing of a {c} {s} in the {p}.",
        f"a {z} {c} {tex}{s} in the {p}.",
    ]


PROCEDURAL_SIZES = {"train": 20000, "test": 2000, "val": 2000}


def procedural_shapes(
    arg: str | None = None, *, split: str = "test", seed: int = 0, size: int = 32,
    n: int | None = None, image_size: int | None = None, **_: object,
) -> TensorDataset:
    """The built-in procedural shapes set (10 classes, captions, deterministic from ``seed``);
    rendered at ``image_size`` (alias ``size``, default 32) pixels."""
    size = int(image_size or size)
    if split not in PROCEDURAL_SIZES:
        raise UsageError(f"dataset procedural: unknown split {split!r} (train, test, val)")
    total = PROCEDURAL_SIZES[split]
    if n is not None and n > total:
        # the split has a fixed size: more would render images that are not in it
        log.warning("procedural[%s] has %d items; using all %d, not %d", split, total, total, n)
    n = min(n or total, total)
    arr = _procedural_array(seed, split, n, size)
    attrs = [attributes(seed, split, i) for i in range(n)]
    return TensorDataset(
        torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(),
        torch.tensor([a["label"] for a in attrs]),
        name="procedural", split=split, classnames=list(SHAPES),
        templates=TEMPLATES, captions=[captions(a) for a in attrs],
    )


#: the memo file: ``<sha256 hex of the rest>\n`` then the ``.npy`` bytes
_MEMO_DIGEST_LEN = 64


def _read_memo(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The memoised array, or None (missing, or corrupt: then with a warning)."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read the procedural data memo %s (%s); rendering again", path, exc)
        return None
    digest, payload = blob[:_MEMO_DIGEST_LEN], blob[_MEMO_DIGEST_LEN + 1:]
    why = ""
    if blob[_MEMO_DIGEST_LEN:_MEMO_DIGEST_LEN + 1] != b"\n" or \
            hashlib.sha256(payload).hexdigest().encode() != digest:
        why = "checksum mismatch"
    else:
        try:
            arr = np.load(io.BytesIO(payload), allow_pickle=False)
        except (OSError, ValueError) as exc:
            why = f"unreadable ({exc})"
        else:
            if arr.shape == shape and arr.dtype == np.uint8:
                return arr
            why = f"holds {arr.dtype} {arr.shape}, expected uint8 {shape}"
    log.warning("procedural data memo %s is corrupt (%s); rendering it again", path, why)
    return None


_CHUNK = 1000  # images per rendering task


def _render_chunk(job: tuple[int, str, int, int, int]) -> np.ndarray:
    seed, split, start, stop, size = job
    return np.stack([render(seed, split, i, size)[0] for i in range(start, stop)])


@contextlib.contextmanager
def _pool(tasks: int):
    """Worker processes for rendering several chunks (``None``: render here): up to the CPUs
    this process may use, ``MMSEC_RENDER_WORKERS`` (0 = none); forked, so nothing is
    imported again (where fork is unavailable, rendering stays in this process)."""
    from .stream import usable_cpus

    env = os.environ.get("MMSEC_RENDER_WORKERS", "").strip()
    if env and not env.isdigit():
        raise UsageError(f"MMSEC_RENDER_WORKERS={env!r}: expected a number of processes "
                         "(0 = render in this process)")
    workers = min(tasks, int(env) if env else usable_cpus(), 16)
    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        yield None
        return
    with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("fork")) as pool:
        yield pool


def _procedural_array(seed: int, split: str, n: int, size: int) -> np.ndarray:
    """Rendered uint8 images ``[n, size, size, 3]``, memoised on disk in the cache dir.

    The memo carries the SHA-256 of its content: flipped or truncated bytes are found, warned
    about and rendered again (never silently fed to a model)."""
    from ..cache import default_cache_dir
    from ..io import write_atomic

    path = default_cache_dir() / "procedural" / f"v2-s{seed}-{split}-{n}-{size}px.npy"
    arr = _read_memo(path, (n, size, size, 3))
    if arr is not None:
        return arr
    from ..progress import progress

    arr = np.empty((n, size, size, 3), np.uint8)
    chunks = [range(i, min(n, i + _CHUNK)) for i in range(0, n, _CHUNK)]
    with progress(total=n, desc=f"rendering procedural[{split}]", enabled=n >= 5000,
                  mininterval=1.0) as bar, _pool(len(chunks)) as pool:
        # each image is a pure function of (seed, split, index): any split of the work
        # gives the same bytes
        parts = (pool.map(_render_chunk, [(seed, split, r.start, r.stop, size) for r in chunks])
                 if pool is not None else
                 (_render_chunk((seed, split, r.start, r.stop, size)) for r in chunks))
        for r, part in zip(chunks, parts, strict=True):
            arr[r.start:r.stop] = part
            bar.update(len(r))
    from ..distributed import is_main

    if not is_main():  # under torchrun rank 0 writes the memo
        return arr
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        payload = buf.getvalue()
        write_atomic(path, hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    except OSError as exc:  # a read-only cache only costs time
        log.warning("could not memoise procedural data at %s: %s", path, exc)
    return arr
