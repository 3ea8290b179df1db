"""Option fields many plugins share, with one spelling, one constraint and one description.

Use them in a plugin's ``Options`` with the paper's default::

    class Options(mmsec.Options):
        eps: float = fields.eps(8 / 255)
        epochs: int = fields.epochs(20)
        batch_size: int = fields.batch_size(16)
        lr: float = fields.lr(2e-4, "Adam learning rate of G and D")
        train_items: int | None = fields.train_items(1000)
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

__all__ = ["batch_size", "early_stop", "epochs", "eps", "lr", "min_steps", "patience", "steps",
           "total_steps", "train_items", "weight"]


def eps(default: float, what: str = "L-inf budget (pixels in [0, 1])", *,
        allow_zero: bool = False) -> Any:
    """An L-inf budget in pixel units of [0, 1] (accepts ``4/255``)."""
    bound = {"ge": 0} if allow_zero else {"gt": 0}
    return Field(default, le=1, description=what, **bound)


def epochs(default: int, what: str = "passes over the training images") -> Any:
    return Field(default, ge=1, description=what)


def steps(default: int, what: str = "optimisation steps", *, allow_zero: bool = False) -> Any:
    return Field(default, ge=0 if allow_zero else 1, description=what)


def total_steps(what: str = "optimiser steps in all (overrides epochs; none: from epochs)"
                ) -> Any:
    """``steps``: a schedule in steps instead of epochs (``train(steps=...)``)."""
    return Field(None, ge=1, description=what)


def min_steps(default: int, what: str = "at least this many optimiser steps: more epochs on "
                                        "small data (0: off)") -> Any:
    """``min_steps``: a floor on the steps planned from epochs (``train(min_steps=...)``)."""
    return Field(default, ge=0, description=what)


def early_stop(default: bool, metric: str) -> Any:
    """``early_stop``: end the loop when ``metric`` plateaus (``train(stop=Plateau(...))``)."""
    return Field(default, description=f"stop when {metric} has not improved for `patience` "
                                       "epochs")


def patience(default: int = 3) -> Any:
    return Field(default, ge=1, description="epochs without improvement before early_stop")


def batch_size(default: int, what: str = "images per step", *, minimum: int = 1) -> Any:
    return Field(default, ge=minimum, description=what)


def lr(default: float | None, what: str = "learning rate") -> Any:
    return Field(default, gt=0, description=what)


def train_items(default: int | None, what: str = "training images: a fixed random sample "
                "(none: all)", *, minimum: int = 1) -> Any:
    return Field(default, ge=minimum, description=what)


def weight(default: float, what: str) -> Any:
    """A non-negative loss weight."""
    return Field(default, ge=0, description=what)
