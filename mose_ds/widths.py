"""Expert widths (paper sections 2.2-2.3): the grid, hidden sizes and the sampled training width.

A width policy maps the renormalised top-k router probabilities of a layer to one width
per routed (token, expert) slot: `policy(p_TK, layer) -> w_TK`. Policies are pure
functions and are passed explicitly into the model's forward; nothing here is global state.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

import torch

WidthPolicy = Callable[[torch.Tensor, int], torch.Tensor]


def uniform_policy(width: float) -> WidthPolicy:
    """Every selected expert of every layer runs at `width` (paper eq. 5 with w(x) = w)."""
    if not 0 < width <= 1:
        raise ValueError(f"width {width} is outside (0, 1]")

    def policy(p_TK: torch.Tensor, layer: int) -> torch.Tensor:
        return torch.full_like(p_TK, width, dtype=torch.float32)

    policy.width = width  # for logging only; the function is what the model uses
    return policy


FULL_WIDTH = uniform_policy(1.0)


def hidden_units(w: torch.Tensor, hidden: int) -> torch.Tensor:
    """m(w) = ceil(w * H), clamped to [1, H]; the epsilon absorbs float noise in w * H."""
    return torch.ceil(w.float() * hidden - 1e-4).clamp_(1, hidden).long()


def sample_width(grid: Sequence[float], step: int, seed: int) -> float:
    """The branch width of training step `step`: uniform over the grid, the same on every rank.

    Seeded by (seed, global step) alone, so ranks agree without communication and a
    resumed run draws the same widths as an uninterrupted one.
    """
    return random.Random(seed * 1_000_003 + step).choice(list(grid))
