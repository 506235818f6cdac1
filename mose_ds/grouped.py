"""Every local expert of a MoE layer in a few grouped matrix products (`moe.expert_kernel`).

The per-expert kernel (`experts.LoopKernel`) runs up to MAX_RANGES product pairs per expert
(three products per range with SwiGLU): with E experts, 2 E MAX_RANGES products forward and
twice that backward, each one kernel launch on a GPU. Here the experts of a layer share one
plan. Their rows' hidden sizes are rounded up to multiples of GRANULE units and cut into at
most MAX_RANGES buckets (`experts.plan_ends` over the sizes of every expert's rows); a row runs
at its bucket's end with the units past its own size zeroed. Rows are laid out bucket by
bucket, widest first, and expert by expert inside a bucket, so each bucket is one grouped
product per projection over all experts (`torch._grouped_mm`: rows grouped by expert, weights
cut to the bucket's end): at most 3 MAX_RANGES products forward per layer, whatever the number
of experts, planned from the host histogram the layer already has (no device read). The work
is each row's size rounded up to its bucket's end: at least the per-expert kernel's (whose
ends are per expert and need no granule), by a few percent at most.

Grouped products want 16-byte strides, so bucket ends are multiples of GRANULE units, and the
model and expert hidden sizes must be multiples of GRANULE too (`supported`).

The products read the experts' weights as [L, H, D] stacks (`weight_stacks`). Under ZeRO-1/2
DeepSpeed keeps a layer's parameters in one flat buffer, expert after expert, so each stack is
a strided view of that buffer: no copy, always current. Otherwise (no ZeRO, inference) the
forward and the backward each stack them for their own use: a transient copy of one layer's
local expert weights (`memory.grouped_stack_bytes`).

Shape legend: N rows, D model dim, H expert hidden, U units of a bucket, L local experts,
B buckets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .experts import (MAX_RANGES, ExpertRows, SlimmableFFN, activate, activation_backward, plan_ends,
                      zero_missing_units)

GRANULE = 8   # units: 16 bytes in bf16, 32 in fp32


def supported(hidden_size: int, ffn_hidden_size: int) -> bool:
    """Whether the grouped kernel can run these shapes (its products' strides need it)."""
    return (hasattr(torch, "_grouped_mm") and hidden_size % GRANULE == 0
            and ffn_hidden_size % GRANULE == 0)


def auto_picks_grouped(device: torch.device, dtype: torch.dtype, hidden_size: int, ffn_hidden_size: int) -> bool:
    """`moe.expert_kernel: auto`: grouped in bf16 on NVIDIA compute capability 9.x (Hopper)
    and 10.x (B200, GB200), where torch's grouped product is one fused CUTLASS kernel that
    reads the group offsets on the device, and the per-expert loop's launches dominate small
    products. The loop elsewhere: on capability 8.x, 11.x and 12.x (RTX PRO 6000 Blackwell)
    torch's grouped product is a loop of products after a device-to-host copy of the
    offsets, so it would add a host sync per product to the loop's work; on ROCm and on CPU
    the loop measures faster (docs/performance.md)."""
    return (device.type == "cuda" and torch.version.hip is None and dtype == torch.bfloat16
            and supported(hidden_size, ffn_hidden_size) and torch.cuda.get_device_capability(device)[0] in (9, 10))


@dataclass
class Layout:
    """Where each row goes and what each bucket computes; buckets widest first."""
    order_N: torch.Tensor    # row i of the layout is input row order_N[i]
    ends: list[int]          # hidden units each bucket computes
    rows: list[int]          # rows in each bucket
    offs_BL: torch.Tensor    # int32 [buckets, L]: rows of experts 0..l inside each bucket
    empty_BL: torch.Tensor   # bool [buckets, L]: the expert has no row in the bucket
    units: int               # hidden units computed, summed over rows (FLOPs accounting)
    partial: list[bool]      # whether a bucket has rows narrower than its end (units to zero)


def plan_layout(rows: ExpertRows, hidden: int, max_ranges: int = MAX_RANGES) -> Layout:
    """The layout of `rows` in at most `max_ranges` buckets, planned on the host from their
    (expert, size) histogram; the device only sorts rows by (bucket, expert)."""
    counts_LM, device = rows.counts_LM, rows.m_N.device
    L = counts_LM.shape[0]
    hist_M = counts_LM.sum(0)                                              # rows per size
    sizes_U = hist_M[1:].nonzero().squeeze(1) + 1                          # ascending, positive
    grid_U = (sizes_U + GRANULE - 1) // GRANULE * GRANULE                # <= hidden (a multiple)
    grid_G, slot_U = torch.unique(grid_U, return_inverse=True)
    ends_J = plan_ends(grid_G, torch.zeros_like(grid_G).index_add_(0, slot_U, hist_M[sizes_U]), hidden,
                       max_ranges, granule=GRANULE)                       # ascending
    J = len(ends_J)
    bucket_U = torch.searchsorted(ends_J, sizes_U)                       # first end >= size
    count_JL = torch.zeros(J, L, dtype=counts_LM.dtype).index_add_(0, bucket_U, counts_LM[:, sizes_U].t())
    partial_J = torch.zeros(J, dtype=torch.long).index_add_(0, bucket_U, (sizes_U < ends_J[bucket_U]).long()) > 0
    count_BL, ends_B = count_JL.flip(0), ends_J.flip(0)                   # widest first
    bucket_N = torch.searchsorted(ends_J.to(device, non_blocking=True), rows.m_N)    # first end >= m
    order_N = torch.argsort((J - 1 - bucket_N) * L + rows.expert_N, stable=True)
    offs_BL = count_BL.cumsum(1).to(torch.int32).to(device, non_blocking=True)
    empty_BL = (count_BL == 0).to(device, non_blocking=True)
    rows_B = count_BL.sum(1)
    return Layout(order_N, ends_B.tolist(), rows_B.tolist(), offs_BL, empty_BL,
                  int((rows_B * ends_B).sum()), partial_J.flip(0).tolist())


def weight_stacks(experts: Sequence[SlimmableFFN], units: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One MoE layer's local expert weights as [L, units, D] stacks (up, down, gate or None;
    the first `units` hidden units, all the products read), detached: the grouped products
    read them, gradients still go to each expert's own parameters.

    When an expert weight lies at the same distance from the previous expert's in one
    storage (DeepSpeed's ZeRO-1/2 flat buffers, `engine.optimizer_groups` keeping a layer's
    experts in one buffer), the stack is a strided view: no copy, and always the current
    weights. Otherwise it is a copy, made at each call (the kernel's forward and backward each
    make and drop their own): a copy cached across calls could not know of optimizers that
    write weights through `.data` (DeepSpeed's do), which change neither a weight's storage
    nor its version, and one kept from forward to backward would hold a copy of every layer's
    experts at the end of the forward."""
    kinds = [[e.w_up for e in experts], [e.w_down for e in experts]]
    if experts[0].activation == "swiglu":
        kinds.append([e.w_gate for e in experts])
    views = [_strided_stack(ws) for ws in kinds]
    with torch.no_grad():
        stacks = [torch.stack([w[:units] for w in ws]) if view is None else view[:, :units]
                  for view, ws in zip(views, kinds)]
    return (*stacks, None)[:3]


def _strided_stack(ws: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """[L, *shape] view of equally spaced, contiguous same-shaped tensors of one storage, or None."""
    w0 = ws[0]
    storage = w0.untyped_storage().data_ptr()
    if not all(w.is_contiguous() and w.shape == w0.shape and w.dtype == w0.dtype
               and w.untyped_storage().data_ptr() == storage for w in ws):
        return None
    starts = [w.storage_offset() for w in ws]
    step = starts[1] - starts[0] if len(ws) > 1 else w0.numel()
    if step < w0.numel() or any(b - a != step for a, b in zip(starts, starts[1:])):
        return None
    return w0.detach().as_strided((len(ws), *w0.shape), (step, *w0.stride()), starts[0])


class GroupedKernel:
    """The expert kernel of `moe.expert_kernel: grouped` (module docstring)."""

    def __init__(self, max_ranges: int = MAX_RANGES):
        self.max_ranges = max_ranges

    def __call__(self, experts: Sequence[SlimmableFFN], rows: ExpertRows) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Outputs in the layout's order (bucket by bucket, expert by expert)."""
        layout = plan_layout(rows, experts[0].ffn_hidden_size, self.max_ranges)
        weights = [e.w_up for e in experts] + [e.w_down for e in experts]
        if experts[0].activation == "swiglu":
            weights += [e.w_gate for e in experts]
        order_N = layout.order_N
        y_ND = _GroupedFFN.apply(rows.x(order_N), rows.m_N.index_select(0, order_N), layout,
                                 lambda: weight_stacks(experts, layout.ends[0] if layout.ends else 0),
                                 len(experts), *weights)
        return y_ND, layout.units, order_N


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [n, K] @ b[l] [K, U] for the rows of each group l (2-D x 3-D: [n, U])."""
    return torch._grouped_mm(a, b, offs=offs)


def _gmm_reduce(a_Un: torch.Tensor, b_nD: torch.Tensor, layout: Layout, b: int) -> torch.Tensor:
    """a [U, n] @ b [n, D] over each expert's rows of bucket b (2-D x 2-D: [L, U, D]), for
    weight gradients. `a` must be a transposed contiguous [n, U] (the layout in which
    Hopper's kernel accepts empty groups); empty groups are zeroed here all the same, since
    not every device's kernel writes them."""
    out_LUD = torch._grouped_mm(a_Un, b_nD, offs=layout.offs_BL[b])
    return out_LUD.masked_fill_(layout.empty_BL[b].view(-1, 1, 1), 0)


class _GroupedFFN(torch.autograd.Function):
    """The grouped products, forward and backward by hand (as `experts._RangedFFN`, and for
    the same reasons): only pre-activations are kept for backward, and each bucket's weight
    gradient is added into one fp32 buffer over the units the widest bucket reaches, instead
    of autograd's full-size gradient per slice. (Each bucket's product is rounded to the
    weights' dtype before that sum: up to MAX_RANGES roundings per unit in bf16.)

    x_ND, m_N: rows in layout order; stacks: gives `weight_stacks` of the weights, which follow
    (L w_up, L w_down, then L w_gate with SwiGLU) so that autograd routes their gradients.
    """

    @staticmethod
    def forward(ctx, x_ND, m_N, layout, stacks, L, *weights):
        w_up, w_down, w_gate = stacks()
        outs, saved, r0 = [], [], 0
        for b, (U, n) in enumerate(zip(layout.ends, layout.rows)):
            x_nD, offs_L = x_ND[r0:r0 + n], layout.offs_BL[b]
            up_nU = _gmm(x_nD, w_up[:, :U].transpose(1, 2), offs_L)                  # [n, U]
            gate_nU = _gmm(x_nD, w_gate[:, :U].transpose(1, 2), offs_L) if w_gate is not None else None
            h_nU = _zero_missing(activate(up_nU, gate_nU), m_N[r0:r0 + n], layout, b)
            outs.append(_gmm(h_nU, w_down[:, :U], offs_L))                            # [n, D]
            saved += [up_nU, gate_nU]
            r0 += n
        ctx.layout, ctx.stacks, ctx.L, ctx.H = layout, stacks, L, weights[0].shape[0]
        ctx.save_for_backward(x_ND, m_N, *saved)
        return torch.cat(outs) if outs else x_ND.new_zeros(x_ND.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_ND):
        x_ND, m_N, *saved = ctx.saved_tensors
        layout, L = ctx.layout, ctx.L
        w_up, w_down, w_gate = ctx.stacks()
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[5:]
        H, D, dtype = ctx.H, w_up.shape[2], w_up.dtype
        reach = layout.ends[0] if layout.ends else 0                      # units any row has
        acc = [torch.zeros(L, reach, D, dtype=torch.float32, device=w.device)   # weight gradients
               if w is not None and any(want_w[k * L:(k + 1) * L]) else None
               for k, w in enumerate((w_up, w_down, w_gate))]
        d_up, d_down, d_gate = acc
        g_ND, dx_parts, r0 = g_ND.contiguous(), [], 0
        for b, (U, n) in enumerate(zip(layout.ends, layout.rows)):
            x_nD, g_nD, m_n, offs_L = x_ND[r0:r0 + n], g_ND[r0:r0 + n], m_N[r0:r0 + n], layout.offs_BL[b]
            up_nU, gate_nU = saved[2 * b:2 * b + 2]
            if d_down is not None:
                h_nU = _zero_missing(activate(up_nU, gate_nU), m_n, layout, b)
                d_down[:, :U] += _gmm_reduce(h_nU.t(), g_nD, layout, b)            # [L, U, D]
            dh_nU = _zero_missing(_gmm(g_nD, w_down[:, :U].transpose(1, 2), offs_L), m_n, layout, b)  # [n, U]
            dup_nU, dgate_nU = activation_backward(dh_nU, up_nU, gate_nU)
            if d_gate is not None:
                d_gate[:, :U] += _gmm_reduce(dgate_nU.t(), x_nD, layout, b)
            if d_up is not None:
                d_up[:, :U] += _gmm_reduce(dup_nU.t(), x_nD, layout, b)
            if want_x:
                dx_nD = _gmm(dup_nU, w_up[:, :U], offs_L)                               # [n, D]
                if dgate_nU is not None:
                    dx_nD += _gmm(dgate_nU, w_gate[:, :U], offs_L)
                dx_parts.append(dx_nD)
            r0 += n
        dx_ND = (torch.cat(dx_parts) if dx_parts else torch.zeros_like(x_ND)) if want_x else None
        present = [w is not None for w in (w_up, w_down, w_gate)]
        del w_up, w_down, w_gate, d_up, d_down, d_gate                    # stacks freed before the gradients
        grads = []
        for k, kind in enumerate(present):
            if kind:
                d, acc[k] = acc[k], None                                  # one buffer alive at a time
                grads += _weight_grad(d, H, dtype).unbind(0) if d is not None else [None] * L
        return (dx_ND, None, None, None, None, *(g if want else None for g, want in zip(grads, want_w)))


def _weight_grad(acc_LUD: torch.Tensor, H: int, dtype: torch.dtype) -> torch.Tensor:
    """[L, H, D] weight gradients in `dtype` from the fp32 sums over units 0..U-1 (the units
    past U no row reached: zero)."""
    L, U, D = acc_LUD.shape
    if U == H and dtype == acc_LUD.dtype:
        return acc_LUD
    grad_LHD = acc_LUD.new_empty(L, H, D, dtype=dtype)
    grad_LHD[:, U:].zero_()
    grad_LHD[:, :U] = acc_LUD
    return grad_LHD


def _zero_missing(h_nU: torch.Tensor, m_n: torch.Tensor, layout: Layout, b: int) -> torch.Tensor:
    """Zero, in place, the units of bucket b's rows past their sizes, if it has such rows.
    They are all wider than the next (narrower) bucket's end: only units from there on can
    be missing."""
    if layout.partial[b]:
        lo = layout.ends[b + 1] if b + 1 < len(layout.ends) else 0
        zero_missing_units(h_nU[:, lo:], m_n, lo, 0)
    return h_nU
