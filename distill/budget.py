"""The synthetic-token budget: how many tokens a teacher generates for its students, fixed by a rule before the
run (not tuned afterwards), so that no synthetic window is used twice."""
from __future__ import annotations

import math

from distill.mixture import mixture_steps

SYNTHETIC_MARGIN = 1.1  # synthetic windows generated per window a student is expected to draw (plus 16)


def synthetic_budget(real_tokens: int, context: int, batch_size: int, epochs: int, w: float) -> int:
    """The stated rule, fixed before a run: enough synthetic tokens for one pass of one student.

    A student draws steps x batch x w synthetic windows in expectation (steps = real windows x epochs / (1 - w) /
    batch, distill.mixture); the teacher makes SYNTHETIC_MARGIN times that plus 16 windows of `context` tokens,
    so no synthetic window is used twice (distill records the passes it made in mixture.json)."""
    real_windows = -(-(real_tokens - 1) // context)
    steps = mixture_steps(real_windows, batch_size, epochs, w)
    return (math.ceil(SYNTHETIC_MARGIN * steps * batch_size * w) + 16) * context
