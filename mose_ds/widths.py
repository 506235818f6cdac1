"""Expert widths (paper sections 2.2-2.4): the grid, hidden sizes, and the width policies.

A width policy maps the renormalised top-k router probabilities of a layer to one width
per routed (token, expert) slot: `policy(p_TK, layer) -> w_TK`, `layer` being the index of
the MoE layer. Policies are pure functions passed explicitly into the model's forward;
nothing here is global state.

Policies (paper section 2.4; DESIGN section 4):
* uniform: every selected expert at one width w;
* normalised probability: `s_i = p_i ** gamma`, `q_i = s_i / sum s`,
  `w_i = clip(Gamma * q_i, wmin, wmax)` with gamma = 1; Gamma is the per-token budget in
  full-expert units (Gamma = k is plain MoE at full width);
* budgeted with learned gamma: the same map with gamma from a calibration table (one value
  shared by all MoE layers, or one per layer).
Options: rounding the deployed widths to the grid, and `exact_budget`, which redistributes
what clipping removed or added over the unclipped experts so that a token's widths sum to
Gamma whenever k * wmin <= Gamma <= k * wmax.

Policies are frozen dataclasses, called as `policy(p_TK, layer, relaxed)`. A relaxed forward
(gamma calibration; `relaxed=True` passed to the model) keeps widths continuous, and the MoE
layer then weights hidden unit j by clamp(w * H - j, 0, 1) instead of slicing
(`experts.RelaxedKernel`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

class WidthPolicy(Protocol):
    """`policy(p_TK, layer, relaxed) -> w_TK`; `relaxed`: the forward is gamma calibration's
    differentiable one, so widths stay continuous (no grid rounding). A policy with a
    `top_k` other than None also routes each token to that many experts (k' <= the trained
    k: routing transfer on the same weights, as a self-speculative draft does)."""

    def __call__(self, p_TK: torch.Tensor, layer: int, relaxed: bool = False) -> torch.Tensor: ...


@dataclass(frozen=True)
class UniformPolicy:
    """Every selected expert of every layer runs at `width` (paper eq. 5 with w(x) = w)."""
    width: float
    top_k: int | None = None

    def __post_init__(self):
        if not 0 < self.width <= 1:
            raise ValueError(f"width {self.width} is outside (0, 1]")

    def __call__(self, p_TK: torch.Tensor, layer: int, relaxed: bool = False) -> torch.Tensor:
        return torch.full_like(p_TK, self.width, dtype=torch.float32)


FULL_WIDTH = UniformPolicy(1.0)


def hidden_units(w: torch.Tensor, hidden: int, quantum: int = 1) -> torch.Tensor:
    """m(w) = ceil(w * H), clamped to [1, H]; the epsilon absorbs float noise in w * H.

    `quantum` > 1 rounds m up to a multiple of it (at most H): matrix shapes that suit
    tensor cores, paid for in FLOPs (the executed units are what is counted)."""
    m = torch.ceil(w.float() * hidden - 1e-4).clamp_(1, hidden).long()
    if quantum > 1:
        m = (torch.div(m + quantum - 1, quantum, rounding_mode="floor") * quantum).clamp_(max=hidden)
    return m


def sample_width(grid: Sequence[float], step: int, seed: int) -> float:
    """The branch width of training step `step`: uniform over the grid, the same on every rank.

    Seeded by (seed, global step) alone, so ranks agree without communication and a
    resumed run draws the same widths as an uninterrupted one.
    """
    return random.Random(seed * 1_000_003 + step).choice(list(grid))


# ---------------------------------------------------------------------------------------
# Router-conditioned widths: pure maths (T tokens, K selected experts per token).

def allocation(p_TK: torch.Tensor, gamma: torch.Tensor | float) -> torch.Tensor:
    """q_i = p_i^gamma / sum_j p_j^gamma (paper eqs. 8-9), computed in log space so that a
    large gamma or a tiny probability neither overflows nor gives 0/0."""
    logits_TK = torch.as_tensor(gamma, dtype=torch.float32) * p_TK.float().clamp_min(1e-30).log()
    return torch.softmax(logits_TK, dim=-1)


def budget_widths(q_TK: torch.Tensor, budget: float, wmin: float, wmax: float) -> torch.Tensor:
    """w_i = clip(Gamma * q_i, wmin, wmax) (paper eqs. 10-11)."""
    return (budget * q_TK).clamp(wmin, wmax)


def exact_budget_widths(q_TK: torch.Tensor, budget: float, wmin: float, wmax: float,
                        iters: int = 50) -> torch.Tensor:
    """w_i = clip(lam * q_i, wmin, wmax) with lam chosen per token so that sum_i w_i = Gamma.

    What clipping removes from (or adds to) one expert is redistributed over the unclipped
    experts in proportion to q. The sum is continuous and non-decreasing in lam, so lam is
    found by bisection; then lam is recomputed in closed form from the clipped sets,
    `lam = (Gamma - n_low * wmin - n_high * wmax) / sum_free q`, which makes the result exact
    and differentiable in q. An infeasible budget (outside [K wmin, K wmax]) gives all
    widths at the nearer bound.
    """
    q_TK = q_TK.float()
    K = q_TK.shape[-1]
    lo = torch.zeros(q_TK.shape[:-1] + (1,), dtype=q_TK.dtype, device=q_TK.device)
    hi = (wmax / q_TK.detach().min().clamp_min(1e-12)).expand_as(lo).clone()   # no host read
    with torch.no_grad():
        for _ in range(iters):
            mid = (lo + hi) / 2
            over = (mid * q_TK).clamp(wmin, wmax).sum(-1, keepdim=True) > budget
            hi = torch.where(over, mid, hi)
            lo = torch.where(over, lo, mid)
        lam = (lo + hi) / 2
        low_TK = lam * q_TK <= wmin
        high_TK = lam * q_TK >= wmax
    free_TK = ~(low_TK | high_TK)
    rest = budget - wmin * low_TK.sum(-1, keepdim=True) - wmax * high_TK.sum(-1, keepdim=True)
    q_free = (q_TK * free_TK).sum(-1, keepdim=True)
    lam_exact = rest / q_free.clamp_min(1e-12)
    w_TK = torch.where(low_TK, torch.full_like(q_TK, wmin),
                       torch.where(high_TK, torch.full_like(q_TK, wmax), lam_exact * q_TK))
    if budget <= K * wmin or budget >= K * wmax:
        w_TK = torch.full_like(q_TK, wmin if budget <= K * wmin else wmax)
    return w_TK


def round_to_grid(w: torch.Tensor, grid: Sequence[float]) -> torch.Tensor:
    """Each width to the nearest grid point (ties to the larger)."""
    g = torch.tensor(sorted(grid), dtype=torch.float32).to(w.device, non_blocking=True)   # no host wait
    dist = (w.float().unsqueeze(-1) - g).abs()
    # flip so that argmin picks the larger of two equally near points
    return g.flip(0)[dist.flip(-1).argmin(-1)]


@dataclass(frozen=True, eq=False)
class NormProbPolicy:
    """Router-conditioned widths under budget Gamma; `gamma` is one value for every MoE layer
    or a sequence with one value per MoE layer (a tensor keeps its autograd graph, which is
    how calibration learns it). `grid` rounds the deployed widths to the grid (not in a
    relaxed forward, whose point is a gradient)."""
    budget: float
    gamma: float | Sequence[float] | torch.Tensor = 1.0
    wmin: float = 0.25
    wmax: float = 1.0
    grid: Sequence[float] | None = None
    exact_budget: bool = False
    top_k: int | None = None

    def __post_init__(self):
        if not 0 < self.wmin <= self.wmax <= 1:
            raise ValueError(f"widths need 0 < wmin <= wmax <= 1, got wmin={self.wmin}, wmax={self.wmax}")
        if self.budget <= 0:
            raise ValueError(f"budget {self.budget} must be > 0")
        gammas = self.gamma if isinstance(self.gamma, torch.Tensor) else torch.tensor(self.gamma, dtype=torch.float32)
        if (gammas.detach() <= 0).any():
            raise ValueError(f"gamma must be > 0, got {gammas.tolist()}")
        object.__setattr__(self, "gamma", gammas)

    def __call__(self, p_TK: torch.Tensor, layer: int, relaxed: bool = False) -> torch.Tensor:
        g = self.gamma if self.gamma.dim() == 0 else self.gamma[layer]
        q_TK = allocation(p_TK, g.to(p_TK.device, non_blocking=True))     # no host wait
        if self.exact_budget:
            w_TK = exact_budget_widths(q_TK, self.budget, self.wmin, self.wmax)
        else:
            w_TK = budget_widths(q_TK, self.budget, self.wmin, self.wmax)
        if self.grid is not None and not relaxed:
            w_TK = round_to_grid(w_TK, self.grid)
        return w_TK
