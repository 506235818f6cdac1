"""Where tokens cross ranks: kept (token, expert) slots become rows for the local experts,
and their outputs come back as each token's weighted sum (paper eq. 5).

One dispatcher per placement, chosen once when the MoE layer is built:
`LocalDispatcher` (this rank holds every expert) and `AllToAllDispatcher` (experts spread
over an expert-parallel group; DeepSpeed's). Both take the same three steps:

1. `plan`: kept slots sorted by (expert, widest first) on the device, with their histogram
   per (expert, hidden size), an integer `index_add` (no host read). The all-to-all
   dispatcher exchanges these histograms in one small all-to-all (E x (H + 1) counts). Then
   one device-to-host copy brings what the host needs: how many rows go to and come from
   each rank, and the (local expert, size) histogram the expert kernels plan their products
   from. That copy is the MoE layer's one host sync; backward reuses the plan.
2. `dispatch`: the rows, gathered in that order. Across ranks each rank sends every other
   rank exactly the rows bound for its experts (an all-to-all-v with those split sizes,
   DeepSpeed AutoEP's design), and the receiver regroups them by local expert, widest first.
   Sizes do not travel with the rows: the receiver rebuilds them from the histograms.
3. `combine`: outputs back along the same splits, then each token gathers its K outputs and
   sums them weighted by p, in fp32 and in a fixed order (no atomic adds): the same inputs
   give bitwise the same outputs and gradients, run after run.

Nothing is sized by expert capacity: buffers, traffic and saved tensors follow kept rows (the
combine keeps each token's K output rows, a zero row for a dropped slot), and capacity only
decides which slots are kept (dropless keeps all of them).

Shape legend: T tokens, K top-k, D model dim, E experts, L local experts, R expert-parallel
ranks (E = R L), H expert hidden, M = H + 1 hidden sizes (0..H), N rows (kept slots).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from deepspeed import comm as dist

from .experts import ExpertRows, gather_rows, inverse, permute_rows


@dataclass
class Plan:
    """One forward's routing of rows: device index tensors and host counts."""
    slot_N: torch.Tensor          # flat slot (t K + k) of each row this rank sends, in send order
    token_N: torch.Tensor         # its token t
    row_TK: torch.Tensor          # the row each slot sends, N for a dropped slot
    expert_N: torch.Tensor        # local expert of each row this rank's experts run (their order)
    m_N: torch.Tensor             # hidden size of each of those rows
    counts_LM: torch.Tensor       # host [L, M]: rows this rank's experts run, per (expert, size)
    also: list[torch.Tensor] = field(default_factory=list)   # host copies of `plan(also=...)`
    send: list[int] | None = None          # rows sent to each rank (all-to-all-v)
    recv: list[int] | None = None          # rows received from each rank
    regroup_N: torch.Tensor | None = None  # the experts' row i is received row regroup_N[i]

    _reordered: dict = field(default_factory=dict, repr=False)   # (kind, order) -> indices

    def sent(self, order_N: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(slot_N, token_N, row_TK) with the rows in a kernel's order (row order_N[i] at i)."""
        if order_N is None:
            return self.slot_N, self.token_N, self.row_TK
        return self._once("sent", order_N, lambda: (
            self.slot_N[order_N], self.token_N[order_N],
            F.pad(inverse(order_N), (0, 1), value=order_N.numel())[self.row_TK]))   # N: no row

    def received(self, order_N: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Which received row each of the experts' rows is, in a kernel's order, and back."""
        def indices():
            regroup_N = self.regroup_N if order_N is None else self.regroup_N[order_N]
            return regroup_N, inverse(regroup_N)
        return self._once("received", order_N, indices)

    def _once(self, kind: str, order_N: torch.Tensor | None, make):
        """Indices for one order, computed once: dispatch and combine both ask for them."""
        key = (kind, None if order_N is None else id(order_N))
        if key not in self._reordered:
            self._reordered[key] = (order_N, make())    # the order is kept, so its id stays its own
        return self._reordered[key][1]


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Integer device tensors on the host, in one copy (one host sync for all of them)."""
    host = torch.cat([t.reshape(-1).long() for t in tensors]).cpu()
    return [part.view(t.shape) for part, t in zip(host.split([t.numel() for t in tensors]), tensors)]


def sort_slots(idx_TK: torch.Tensor, m_TK: torch.Tensor, keep_TK: torch.Tensor, num_experts: int,
               hidden: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kept slots in (expert, widest first) order and their histogram, on the device.

    Key of a slot: e M + (H - m), dropped slots past every expert. Returns the slots in key
    order (flat t K + k; kept ones first), their sorted keys, and the histogram [E, M] over
    (expert, H - size), whose flattening follows that order."""
    M, E = hidden + 1, num_experts
    key_S = torch.where(keep_TK, idx_TK * M + (hidden - m_TK), E * M).reshape(-1)
    key_S, slot_S = torch.sort(key_S, stable=True)
    counts = torch.zeros(E * M + 1, dtype=torch.int32, device=key_S.device).index_add_(
        0, key_S, torch.ones_like(key_S, dtype=torch.int32))
    return slot_S, key_S, counts[:E * M].view(E, M)


class LocalDispatcher:
    """Every expert on this rank: rows are the kept slots in (expert, widest first) order."""

    def __init__(self, num_experts: int, hidden: int):
        self.num_experts, self.hidden = num_experts, hidden

    def plan(self, idx_TK: torch.Tensor, m_TK: torch.Tensor, keep_TK: torch.Tensor,
             also: tuple[torch.Tensor, ...] = ()) -> Plan:
        """`also`: more integer device tensors to bring to the host in the same copy."""
        M = self.hidden + 1
        slot_S, key_S, counts_EM = sort_slots(idx_TK, m_TK, keep_TK, self.num_experts, self.hidden)
        counts_EM, *also = to_host(counts_EM, *also)
        N = int(counts_EM.sum())
        key_N = key_S[:N]
        return Plan(*sent_rows(slot_S[:N], idx_TK.shape), key_N // M, self.hidden - key_N % M,
                    counts_EM.flip(1), also)

    def dispatch(self, x_TD: torch.Tensor, plan: Plan, w_TK: torch.Tensor | None = None) -> ExpertRows:
        """The rows for the experts, gathered from the tokens in the order a kernel asks;
        `w_TK`: the slots' continuous widths (relaxed forwards)."""
        def gather(order_N):
            _, token_N, row_TK = plan.sent(order_N)
            return _gather_tokens(x_TD, token_N, row_TK)
        w_N = None if w_TK is None else w_TK.reshape(-1).index_select(0, plan.slot_N)
        return ExpertRows(plan.m_N, plan.expert_N, plan.counts_LM, gather, w_N)

    def combine(self, y_ND: torch.Tensor, p_TK: torch.Tensor, plan: Plan,
                order_N: torch.Tensor | None = None) -> torch.Tensor:
        """Each token's sum of p times its slots' outputs [T, D] (dropped slots add nothing);
        `order_N`: the order of the kernel's outputs."""
        slot_N, token_N, row_TK = plan.sent(order_N)
        return _Combine.apply(y_ND, p_TK, row_TK, slot_N, token_N)


class AllToAllDispatcher:
    """Experts spread over an expert-parallel group of R ranks, L = E / R on each (rank r
    holds experts r L .. r L + L - 1): rows cross ranks through all-to-all-v with exact split
    sizes. `group` is DeepSpeed's expert-parallel group, set when the engine creates it."""

    def __init__(self, num_experts: int, hidden: int, ranks: int):
        self.num_experts, self.hidden, self.ranks = num_experts, hidden, ranks
        self.group = None

    def plan(self, idx_TK: torch.Tensor, m_TK: torch.Tensor, keep_TK: torch.Tensor,
             also: tuple[torch.Tensor, ...] = ()) -> Plan:
        if self.group is None:
            raise RuntimeError("expert_parallel_size > 1 but no expert-parallel group: wrap the "
                               "model with the DeepSpeed engine (or call set_deepspeed_parallelism)")
        R, M = self.ranks, self.hidden + 1
        L = self.num_experts // R
        slot_S, key_S, counts_EM = sort_slots(idx_TK, m_TK, keep_TK, self.num_experts, self.hidden)
        recv_RLM = torch.empty_like(counts_EM).view(R, L, M)
        dist.all_to_all_single(recv_RLM, counts_EM.view(R, L, M), group=self.group)   # the counts exchange
        send_R, recv_R, counts_LM, *also = to_host(counts_EM.view(R, L * M).sum(1), recv_RLM.sum((1, 2)),
                                                   recv_RLM.sum(0), *also)
        send, recv = send_R.tolist(), recv_R.tolist()
        # Received rows come rank by rank, each rank's in (local expert, widest first) order:
        # their (rank, expert, H - size) groups follow from the received histogram.
        group_N = torch.repeat_interleave(torch.arange(R * L * M, device=recv_RLM.device), recv_RLM.reshape(-1),
                                          output_size=sum(recv))
        expert_N, u_N = group_N // M % L, group_N % M
        key_N, regroup_N = torch.sort(expert_N * M + u_N, stable=True)
        return Plan(*sent_rows(slot_S[:sum(send)], idx_TK.shape), key_N // M, self.hidden - key_N % M,
                    counts_LM.flip(1), also, send, recv, regroup_N)

    def dispatch(self, x_TD: torch.Tensor, plan: Plan, w_TK: torch.Tensor | None = None) -> ExpertRows:
        """Every rank sends its rows, then the received ones are taken in the order a kernel
        asks (regrouped by local expert, widest first, by default)."""
        sent_ND = _gather_tokens(x_TD, plan.token_N, plan.row_TK)
        received_ND = _AllToAllV.apply(sent_ND, self.group, plan.send, plan.recv)

        def gather(order_N):
            return permute_rows(received_ND, *plan.received(order_N))
        w_N = None
        if w_TK is not None:
            w_sent = w_TK.reshape(-1, 1).index_select(0, plan.slot_N)
            w_N = permute_rows(_AllToAllV.apply(w_sent, self.group, plan.send, plan.recv), *plan.received(None))
        return ExpertRows(plan.m_N, plan.expert_N, plan.counts_LM, gather, w_N.squeeze(1) if w_N is not None else None)

    def combine(self, y_ND: torch.Tensor, p_TK: torch.Tensor, plan: Plan,
                order_N: torch.Tensor | None = None) -> torch.Tensor:
        regroup_N, ungroup_N = plan.received(order_N)
        y_recv = permute_rows(y_ND, ungroup_N, regroup_N)                  # back in received order
        y_sent = _AllToAllV.apply(y_recv, self.group, plan.recv, plan.send)
        return _Combine.apply(y_sent, p_TK, plan.row_TK, plan.slot_N, plan.token_N)


class _AllToAllV(torch.autograd.Function):
    """all_to_all_single with exact split sizes (rows to and from each rank), whose backward
    sends the gradients back along the reversed splits."""

    @staticmethod
    def forward(ctx, x_ND, group, send: list[int], recv: list[int]):
        ctx.group, ctx.send, ctx.recv = group, send, recv
        out_ND = x_ND.new_empty(sum(recv), *x_ND.shape[1:])
        dist.all_to_all_single(out_ND, x_ND.contiguous(), output_split_sizes=recv, input_split_sizes=send,
                               group=group)
        return out_ND

    @staticmethod
    def backward(ctx, g_ND):
        return _AllToAllV.apply(g_ND.contiguous(), ctx.group, ctx.recv, ctx.send), None, None, None


def sent_rows(slot_N: torch.Tensor, shape_TK: torch.Size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows that are the slots slot_N (flat t K + k): the slots, their tokens, and the row of
    each slot [T, K] (N where no row is sent: a dropped slot)."""
    T, K = shape_TK
    row_S = torch.full((T * K,), slot_N.numel(), dtype=torch.long, device=slot_N.device)
    row_S[slot_N] = torch.arange(slot_N.numel(), device=slot_N.device)    # distinct indices
    return slot_N, slot_N // K, row_S.view(T, K)


def _by_slot(rows_ND: torch.Tensor, row_TK: torch.Tensor) -> torch.Tensor:
    """The rows at their slots [T, K, D], zero for a slot without one: a gather."""
    T, K = row_TK.shape
    if rows_ND.shape[0] < T * K:                               # some slot dropped: a zero row N
        rows_ND = F.pad(rows_ND, (0, 0, 0, 1))
    return rows_ND.index_select(0, row_TK.reshape(-1)).view(T, K, rows_ND.shape[1])


def sum_over_choices(y_TKD: torch.Tensor, p_TK: torch.Tensor | None = None) -> torch.Tensor:
    """sum over k of (p_tk times) y[t, k], in fp32, choice 0 first [T, D]: a fixed order."""
    out_TD = y_TKD[:, 0].to(torch.float32, copy=True)
    if p_TK is not None:
        out_TD.mul_(p_TK[:, :1])
    for k in range(1, y_TKD.shape[1]):
        if p_TK is None:
            out_TD.add_(y_TKD[:, k])
        else:
            out_TD.addcmul_(y_TKD[:, k], p_TK[:, k:k + 1])
    return out_TD


def _gather_tokens(x_TD: torch.Tensor, token_N: torch.Tensor, row_TK: torch.Tensor) -> torch.Tensor:
    """The token of each row [N, D]; in backward each token sums its rows' gradients in a
    fixed order, choice 0 first (autograd's index_select backward adds them atomically)."""
    return gather_rows(x_TD, token_N, lambda g_ND: sum_over_choices(_by_slot(g_ND, row_TK)).to(g_ND.dtype))


class _Combine(torch.autograd.Function):
    """out_t = sum_k p_tk y_(t,k) [T, D]: the rows placed at their slots (zero for a dropped
    slot) and summed weighted by p, in fp32 and choice 0 first, with no atomic adds forward
    or backward. Keeps the rows in slot order (model dtype) for p's gradient."""

    @staticmethod
    def forward(ctx, y_ND, p_TK, row_TK, slot_N, token_N):
        y_TKD = _by_slot(y_ND, row_TK)
        ctx.save_for_backward(y_TKD, p_TK, slot_N, token_N)
        return sum_over_choices(y_TKD, p_TK.float()).to(y_ND.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_TD):
        y_TKD, p_TK, slot_N, token_N = ctx.saved_tensors
        g_TD = g_TD.float()
        dy_ND = dp_TK = None
        if ctx.needs_input_grad[0]:    # row n is slot (t, k) = slot_N[n]: p_tk g_t
            p_N = p_TK.reshape(-1).index_select(0, slot_N).float()
            dy_ND = (g_TD.index_select(0, token_N) * p_N.unsqueeze(1)).to(y_TKD.dtype)
        if ctx.needs_input_grad[1]:
            dp_TK = torch.stack([(y_TKD[:, k].float() * g_TD).sum(-1) for k in range(p_TK.shape[1])],
                                dim=1).to(p_TK.dtype)
        return dy_ND, dp_TK, None, None, None
