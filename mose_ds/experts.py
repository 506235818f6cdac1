"""The slimmable expert (paper section 2.2, eqs. 2 and 4).

An FFN d -> H -> d whose width-w version uses only the first m(w) = ceil(w * H) hidden
units: `W_up[:m]` and `W_down[:m]` (gate and up together for SwiGLU). Slicing, not
masking, so a width-w expert costs about w of the full one. Weights are stored
hidden-major ([H, D]) so every slice is a contiguous block of rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .widths import hidden_units


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

    def forward(self, x_ND: torch.Tensor, m: int) -> torch.Tensor:
        """All N rows at one hidden size m (1 <= m <= H)."""
        if self.activation == "swiglu":
            h_NM = F.silu(F.linear(x_ND, self.w_gate[:m])) * F.linear(x_ND, self.w_up[:m])
        else:
            h_NM = F.gelu(F.linear(x_ND, self.w_up[:m]))
        return h_NM @ self.w_down[:m]                                   # [N, D]

    def forward_slots(self, x_ND: torch.Tensor, m_N: torch.Tensor) -> torch.Tensor:
        """Each row at its own hidden size; rows with m = 0 are empty slots and stay zero.

        Rows are grouped by hidden size and each group runs as one sliced FFN, so the
        work is proportional to the sum of executed widths.
        """
        N = x_ND.shape[0]
        sizes = torch.unique(m_N[m_N > 0]).tolist()
        if sizes and len(sizes) == 1 and int(m_N.min()) > 0:
            return self(x_ND, sizes[0])                                 # every row, one width
        out_ND = None
        for m in sizes:
            rows = (m_N == m).nonzero().squeeze(1)
            n = rows.numel()
            if out_ND is None and int(rows[-1]) == n - 1:
                # The common case (one width, slots filled from position 0): a contiguous
                # prefix, so slice and pad instead of gathering and scattering.
                out_ND = F.pad(self(x_ND[:n], m), (0, 0, 0, N - n))
                continue
            if out_ND is None:
                out_ND = torch.zeros_like(x_ND)
            out_ND = out_ND.index_copy(0, rows, self(x_ND.index_select(0, rows), m))
        if out_ND is None:
            # No slot for this expert: still return an output that depends on its weights
            # (with zero gradient), so every rank reduces the same gradients and enters the
            # same backward all-to-alls whatever the routing did.
            out_ND = F.pad(self(x_ND[:0], 1), (0, 0, 0, N))
        return out_ND

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
        if self.activation == "swiglu":
            h_NM = F.silu(F.linear(x_ND, self.w_gate[:M])) * F.linear(x_ND, self.w_up[:M])
        else:
            h_NM = F.gelu(F.linear(x_ND, self.w_up[:M]))
        return (h_NM * mask_NM) @ self.w_down[:M]                       # [N, D]
