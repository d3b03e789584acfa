"""Horizon schedules: how many tokens a rollout may generate at training step ``k``.

Truncated on-policy distillation (TOPD) distills on rollouts cut to a fraction of the full length; progressive
OPD (POPD) grows the horizon during training. Every schedule is a callable ``horizon(step) -> H``; any plain
callable with that signature works wherever a :class:`Horizon` does.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class Horizon:
    """A horizon schedule ``step -> H`` (tokens to generate), built by :meth:`full`, :meth:`truncated` or
    :meth:`progressive`. ``max_new_tokens`` is the largest horizon it can return."""

    def __init__(self, fn: Callable[[int], int], max_new_tokens: int, description: str) -> None:
        self._fn = fn
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        self.description = description

    def __call__(self, step: int) -> int:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        return self._fn(step)

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
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
        h = max(1, min(t, round(ratio * t)))
        return cls(lambda step: h, t, f"truncated(ratio={ratio}, max_new_tokens={t})")

    @classmethod
    def progressive(cls, start: int, step: int, every: int, max_new_tokens: int) -> Horizon:
        """POPD: ``H_k = min(max_new_tokens, start + step * floor(k / every))``."""
        t = _positive_int("max_new_tokens", max_new_tokens)
        s0 = _positive_int("start", start)
        every = _positive_int("every", every)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step (the horizon increment) must be a non-negative int, got {step!r}")
        inc = step
        return cls(lambda k: min(t, s0 + inc * math.floor(k / every)), t,
                   f"progressive(start={s0}, step={inc}, every={every}, max_new_tokens={t})")


def resolve_horizon(horizon: Horizon | Callable[[int], int] | int, step: int) -> int:
    """The horizon in force at ``step``: ``horizon(step)`` for callables, the value itself for an int.

    Raises:
        ValueError: the schedule returns something other than a positive int (horizon 0 included).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    h = horizon(step) if callable(horizon) else horizon
    if not isinstance(h, bool) and hasattr(h, "__index__"):
        h = operator.index(h)  # numpy / torch integer scalars
    if isinstance(h, bool) or not isinstance(h, int) or h <= 0:
        raise ValueError(f"horizon at step {step} must be a positive int, got {h!r} (from {horizon!r})")
    return h
