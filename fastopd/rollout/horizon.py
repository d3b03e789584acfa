"""Horizon schedules: how many tokens a rollout may generate at training step ``k``.

Truncated on-policy distillation (TOPD) distills on rollouts cut to a fraction of the full length; progressive
OPD (POPD) grows the horizon during training. Every schedule is a callable ``horizon(step) -> H``; any plain
callable with that signature works wherever a :class:`Horizon` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from fastopd._numbers import as_int, as_real


def _positive_int(name: str, value: object) -> int:
    v = as_int(value)
    if v is None or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return v


def _step(value: object) -> int:
    k = as_int(value)
    if k is None or k < 0:
        raise ValueError(f"step must be a non-negative int, got {value!r}")
    return k


class Horizon:
    """A horizon schedule ``step -> H`` (tokens to generate), built by :meth:`full`, :meth:`truncated` or
    :meth:`progressive`. ``max_new_tokens`` is the largest horizon it can return."""

    def __init__(self, fn: Callable[[int], int], max_new_tokens: int, description: str) -> None:
        self._fn = fn
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        self.description = description

    def __call__(self, step: int) -> int:
        return self._fn(_step(step))

    def __repr__(self) -> str:
        return f"Horizon.{self.description}"

    @classmethod
    def full(cls, max_new_tokens: int) -> Horizon:
        """Always ``max_new_tokens`` (plain OPD)."""
        t = _positive_int("max_new_tokens", max_new_tokens)
        return cls(lambda step: t, t, f"full(max_new_tokens={t})")

    @classmethod
    def truncated(cls, ratio: float, max_new_tokens: int) -> Horizon:
        """TOPD: ``H = max(1, round(ratio * max_new_tokens))`` at every step; ``0 < ratio <= 1``."""
        t = _positive_int("max_new_tokens", max_new_tokens)
        r = as_real(ratio)
        if r is None:
            raise ValueError(f"ratio must be a real number in (0, 1], got {ratio!r}")
        if not 0.0 < r <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
        h = max(1, min(t, round(r * t)))
        return cls(lambda step: h, t, f"truncated(ratio={ratio}, max_new_tokens={t})")

    @classmethod
    def progressive(cls, start: int, step: int, every: int, max_new_tokens: int) -> Horizon:
        """POPD: ``H_k = min(max_new_tokens, start + step * floor(k / every))``."""
        t = _positive_int("max_new_tokens", max_new_tokens)
        s0 = _positive_int("start", start)
        every = _positive_int("every", every)
        inc = as_int(step)
        if inc is None or inc < 0:
            raise ValueError(f"step (the horizon increment) must be a non-negative int, got {step!r}")
        return cls(lambda k: min(t, s0 + inc * math.floor(k / every)), t,
                   f"progressive(start={s0}, step={inc}, every={every}, max_new_tokens={t})")


def resolve_horizon(horizon: Horizon | Callable[[int], int] | int, step: int) -> int:
    """The horizon in force at ``step``: ``horizon(step)`` for callables, the value itself for an int.

    Raises:
        ValueError: the schedule returns something other than a positive int (horizon 0 included).
    """
    step = _step(step)
    raw = horizon(step) if callable(horizon) else horizon
    h = as_int(raw)  # also NumPy / torch integer scalars
    if h is None or h <= 0:
        raise ValueError(f"horizon at step {step} must be a positive int, got {raw!r} (from {horizon!r})")
    return h
