"""Every local expert of a MoE layer in a few grouped matrix products (`moe.expert_kernel`).

The per-expert kernel (`SlimmableFFN.forward_sorted`) runs up to MAX_RANGES product pairs per
expert (three products per range with SwiGLU) and syncs with the host once per expert: with
E experts, 2 E MAX_RANGES products forward and twice that backward, each one kernel launch on
a GPU. Here the experts of a layer share one plan. Their slots' hidden sizes are rounded up
to multiples of GRANULE units and cut into at most MAX_RANGES buckets (`experts.plan_ends`
over the sizes of every expert's slots); a slot runs at its bucket's end with the units past
its own size zeroed. Slots are laid out bucket by bucket, widest first, and expert by expert
inside a bucket, so each bucket is one grouped product per projection over all experts
(`torch._grouped_mm`: rows grouped by expert, weights cut to the bucket's end): at most
3 MAX_RANGES products forward per layer and one host sync, whatever the number of experts.
The work is each slot's size rounded up to its bucket's end: at least the per-expert
kernel's (whose ends are per expert and need no granule), by a few percent at most.

Grouped products want 16-byte strides, so bucket ends are multiples of GRANULE units, and the
model and expert hidden sizes must be multiples of GRANULE too (`supported`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .experts import SlimmableFFN, _zero_missing_units, plan_ends

GRANULE = 8   # units: 16 bytes in bf16, 32 in fp32


def supported(hidden_size: int, ffn_hidden_size: int) -> bool:
    """Whether the grouped kernel can run these shapes (its products' strides need it)."""
    return (hasattr(torch, "_grouped_mm") and hidden_size % GRANULE == 0
            and ffn_hidden_size % GRANULE == 0)


def auto_picks_grouped(device: torch.device, dtype: torch.dtype, hidden_size: int, ffn_hidden_size: int) -> bool:
    """`moe.expert_kernel: auto`: grouped in bf16 on NVIDIA Hopper (compute capability 9.x),
    where torch's grouped product is one fused kernel that reads the group offsets on the
    device, and the per-expert loop's launches and host syncs dominate small products. The
    loop elsewhere: on other GPUs torch's grouped product is either a loop of products after
    a host sync or not yet known to handle empty groups, and on CPU the loop measures faster
    (docs/performance.md)."""
    return (device.type == "cuda" and torch.version.hip is None and dtype == torch.bfloat16
            and supported(hidden_size, ffn_hidden_size) and torch.cuda.get_device_capability(device)[0] == 9)


@dataclass
class Layout:
    """Where each row goes and what each bucket computes; buckets widest first."""
    order_N: torch.Tensor    # row i of the layout is input row order_N[i]; empty slots last
    ends: list[int]          # hidden units each bucket computes
    rows: list[int]          # rows in each bucket
    offs_BE: torch.Tensor    # int32 [buckets, E]: rows of experts 0..e inside each bucket
    empty_BE: torch.Tensor   # bool [buckets, E]: the expert has no row in the bucket
    units: int               # hidden units computed, summed over rows (FLOPs accounting)
    partial: list[bool]      # whether a bucket has rows narrower than its end (units to zero)


def plan_layout(e_N: torch.Tensor, m_N: torch.Tensor, num_experts: int, hidden: int) -> Layout:
    """The layout of rows with experts e_N and hidden sizes m_N (0: an empty slot, which
    computes nothing). One host sync: the histogram of sizes."""
    E, device = num_experts, m_N.device
    hist_M = torch.zeros(hidden + 1, dtype=torch.long, device=device).index_add_(
        0, m_N, torch.ones_like(m_N)).cpu()                                # rows per size; the host sync
    sizes_U = hist_M[1:].nonzero().squeeze(1) + 1                          # ascending, positive
    counts_U = hist_M[sizes_U]
    grid_U = (sizes_U + GRANULE - 1) // GRANULE * GRANULE                # <= hidden (a multiple)
    grid_G, slot_U = torch.unique(grid_U, return_inverse=True)
    ends_B = plan_ends(grid_G, torch.zeros_like(grid_G).index_add_(0, slot_U, counts_U), hidden,
                       granule=GRANULE)                                   # ascending
    bucket_U = torch.searchsorted(ends_B, sizes_U)
    rows_B = torch.zeros_like(ends_B).index_add_(0, bucket_U, counts_U)
    partial_B = torch.zeros_like(ends_B).index_add_(0, bucket_U, (sizes_U < ends_B[bucket_U]).long()) > 0
    J = len(ends_B)
    bucket_N = torch.searchsorted(ends_B.to(device, non_blocking=True), m_N)    # first end >= m
    key_N = torch.where(m_N > 0, (J - 1 - bucket_N) * E + e_N, J * E)   # widest bucket first
    order_N = torch.argsort(key_N, stable=True)
    count_K = torch.zeros(J * E + 1, dtype=torch.long, device=device).index_add_(0, key_N, torch.ones_like(key_N))
    count_BE = count_K[:J * E].view(J, E)                               # (bincount would sync)
    ends, rows = ends_B.flip(0).tolist(), rows_B.flip(0).tolist()
    return Layout(order_N, ends, rows, count_BE.cumsum(1).to(torch.int32), count_BE == 0,
                  sum(n * U for n, U in zip(rows, ends)),
                  partial_B.flip(0).tolist())


def grouped_ffn(experts: Sequence[SlimmableFFN], x_ND: torch.Tensor, m_N: torch.Tensor,
                layout: Layout) -> torch.Tensor:
    """The experts on rows already in layout order (x_ND = x[layout.order_N], likewise m_N);
    outputs in the same order, empty slots zero. Every expert weight gets a gradient (zero
    for an expert without rows), as with the per-expert kernel."""
    weights = [e.w_up for e in experts] + [e.w_down for e in experts]
    if experts[0].activation == "swiglu":
        weights += [e.w_gate for e in experts]
    return _GroupedFFN.apply(x_ND, m_N, layout, len(experts), *weights)


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [n, K] @ b[e] [K, U] for the rows of each group e (2-D x 3-D: [n, U])."""
    return torch._grouped_mm(a, b, offs=offs)


def _gmm_reduce(a_Un: torch.Tensor, b_nD: torch.Tensor, layout: Layout, b: int) -> torch.Tensor:
    """a [U, n] @ b [n, D] over each expert's rows of bucket b (2-D x 2-D: [E, U, D]), for
    weight gradients. `a` must be a transposed contiguous [n, U] (the layout in which
    Hopper's kernel accepts empty groups); empty groups are zeroed here all the same, since
    not every device's kernel writes them."""
    out_EUD = torch._grouped_mm(a_Un, b_nD, offs=layout.offs_BE[b])
    return out_EUD.masked_fill_(layout.empty_BE[b].view(-1, 1, 1), 0)


class _GroupedFFN(torch.autograd.Function):
    """`grouped_ffn`, forward and backward by hand (as `experts._RangedFFN`, and for the same
    reasons): only pre-activations are kept for backward, and each bucket's weight gradient
    is added into one fp32 buffer over the units the widest bucket reaches, instead of
    autograd's full-size gradient per slice. (Each bucket's product is rounded to the weights'
    dtype before that sum: up to MAX_RANGES roundings per unit in bf16.) The per-expert
    weights are stacked into [E, H, D] in forward and again in backward rather than kept
    between them; the stacks are released before the gradients are converted.

    x_ND, m_N: rows in layout order; weights: E w_up, E w_down, then E w_gate (SwiGLU).
    """

    @staticmethod
    def forward(ctx, x_ND, m_N, layout, E, *weights):
        w_up, w_down, w_gate = _stacks(weights, E)
        outs, saved, r0 = [], [], 0
        for b, (U, n) in enumerate(zip(layout.ends, layout.rows)):
            x_nD, offs_E = x_ND[r0:r0 + n], layout.offs_BE[b]
            up_nU = _gmm(x_nD, w_up[:, :U].transpose(1, 2), offs_E)                  # [n, U]
            gate_nU = _gmm(x_nD, w_gate[:, :U].transpose(1, 2), offs_E) if w_gate is not None else None
            h_nU = _activate(up_nU, gate_nU, m_N[r0:r0 + n], layout, b)
            outs.append(_gmm(h_nU, w_down[:, :U], offs_E))                            # [n, D]
            saved += [up_nU, gate_nU]
            r0 += n
        ctx.layout, ctx.E, ctx.n_weights = layout, E, len(weights)
        ctx.save_for_backward(x_ND, m_N, *weights, *saved)
        return torch.cat(outs + [x_ND.new_zeros(x_ND.shape[0] - r0, x_ND.shape[1])])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_ND):
        x_ND, m_N, *rest = ctx.saved_tensors
        weights, saved, layout = rest[:ctx.n_weights], rest[ctx.n_weights:], ctx.layout
        w_up, w_down, w_gate = _stacks(weights, ctx.E)
        E, want_x, want_w = ctx.E, ctx.needs_input_grad[0], ctx.needs_input_grad[4:]
        H, D, dtype = w_up.shape[1], w_up.shape[2], w_up.dtype
        reach = layout.ends[0] if layout.ends else 0                      # units any row has
        acc = [torch.zeros(E, reach, D, dtype=torch.float32, device=w.device)   # weight gradients
               if w is not None and any(want_w[k * E:(k + 1) * E]) else None
               for k, w in enumerate((w_up, w_down, w_gate))]
        kinds = [w is not None for w in (w_up, w_down, w_gate)]
        d_up, d_down, d_gate = acc
        g_ND, dx_parts, r0 = g_ND.contiguous(), [], 0
        for b, (U, n) in enumerate(zip(layout.ends, layout.rows)):
            x_nD, g_nD, m_n, offs_E = x_ND[r0:r0 + n], g_ND[r0:r0 + n], m_N[r0:r0 + n], layout.offs_BE[b]
            up_nU, gate_nU = saved[2 * b:2 * b + 2]
            if d_down is not None:
                h_nU = _activate(up_nU, gate_nU, m_n, layout, b)
                d_down[:, :U] += _gmm_reduce(h_nU.t(), g_nD, layout, b)            # [E, U, D]
            dh_nU = _zero_missing(_gmm(g_nD, w_down[:, :U].transpose(1, 2), offs_E), m_n, layout, b)  # [n, U]
            if gate_nU is None:
                dup_nU = torch.ops.aten.gelu_backward(dh_nU, up_nU)
            else:
                dup_nU = dh_nU * F.silu(gate_nU)
                dgate_nU = torch.ops.aten.silu_backward(dh_nU.mul_(up_nU), gate_nU)
                if d_gate is not None:
                    d_gate[:, :U] += _gmm_reduce(dgate_nU.t(), x_nD, layout, b)
            if d_up is not None:
                d_up[:, :U] += _gmm_reduce(dup_nU.t(), x_nD, layout, b)
            if want_x:
                dx_nD = _gmm(dup_nU, w_up[:, :U], offs_E)                               # [n, D]
                if gate_nU is not None:
                    dx_nD += _gmm(dgate_nU, w_gate[:, :U], offs_E)
                dx_parts.append(dx_nD)
            r0 += n
        dx_ND = torch.cat(dx_parts + [x_ND.new_zeros(x_ND.shape[0] - r0, x_ND.shape[1])]) if want_x else None
        del w_up, w_down, w_gate, d_up, d_down, d_gate
        grads = []
        for k, present in enumerate(kinds):
            if present:
                d, acc[k] = acc[k], None                                  # one buffer alive at a time
                grads += _weight_grad(d, H, dtype).unbind(0) if d is not None else [None] * E
        return (dx_ND, None, None, None, *(g if want else None for g, want in zip(grads, want_w)))


def _weight_grad(acc_EUD: torch.Tensor, H: int, dtype: torch.dtype) -> torch.Tensor:
    """[E, H, D] weight gradients in `dtype` from the fp32 sums over units 0..U-1 (the units
    past U no row reached: zero)."""
    E, U, D = acc_EUD.shape
    if U == H and dtype == acc_EUD.dtype:
        return acc_EUD
    grad_EHD = acc_EUD.new_empty(E, H, D, dtype=dtype)
    grad_EHD[:, U:].zero_()
    grad_EHD[:, :U] = acc_EUD
    return grad_EHD


def _stacks(weights, E: int):
    """The per-expert weights as [E, H, D] stacks: up, down, gate (None without SwiGLU)."""
    w_up, w_down = torch.stack(weights[:E]), torch.stack(weights[E:2 * E])
    return w_up, w_down, torch.stack(weights[2 * E:]) if len(weights) > 2 * E else None


def _zero_missing(h_nU: torch.Tensor, m_n: torch.Tensor, layout: Layout, b: int) -> torch.Tensor:
    """Zero, in place, the units of bucket b's rows past their sizes, if it has such rows.
    They are all wider than the next (narrower) bucket's end: only units from there on can
    be missing."""
    if layout.partial[b]:
        lo = layout.ends[b + 1] if b + 1 < len(layout.ends) else 0
        _zero_missing_units(h_nU[:, lo:], m_n, lo, 0)
    return h_nU


def _activate(up_nU, gate_nU, m_n, layout: Layout, b: int) -> torch.Tensor:
    """Bucket b's hidden activation (GELU, or SwiGLU when there is a gate), missing units zeroed."""
    h_nU = F.gelu(up_nU) if gate_nU is None else F.silu(gate_nU) * up_nU
    return _zero_missing(h_nU, m_n, layout, b)
