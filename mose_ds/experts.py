"""The slimmable expert (paper section 2.2, eqs. 2 and 4).

An FFN d -> H -> d whose width-w version uses only the first m(w) = ceil(w * H) hidden
units: `W_up[:m]` and `W_down[:m]` (gate and up together for SwiGLU). Slicing, not
masking, so a width-w expert costs about w of the full one. Weights are stored
hidden-major ([H, D]) so every slice is a contiguous block of rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .widths import hidden_units

MAX_RANGES = 16   # hidden-unit ranges (product pairs) per expert call when widths are many


def range_ends(m_N: torch.Tensor, hidden: int) -> list[int]:
    """Ends of the hidden-unit ranges `forward_slots` computes: every distinct positive size
    when there are at most MAX_RANGES, else multiples of ceil(hidden / MAX_RANGES) and the
    largest size."""
    sizes = torch.unique(m_N[m_N > 0]).tolist()
    if len(sizes) <= MAX_RANGES:
        return sizes
    step = math.ceil(hidden / MAX_RANGES)
    return list(range(step, sizes[-1], step)) + [sizes[-1]]


class SlimmableFFN(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str = "gelu"):
        super().__init__()
        if activation not in ("gelu", "swiglu"):
            raise ValueError(f"activation {activation!r}: expected 'gelu' or 'swiglu'")
        self.activation = activation
        self.ffn_hidden_size = ffn_hidden_size
        shape = (ffn_hidden_size, hidden_size)
        if activation == "swiglu":
            self.w_gate = nn.Parameter(torch.empty(shape))
        self.w_up = nn.Parameter(torch.empty(shape))
        self.w_down = nn.Parameter(torch.empty(shape))

    def _hidden(self, x_ND: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Hidden units lo..hi-1 of every row after the activation (SwiGLU: gated)."""
        if self.activation == "swiglu":
            return F.silu(F.linear(x_ND, self.w_gate[lo:hi])) * F.linear(x_ND, self.w_up[lo:hi])
        return F.gelu(F.linear(x_ND, self.w_up[lo:hi]))                 # [N, hi - lo]

    def forward(self, x_ND: torch.Tensor, m: int) -> torch.Tensor:
        """All N rows at one hidden size m (1 <= m <= H)."""
        return self._hidden(x_ND, 0, m) @ self.w_down[:m]               # [N, D]

    def forward_slots(self, x_ND: torch.Tensor, m_N: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Each row at its own hidden size; rows with m = 0 are empty slots and stay zero.
        Returns the output and the hidden units computed (summed over rows: FLOPs accounting).

        Rows are sorted widest first and the hidden units cut into ranges [lo, hi); range j
        runs one up and one down product on the rows wider than lo (a prefix of the sorted
        rows), with the units a row does not have zeroed. Ranges end at each distinct size
        when there are at most MAX_RANGES of them (nothing to zero), else every
        ceil(H / MAX_RANGES) units, so the work is the sum of the rows' sizes, each rounded
        up to a range end: proportional to the executed widths, in a bounded number of
        products whatever the number of distinct widths.
        """
        N = x_ND.shape[0]
        m_max = int(m_N.max()) if N else 0
        if m_max == 0:
            # No slot for this expert: still return an output that depends on its weights
            # (with zero gradient), so every rank reduces the same gradients and enters the
            # same backward all-to-alls whatever the routing did.
            return F.pad(self(x_ND[:0], 1), (0, 0, 0, N)), 0
        if int(m_N.min()) == m_max:
            return self(x_ND, m_max), N * m_max                         # every row, one width
        m_sorted, order_N = torch.sort(m_N, descending=True, stable=True)
        x_sorted = x_ND.index_select(0, order_N)
        ends = range_ends(m_sorted, self.ffn_hidden_size)
        ends_J = torch.tensor(ends, device=m_N.device)
        starts = [0] + ends[:-1]
        # rows reaching into each range, and rows covering it entirely (one host sync)
        counts = torch.stack([(m_sorted > torch.tensor(starts, device=m_N.device)[:, None]).sum(1),
                              (m_sorted >= ends_J[:, None]).sum(1)]).tolist()
        out_ND, units = torch.zeros_like(x_ND), 0
        for lo, hi, n, full in zip(starts, ends, *counts):
            h_nU = self._hidden(x_sorted[:n], lo, hi)
            if full < n:   # rows narrower than hi: zero their units from their own size on
                units_U = torch.arange(lo, hi, device=m_N.device)
                h_nU = h_nU * (units_U < m_sorted[:n, None]).to(h_nU.dtype)
            out_ND[:n] += h_nU @ self.w_down[lo:hi]
            units += n * (hi - lo)
        return torch.zeros_like(out_ND).index_copy(0, order_N, out_ND), units

    def forward_relaxed(self, x_ND: torch.Tensor, w_N: torch.Tensor) -> torch.Tensor:
        """The differentiable relaxation of `forward_slots` used to calibrate gamma.

        Hidden unit j of row n is weighted by clamp(w_n * H - j, 0, 1): units below w_n * H
        count fully, the unit it falls into counts by its fractional part, the rest not at
        all. At w_n * H integral this equals the sliced expert exactly; in between it is the
        linear interpolation between the two neighbouring hard widths, so d(output)/d(w) is
        H times the contribution of the partial unit (finite, and non-zero unless that
        unit's activation is zero). Rows run at the largest width of the group.
        """
        H = self.ffn_hidden_size
        if x_ND.shape[0] == 0:
            return self(x_ND, 1)
        M = int(hidden_units(w_N.detach().max(), H))
        units_M = torch.arange(M, device=x_ND.device, dtype=torch.float32)
        mask_NM = (w_N.float().unsqueeze(1) * H - units_M).clamp(0, 1).to(x_ND.dtype)
        return (self._hidden(x_ND, 0, M) * mask_NM) @ self.w_down[:M]   # [N, D]
