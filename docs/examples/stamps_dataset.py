"""Build a real image folder and a real captions file from Tux Paint's clip-art stamps.

Debian ships ~800 colour clip-art stamps with an English caption each
(``apt-get install tuxpaint-stamps-default``). This script turns them into the two
kinds of data ``mmsec`` reads from disk, to try "your own data" end to end:

    OUT/images/<class>/<stamp>.png   ->  -d imagefolder:OUT/images
    OUT/captions.jsonl               ->  -d captions:OUT/captions.jsonl

Each stamp is composited on white (stamps are transparent PNGs) and fitted into a
SIZE x SIZE square. Classes are 11 stamp categories with plain English names; the
captions are the stamps' own first caption lines ("A badger."). Each caption row has a
``split`` (80% train, 20% test by a hash of the image's path inside ``images/``: the same
test images mmsec holds out of the image folder), so retrieval is measured on held-out pairs.

    python docs/examples/stamps_dataset.py OUT [--size 96] [--stamps DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from PIL import Image

DEFAULT_STAMPS = Path("/usr/share/tuxpaint/stamps")

# class name -> stamp sub-folders (relative to the stamps root)
CLASSES: dict[str, list[str]] = {
    "animal": ["animals"],
    "food": ["food"],
    "plant": ["plants"],
    "vehicle": ["vehicles"],
    "building": ["town/houses", "town/monuments"],
    "road sign": ["town/roadsigns"],
    "letter": ["symbols/alphabets"],
    "coin": ["symbols/money"],
    "holiday": ["seasonal"],
    "clothing": ["clothes"],
    "household": ["household"],
}


def split_of(relpath: str) -> str:
    """mmsec's rule for a flat image folder: 80/20 by a hash of the relative path."""
    h = int.from_bytes(hashlib.sha1(relpath.encode("utf-8")).digest()[:8], "big")
    return "train" if h % 100 < 80 else "test"


def caption_of(png: Path) -> str | None:
    """The stamp's English caption: the first line of its ``.txt`` file."""
    txt = png.with_suffix(".txt")
    if not txt.is_file():
        return None
    first = txt.read_text(encoding="utf-8", errors="replace").splitlines()
    line = first[0].strip() if first else ""
    return line or None


def square(png: Path, size: int) -> Image.Image:
    """The stamp on a white square of ``size`` pixels, aspect ratio kept."""
    with Image.open(png) as im:
        im = im.convert("RGBA")
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
        canvas.alpha_composite(im, ((size - im.width) // 2, (size - im.height) // 2))
        return canvas.convert("RGB")


def build(out: Path, stamps: Path, size: int) -> tuple[int, int]:
    rows = []
    counts: dict[str, int] = {}
    for cls, subdirs in CLASSES.items():
        seen: set[str] = set()
        for sub in subdirs:
            for png in sorted((stamps / sub).rglob("*.png")):
                # Tux Paint keeps pre-mirrored/shadow variants of some stamps; skip them.
                if png.stem.endswith(("_mirror", "_flip", "_shadow")) or png.stem in seen:
                    continue
                seen.add(png.stem)
                rel = Path("images") / cls / f"{png.stem}.png"
                dest = out / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    square(png, size).save(dest)
                except OSError as exc:  # a damaged stamp: skip it, say so
                    print(f"skipped {png}: {exc}", file=sys.stderr)
                    continue
                counts[cls] = counts.get(cls, 0) + 1
                caption = caption_of(png)
                if caption:
                    rows.append({"image": rel.as_posix(), "caption": caption, "label": cls,
                                 "split": split_of(f"{cls}/{png.stem}.png")})
    tmp = out / "captions.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out / "captions.jsonl")
    for cls, n in counts.items():
        print(f"{cls:>10}: {n}")
    return sum(counts.values()), len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--stamps", type=Path, default=DEFAULT_STAMPS)
    args = ap.parse_args()
    if not args.stamps.is_dir():
        sys.exit(f"no stamps at {args.stamps}: apt-get install tuxpaint-stamps-default")
    images, captions = build(args.out, args.stamps, args.size)
    print(f"{images} images in {args.out / 'images'}, {captions} captions in "
          f"{args.out / 'captions.jsonl'}")


if __name__ == "__main__":
    main()
