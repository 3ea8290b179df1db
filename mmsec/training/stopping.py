"""Early stopping: end a loop when the number it is judged by stops improving.

``train(..., stop=Plateau("val_fooling_rate", patience=3, min_delta=0.005))`` ends the loop
after an epoch in which the metric (a per-epoch mean of a logged number, or a number
``on_epoch_end`` returned) has not beaten its best by more than ``min_delta`` for
``patience`` epochs in a row. The decision is a function of the loop's history, so a
resumed run decides exactly as an uninterrupted one.

Without early stopping, :func:`flat_since` tells the loop where a number stopped moving,
so the run can say so (a note under the headline) instead of leaving it to the log.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["Plateau", "flat_since"]


@dataclass(frozen=True)
class Plateau:
    """Stop when ``metric`` has not improved by more than ``min_delta`` for ``patience``
    epochs (``mode`` "max": higher is better; "min": lower is better), never before
    ``min_epochs`` epochs."""

    metric: str
    patience: int = 3
    min_delta: float = 0.0
    mode: Literal["max", "min"] = "max"
    min_epochs: int = 1

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError("Plateau patience must be at least 1 epoch")
        if self.mode not in ("max", "min"):
            raise ValueError(f"Plateau mode must be 'max' or 'min', not {self.mode!r}")

    def check(self, history: Sequence[dict[str, float]]) -> str | None:
        """Why to stop after the last epoch of ``history`` (None: go on)."""
        values = [h.get(self.metric) for h in history]
        if len(values) < max(self.min_epochs, self.patience + 1):
            return None
        if any(v is None or not math.isfinite(v) for v in values[-(self.patience + 1):]):
            return None
        sign = 1.0 if self.mode == "max" else -1.0
        best_at, best = 0, sign * float(values[0] if values[0] is not None else -math.inf)
        for i, v in enumerate(values):
            if v is not None and math.isfinite(v) and sign * v > best + self.min_delta:
                best_at, best = i, sign * v
        if len(values) - 1 - best_at >= self.patience:
            return (f"{self.metric} has not improved by more than {self.min_delta:g} for "
                    f"{len(values) - 1 - best_at} epochs (best {sign * best:.4g} at epoch "
                    f"{best_at + 1})")
        return None


def flat_since(values: Sequence[float | None], rel_tol: float = 0.01) -> int | None:
    """Where the flat tail of ``values`` (per-epoch numbers) begins: the first index from
    which every value to the end lies within ``rel_tol`` of the tail's largest magnitude
    (max - min <= rel_tol * max |v|). None when the last value is missing or not finite,
    or when the tail is a single value."""
    if not values or values[-1] is None or not math.isfinite(values[-1]):
        return None
    lo = hi = float(values[-1])
    start = len(values) - 1
    for i in range(len(values) - 2, -1, -1):
        v = values[i]
        if v is None or not math.isfinite(v):
            break
        nlo, nhi = min(lo, v), max(hi, v)
        if nhi - nlo > rel_tol * max(abs(nlo), abs(nhi)) + 1e-12:
            break
        lo, hi, start = nlo, nhi, i
    return start if start < len(values) - 1 else None
