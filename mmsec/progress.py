"""Progress bars: one switch (``MMSEC_PROGRESS``) and one bar for every long loop."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from tqdm import tqdm

_T = TypeVar("_T")

__all__ = ["progress", "progress_enabled"]


def progress_enabled() -> bool:
    """``MMSEC_PROGRESS=0`` disables bars, ``=1`` forces them; default: only on a TTY.
    Under torchrun only the main process shows bars."""
    from .distributed import is_main

    if not is_main():
        return False
    setting = os.environ.get("MMSEC_PROGRESS", "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def progress(
    iterable: Iterable[_T] | None = None,
    *,
    desc: str | None = None,
    total: int | None = None,
    unit: str = "it",
    leave: bool = False,
    enabled: bool = True,
    **kwargs,
) -> tqdm:
    """A tqdm bar with ETA on stderr; off when ``enabled`` is false, when stderr is not a TTY
    or when ``MMSEC_PROGRESS=0``."""
    from tqdm.auto import tqdm as tqdm_class

    return tqdm_class(iterable, desc=desc, total=total, unit=unit, leave=leave, file=sys.stderr,
                      dynamic_ncols=True, disable=not (enabled and progress_enabled()), **kwargs)
