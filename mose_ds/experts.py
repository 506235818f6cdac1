"""The slimmable expert and the per-expert kernels (paper section 2.2, eqs. 2 and 4).

An FFN d -> H -> d whose width-w version uses only the first m(w) = ceil(w * H) hidden
units: `W_up[:m]` and `W_down[:m]` (gate and up together for SwiGLU). Slicing, not
masking, so a width-w expert costs about w of the full one. Weights are stored
hidden-major ([H, D]) so every slice is a contiguous block of rows.

Expert kernels share one interface: `kernel(experts, rows) -> (y_ND, units, order_N)` takes
`ExpertRows` (rows grouped by local expert, widest first inside an expert, with their hidden
sizes and a host histogram of them) and returns the outputs, the hidden units it computed
(FLOPs accounting) and the order of its outputs. Each kernel orders rows as it needs, and the
inputs are gathered straight into that order (`ExpertRows.x`):

* `LoopKernel`: expert by expert, each in at most MAX_RANGES product pairs (`plan_ranges`);
* `grouped.GroupedKernel`: every expert at once in grouped products, bucket by bucket;
* `RelaxedKernel`: gamma calibration's differentiable soft prefix mask.

Kernels plan from the host histogram only: no kernel reads the device (the MoE layer's one
host sync brought the histogram), and backward reuses the forward's plan.

Shape legend: N rows, D model dim, H expert hidden, U units of one range, L local experts,
M = H + 1 hidden sizes (0..H).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

MAX_RANGES = 16    # hidden-unit ranges (product pairs) per expert call: one per width of the
                   # 16-point training grid, so grid-rounded widths execute exactly their units
RANGE_ALIGN = 64   # range ends fall on multiples of this many units (but the last), so the
                   # products' inner and outer sizes stay multiples of the GEMM kernels' tiles


def plan_ranges(sizes, counts, hidden: int, max_ranges: int = MAX_RANGES,
                align: int = RANGE_ALIGN) -> list[tuple[int, int, int, int]]:
    """The hidden-unit ranges `LoopKernel` runs for rows with these distinct positive
    sizes (ascending) and row counts (host tensors or lists): (lo, hi, n, full) per range,
    units lo..hi-1 running on the n widest rows, of which the `full` widest have all of them.
    The range ends are `plan_ends`."""
    sizes_U, counts_U = torch.as_tensor(sizes), torch.as_tensor(counts)
    ends_R = plan_ends(sizes_U, counts_U, hidden, max_ranges, align)
    starts_R = torch.cat([ends_R.new_zeros(1), ends_R[:-1]])
    above_U = torch.cat([counts_U.flip(0).cumsum(0).flip(0), counts_U.new_zeros(1)])  # rows >= sizes[u]
    n_R = above_U[torch.searchsorted(sizes_U, starts_R, right=True)]                 # rows wider than lo
    full_R = above_U[torch.searchsorted(sizes_U, ends_R)]                             # rows reaching hi
    return list(zip(*(v.tolist() for v in (starts_R, ends_R, n_R, full_R))))


def plan_ends(sizes_U: torch.Tensor, counts_U: torch.Tensor, hidden: int, max_ranges: int = MAX_RANGES,
              align: int = RANGE_ALIGN, granule: int = 1) -> torch.Tensor:
    """At most `max_ranges` ascending ends for rows with these distinct positive sizes
    (ascending, host tensor) and row counts; a row computes units up to the first end at or
    past its size, so the work is each row's size rounded up to an end.

    With at most `max_ranges` sizes the ends are the sizes (nothing wasted); otherwise they
    are the `max_ranges` candidate ends (each size rounded up to `align` units, or to
    hidden / max_ranges when that is finer, and the largest size) that minimise the total
    rounded work, by dynamic programming over the candidates: never more work than ends
    every hidden / max_ranges units. `granule`: the candidates' rounding is made a multiple
    of it (the grouped kernel's 16-byte strides), which can make it coarser than that."""
    if len(sizes_U) <= max_ranges:
        return sizes_U
    align = -(-min(align, -(-hidden // max_ranges)) // granule) * granule
    rounded_U = ((sizes_U + align - 1) // align * align).clamp(max=int(sizes_U[-1]))
    cand_K, slot_U = torch.unique(rounded_U, return_inverse=True)
    rows_K = torch.zeros_like(cand_K).index_add_(0, slot_U, counts_U)   # rows at each candidate
    return cand_K if len(cand_K) <= max_ranges else _cheapest_ends(cand_K, rows_K, max_ranges)


def _cheapest_ends(cand_K: torch.Tensor, rows_K: torch.Tensor, max_ranges: int) -> torch.Tensor:
    """At most `max_ranges` of the candidate ends, always the last, minimising the sum over
    rows of the first chosen end at or past the row's candidate (`rows_K[k]` rows at cand_K[k]).

    cost[g][k]: least work for the rows up to cand[k] with at most g + 1 ranges, the last
    ending at cand[k]; a range (cand[i], cand[k]] costs cand[k] x its rows. A few [K, K]
    tensor steps (K <= hidden / align + 1)."""
    K = len(cand_K)
    end_K = cand_K.double()
    upto_K = rows_K.double().cumsum(0)                                        # rows up to cand[k]
    # span_KK[k, i]: a range from just past cand[i] to cand[k] (i < k)
    span_KK = end_K[:, None] * (upto_K[:, None] - upto_K[None, :])
    span_KK.masked_fill_(torch.ones(K, K, dtype=torch.bool).triu(), float("inf"))
    cost_K = end_K * upto_K                                                   # one range
    choices = []
    for _ in range(max_ranges - 1):
        best_K, prev_K = (cost_K[None, :] + span_KK).min(dim=1)
        better_K = best_K < cost_K
        choices.append(torch.where(better_K, prev_K, -1).tolist())
        cost_K = torch.where(better_K, best_K, cost_K)
    picked, k = [K - 1], K - 1
    for choice in reversed(choices):
        if choice[k] >= 0:
            k = choice[k]
            picked.append(k)
    return cand_K[picked[::-1]]


def activate(up_nU: torch.Tensor, gate_nU: torch.Tensor | None) -> torch.Tensor:
    """The hidden activation: GELU of the up projection, or SwiGLU when there is a gate."""
    return F.gelu(up_nU) if gate_nU is None else F.silu(gate_nU) * up_nU


def activation_backward(dh_nU: torch.Tensor, up_nU: torch.Tensor, gate_nU: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of `activate` for its inputs (up, gate) from the hidden gradient, recomputing
    the activation from the saved pre-activations. Overwrites dh_nU (SwiGLU)."""
    if gate_nU is None:
        return torch.ops.aten.gelu_backward(dh_nU, up_nU), None
    dup_nU = dh_nU * F.silu(gate_nU)
    return dup_nU, torch.ops.aten.silu_backward(dh_nU.mul_(up_nU), gate_nU)


def zero_missing_units(h_nU: torch.Tensor, m_N: torch.Tensor, lo: int, full: int) -> torch.Tensor:
    """Zero, in place, the units of h (units lo.. of the first n rows, sorted widest first)
    that lie at or past each row's size. Only rows from `full` on can have such units."""
    n, U = h_nU.shape
    if full < n:
        units_U = torch.arange(lo, lo + U, device=h_nU.device)
        h_nU[full:].mul_((units_U < m_N[full:n, None]).to(h_nU.dtype))
    return h_nU


def inverse(order_N: torch.Tensor) -> torch.Tensor:
    """The inverse of a permutation of 0..N-1 (distinct indices: no atomic adds)."""
    inverse_N = torch.empty_like(order_N)
    inverse_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
    return inverse_N


def permute_rows(x_ND: torch.Tensor, order_N: torch.Tensor, inverse_N: torch.Tensor) -> torch.Tensor:
    """x[order] for a permutation `order` (with its `inverse`): a gather forward and a gather
    backward, where autograd's index_select would scatter-add the gradient."""
    return gather_rows(x_ND, order_N, lambda g_ND: g_ND.index_select(0, inverse_N))


def gather_rows(x_XD: torch.Tensor, index_N: torch.Tensor, backward: Callable[[torch.Tensor], torch.Tensor]
                ) -> torch.Tensor:
    """x[index] [N, D] whose gradient for x is `backward(g_ND)`: a deterministic gradient
    (gathers, fixed-order sums) where autograd's index_select backward adds atomically."""
    return _GatherRows.apply(x_XD, index_N, backward)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_XD, index_N, backward):
        ctx.backward = backward
        return x_XD.index_select(0, index_N)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_ND):
        return ctx.backward(g_ND), None, None


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

    def hidden(self, x_ND: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Hidden units lo..hi-1 of every row after the activation, in autograd ops."""
        gate = F.linear(x_ND, self.w_gate[lo:hi]) if self.activation == "swiglu" else None
        return activate(F.linear(x_ND, self.w_up[lo:hi]), gate)          # [N, hi - lo]

    def forward(self, x_ND: torch.Tensor, m: int) -> torch.Tensor:
        """All N rows at one hidden size m (1 <= m <= H)."""
        return self.ranged(x_ND, None, [(0, m, x_ND.shape[0], x_ND.shape[0])])   # [N, D]

    def sliced(self, x_ND: torch.Tensor, m: int) -> torch.Tensor:
        """All N rows at one hidden size m in plain autograd operations: half of `forward`'s
        operations, for the few rows of a decoding step, which has no backward."""
        return F.linear(self.hidden(x_ND, 0, m), self.w_down[:m].t())        # [N, D]

    def ranged(self, x_ND: torch.Tensor, m_N: torch.Tensor | None, ranges) -> torch.Tensor:
        """Rows sorted widest first (sizes m_N) through the hidden-unit `ranges` of `plan_ranges`."""
        gate = self.w_gate if self.activation == "swiglu" else None
        return _RangedFFN.apply(x_ND, m_N, ranges, self.w_up, self.w_down, gate)


@dataclass
class ExpertRows:
    """Kept (token, expert) slots as rows for this rank's local experts: grouped by local
    expert (0, 1, ...), widest first inside each expert. Their inputs are gathered when a
    kernel asks, in the order it wants (`x`): one gather from where they are (the tokens, or
    the rows received from other ranks), not a gather and then a reordering copy."""
    m_N: torch.Tensor            # hidden units of each row (>= 1)
    expert_N: torch.Tensor       # local expert of each row
    counts_LM: torch.Tensor      # host [L, H + 1]: rows per (local expert, hidden size)
    gather: Callable[[torch.Tensor | None], torch.Tensor]   # the inputs, in an order or this one
    w_N: torch.Tensor | None = None   # continuous widths (a relaxed forward only)

    def x(self, order_N: torch.Tensor | None = None) -> torch.Tensor:
        """The rows' inputs [N, D], in this order or as row order_N[i] at position i."""
        return self.gather(order_N)

    def rows_per_expert(self) -> list[int]:
        return self.counts_LM.sum(1).tolist()

    def sizes(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The distinct hidden sizes of one expert's rows (ascending) and their row counts."""
        counts_M = self.counts_LM[expert]
        sizes_U = counts_M.nonzero().squeeze(1)
        return sizes_U, counts_M[sizes_U]


class ExpertKernel(Protocol):
    """`kernel(experts, rows) -> (y_ND, units, order_N)`: the outputs, the hidden units
    computed, and the order the outputs are in (row order_N[i] at position i; None: the
    rows' own order), which the dispatcher's combine follows."""

    def __call__(self, experts: Sequence[SlimmableFFN], rows: ExpertRows
                 ) -> tuple[torch.Tensor, int, torch.Tensor | None]: ...


class LoopKernel:
    """Expert by expert: an expert's rows at one size run as one product pair; rows at several
    sizes run through at most MAX_RANGES hidden-unit ranges (`plan_ranges`), range [lo, hi)
    on the rows wider than lo (a prefix, rows being widest first), units a row does not have
    zeroed. Work is each row's size rounded up to a range end: proportional to the executed
    widths, in a bounded number of products whatever the number of distinct widths."""

    def __init__(self, max_ranges: int = MAX_RANGES):
        self.max_ranges = max_ranges

    def __call__(self, experts: Sequence[SlimmableFFN], rows: ExpertRows) -> tuple[torch.Tensor, int, None]:
        outs, units = [], 0
        parts = rows.rows_per_expert()
        for j, (expert, x_nD, m_n) in enumerate(zip(experts, rows.x().split(parts), rows.m_N.split(parts))):
            if not parts[j] and not torch.is_grad_enabled():
                outs.append(x_nD)               # no row, no gradient: nothing to run (decoding)
                continue
            sizes_U, counts_U = rows.sizes(j)
            if len(sizes_U) <= 1:
                # One size, or none: an idle expert still runs (on no row) so that its weights
                # get a zero gradient and every rank reduces the same gradients.
                m = int(sizes_U[0]) if len(sizes_U) else 1
                outs.append(expert(x_nD, m))
                units += x_nD.shape[0] * m
                continue
            ranges = plan_ranges(sizes_U, counts_U, expert.ffn_hidden_size, self.max_ranges)
            outs.append(expert.ranged(x_nD, m_n, ranges))
            units += sum(n * (hi - lo) for lo, hi, n, _ in ranges)
        return torch.cat(outs), units, None


class RelaxedKernel:
    """The differentiable relaxation used to calibrate gamma (`relaxed=True` forwards).

    Hidden unit j of row n is weighted by clamp(w_n * H - j, 0, 1): units below w_n * H
    count fully, the unit it falls into counts by its fractional part, the rest not at
    all. At w_n * H integral this equals the sliced expert exactly; in between it is the
    linear interpolation between the two neighbouring hard widths, so d(output)/d(w) is
    H times the contribution of the partial unit (finite, and non-zero unless that
    unit's activation is zero). An expert's rows run at its widest row's units (from the
    host histogram: no device read), which is also what is counted.
    """

    def __call__(self, experts: Sequence[SlimmableFFN], rows: ExpertRows) -> tuple[torch.Tensor, int, None]:
        outs, units = [], 0
        parts = rows.rows_per_expert()
        for j, (expert, x_nD, w_n) in enumerate(zip(experts, rows.x().split(parts), rows.w_N.split(parts))):
            sizes_U, _ = rows.sizes(j)
            M = int(sizes_U[-1]) if len(sizes_U) else 1
            units_M = torch.arange(M, device=x_nD.device, dtype=torch.float32)
            mask_nM = (w_n.float().unsqueeze(1) * expert.ffn_hidden_size - units_M).clamp(0, 1)
            outs.append((expert.hidden(x_nD, 0, M) * mask_nM.to(x_nD.dtype)) @ expert.w_down[:M])
            units += x_nD.shape[0] * M
        return torch.cat(outs), units, None


class _RangedFFN(torch.autograd.Function):
    """The hidden-unit ranges of `LoopKernel`, forward and backward by hand.

    Written out because autograd's backward of a weight slice `w[lo:hi]` materialises a
    zero [H, D] gradient per range and adds it to the total (one full weight gradient per
    range and weight, more memory traffic than the products themselves at small widths),
    and every `out += a @ b` makes a temporary. Here each range's weight gradient goes
    straight into its rows of one gradient buffer, outputs and input gradients accumulate
    in place (`addmm_`), and only pre-activations are kept for backward (activation and
    unit mask are recomputed): half of what autograd keeps for GELU.

    x_ND: rows sorted widest first; m_N: their sizes; ranges: (lo, hi, n, full) per range,
    units lo..hi-1 running on the first n rows, of which the first `full` have all of them.
    """

    @staticmethod
    def forward(ctx, x_ND, m_N, ranges, w_up, w_down, w_gate):
        out_ND = torch.empty_like(x_ND)
        out_ND[ranges[0][2]:].zero_()          # rows past the first range's (none, in practice)
        saved = []
        for lo, hi, n, full in ranges:
            x_nD = x_ND[:n]
            up_nU = x_nD @ w_up[lo:hi].t()                                   # [n, hi - lo]
            gate_nU = x_nD @ w_gate[lo:hi].t() if w_gate is not None else None
            h_nU = zero_missing_units(activate(up_nU, gate_nU), m_N, lo, full)
            _accumulate(out_ND[:n], h_nU, w_down[lo:hi], lo == 0)
            saved += [up_nU, gate_nU]
        ctx.ranges = ranges
        ctx.save_for_backward(x_ND, m_N, w_up, w_down, w_gate, *saved)
        return out_ND

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_ND):
        x_ND, m_N, w_up, w_down, w_gate, *saved = ctx.saved_tensors
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        m_max = ctx.ranges[-1][1]
        dx_ND = torch.empty_like(x_ND) if want_x else None
        if want_x:
            dx_ND[ctx.ranges[0][2]:].zero_()
        d_up, d_down, d_gate = (_grad_buffer(w, m_max) if want_w and w is not None else None
                                for w in (w_up, w_down, w_gate))
        for j, (lo, hi, n, full) in enumerate(ctx.ranges):
            up_nU, gate_nU = saved[2 * j:2 * j + 2]
            x_nD, g_nD = x_ND[:n], g_ND[:n]
            if want_w:
                h_nU = zero_missing_units(activate(up_nU, gate_nU), m_N, lo, full)
                torch.mm(h_nU.t(), g_nD, out=d_down[lo:hi])
            dh_nU = zero_missing_units(g_nD @ w_down[lo:hi].t(), m_N, lo, full)   # [n, hi - lo]
            dup_nU, dgate_nU = activation_backward(dh_nU, up_nU, gate_nU)
            if dgate_nU is not None:
                if want_w:
                    torch.mm(dgate_nU.t(), x_nD, out=d_gate[lo:hi])
                if want_x:
                    _accumulate(dx_ND[:n], dgate_nU, w_gate[lo:hi], lo == 0)
            if want_w:
                torch.mm(dup_nU.t(), x_nD, out=d_up[lo:hi])
            if want_x:
                _accumulate(dx_ND[:n], dup_nU, w_up[lo:hi], lo == 0 and w_gate is None)
        return dx_ND, None, None, d_up, d_down, d_gate


def _accumulate(out_nD: torch.Tensor, a_nU: torch.Tensor, b_UD: torch.Tensor, first: bool) -> None:
    """out += a @ b in place (out = a @ b for the first product into it): no temporary."""
    if first:
        torch.mm(a_nU, b_UD, out=out_nD)
    else:
        out_nD.addmm_(a_nU, b_UD)


def _grad_buffer(w_HD: torch.Tensor, m_max: int) -> torch.Tensor:
    """A gradient for w whose rows from m_max on are zero; the ranges fill the rest."""
    d_HD = torch.empty_like(w_HD)
    d_HD[m_max:].zero_()
    return d_HD
