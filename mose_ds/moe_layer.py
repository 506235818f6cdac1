"""The slimmable MoE layer: DeepSpeed's MoE machinery with our gate and width-carrying slots.

Paper eq. 5: y = sum_i p_i * E_i^{w_i}(x) over the top-k experts of each token.

`SlimmableMoE` subclasses `deepspeed.moe.layer.MoE`, so the DeepSpeed engine recognises it:
it creates the expert-parallel groups, puts expert parameters into MoE optimizer groups and
writes one checkpoint file per expert. We keep DeepSpeed's `Experts` container (and with it
the expert-parameter tags) but replace its gate and its einsum dispatch:

* the gate (`Router`) is fp32, bias-free, softmax over the top-k logits, no sampling noise;
* dispatch is index-based: kept (token, expert) slots are gathered in expert-major order,
  each with its own hidden size m(w). On one rank every expert runs its contiguous segment
  (with the grouped kernel all experts run together, on slots laid out by width bucket and
  expert: `grouped.py`); with expert parallelism the slots are packed into flat `[E * C, D]`
  capacity blocks that cross ranks, with their hidden sizes, through DeepSpeed's all-to-all
  over its expert-parallel group. Results are combined with `index_add`. Nothing is ever
  `[T, E, C]`: memory grows linearly with tokens.

Shape legend: S sequence, B batch, T = S * B tokens, D model dim, E experts,
K top-k, C capacity, R expert-parallel ranks, L local experts (E = R * L), H expert hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from deepspeed import comm as dist
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import _AllToAll
from torch import nn

from . import grouped
from .config import MoEConfig
from .experts import SlimmableFFN
from .gating import (RouterSpec, RoutingStats, assign_slots, expert_capacity, load_balance_loss,
                     router_z_loss, routing_stats, sequence_balance_loss, top_k_routing)
from .widths import WidthPolicy, hidden_units


class Router(nn.Module):
    """Linear router without bias; logits and softmax are computed in fp32 whatever the
    training precision (under bf16 the stored weight is bf16, its master copy fp32 in the
    optimizer, as for every other weight).

    Stands in DeepSpeed's `TopKGate` slot, hence `_set_ep_group` (the engine calls it).
    """

    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.ep_group = None

    def _set_ep_group(self, ep_group) -> None:
        self.ep_group = ep_group

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return F.linear(x_TD.float(), self.weight.float())             # [T, E] fp32


@dataclass
class RoutingInfo:
    """What one MoE forward returns besides its output: the auxiliary loss (with grad)
    and detached diagnostics. Returned explicitly, never stashed on the module."""
    aux_loss: torch.Tensor
    stats: RoutingStats
    mean_width: torch.Tensor      # mean width over all routed slots (kept or dropped)
    units: float                  # hidden units this rank executed (FLOPs accounting)
    tokens: int                   # T, the tokens this forward routed


class SlimmableMoE(MoE):
    def __init__(self, config, moe: MoEConfig, ffn_hidden_size: int, activation: str, layer_index: int,
                 router: RouterSpec = RouterSpec(), shared_hidden_size: int = 0):
        # `config` is megatron's TransformerConfig (the mlp slot is built with it).
        super().__init__(hidden_size=config.hidden_size,
                         expert=SlimmableFFN(config.hidden_size, ffn_hidden_size, activation),
                         num_experts=moe.num_experts, ep_size=moe.expert_parallel_size,
                         k=moe.top_k, capacity_factor=moe.capacity_factor,
                         eval_capacity_factor=moe.eval_capacity_factor,
                         min_capacity=moe.min_capacity, drop_tokens=moe.drop_tokens,
                         use_rts=False, top2_2nd_expert_sampling=False)
        self.deepspeed_moe.gate = Router(config.hidden_size, moe.num_experts)
        # DeepSeek's always-on shared experts: one FFN of n_shared * H units, data-parallel
        # (not an expert parameter); full width unless moe.shared_slimmable. Its name must not
        # contain "expert": DeepSpeed's MoE checkpointing files every such parameter of a MoE
        # module as a routed expert.
        self.shared_ffn = (SlimmableFFN(config.hidden_size, shared_hidden_size, activation)
                           if shared_hidden_size else None)
        self.router_spec = router
        self.moe = moe
        self.k = moe.top_k
        self.ffn_hidden_size = ffn_hidden_size
        self.layer_index = layer_index   # index among MoE layers, passed to width policies
        if moe.expert_kernel == "grouped" and not grouped.supported(config.hidden_size, ffn_hidden_size):
            raise ValueError(f"moe.expert_kernel=grouped needs torch._grouped_mm and hidden sizes that are "
                             f"multiples of {grouped.GRANULE}: model {config.hidden_size}, expert {ffn_hidden_size}")

    def uses_grouped_kernel(self, x: torch.Tensor) -> bool:
        """moe.expert_kernel for inputs like x, `auto` resolved (`grouped.auto_picks_grouped`)."""
        if self.moe.expert_kernel == "auto":
            return grouped.auto_picks_grouped(x.device, x.dtype, x.shape[-1], self.ffn_hidden_size)
        return self.moe.expert_kernel == "grouped"

    @property
    def router(self) -> Router:
        return self.deepspeed_moe.gate

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    def forward(self, hidden_SBD: torch.Tensor, width_policy: WidthPolicy):
        S, B, D = hidden_SBD.shape
        x_TD = hidden_SBD.reshape(S * B, D)
        T, E, K = S * B, self.num_experts, self.k

        # 1. Route: fp32 logits, top-k, combine weights (RouterSpec).
        logits_TE = self.router(x_TD)
        idx_TK, p_TK = top_k_routing(logits_TE, K, self.router_spec)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        lb = sequence_balance_loss(probs_TE, idx_TK, B) if self.router_spec.balance == "sequence" \
            else load_balance_loss(probs_TE, idx_TK)
        z = router_z_loss(logits_TE)
        aux = self.moe.load_balance_coef * lb + self.moe.z_loss_coef * z

        # 2. Capacity slots (top-1 choices first) and one hidden size per routed slot.
        factor = self.moe.capacity_factor if self.training else self.moe.eval_capacity_factor
        C = expert_capacity(T, E, K, factor, self.moe.min_capacity) if self.moe.drop_tokens else T
        pos_TK, keep_TK = assign_slots(idx_TK, E, C)
        w_TK = width_policy(p_TK, self.layer_index)
        m_TK = hidden_units(w_TK, self.ffn_hidden_size, self.moe.width_quantum)

        # 3. Kept slots in expert-major order, for one rank: widest first inside an expert (what
        #    `forward_sorted` takes) or the grouped kernel's layout (buckets of widths, then
        #    experts); capacity-slot order for the expert-parallel exchange.
        kept_N = keep_TK.reshape(-1).nonzero().squeeze(1)
        dest_N = (idx_TK * C + pos_TK).reshape(-1)[kept_N]              # row in an [E*C] buffer
        relaxed = getattr(width_policy, "relaxed", False)
        use_grouped = self.uses_grouped_kernel(x_TD) and not relaxed
        H = self.ffn_hidden_size
        if self.ep_size > 1:
            order_N = torch.argsort(dest_N)
        elif use_grouped:
            layout = grouped.plan_layout(idx_TK.reshape(-1)[kept_N], m_TK.reshape(-1)[kept_N], E, H)
            order_N = layout.order_N
        else:
            order_N = torch.argsort(idx_TK.reshape(-1)[kept_N] * (H + 1) + H - m_TK.reshape(-1)[kept_N],
                                    stable=True)
        slot_S = kept_N[order_N]
        tok_S, dest_S = slot_S // K, dest_N[order_N]
        p_S, m_S = p_TK.reshape(-1)[slot_S], m_TK.reshape(-1)[slot_S]
        x_SD = x_TD.index_select(0, tok_S)

        # 4. Experts, on this rank or across the expert-parallel group.
        if self.ep_size == 1 and use_grouped:
            y_SD, units = grouped.grouped_ffn(self.local_experts, x_SD, m_S, layout), float(layout.units)
        elif self.ep_size == 1:
            counts = torch.bincount(idx_TK.reshape(-1)[slot_S], minlength=E).tolist()
            if relaxed:   # the relaxation executes w * H units in expectation, not ceil(w * H)
                w_S = w_TK.reshape(-1)[slot_S]
                y_SD = torch.cat([expert.forward_relaxed(x, w) for expert, x, w in
                                  zip(self.local_experts, x_SD.split(counts), w_S.split(counts))])
                units = float(w_S.detach().float().sum()) * self.ffn_hidden_size
            else:
                outs = [expert.forward_sorted(x, m) for expert, x, m in
                        zip(self.local_experts, x_SD.split(counts), m_S.split(counts))]
                y_SD = torch.cat([y for y, _ in outs])
                units = float(sum(u for _, u in outs))
        elif relaxed:
            raise RuntimeError("relaxed width policies (gamma calibration) run with expert_parallel_size=1")
        else:
            y_SD, units = self._run_expert_parallel(x_SD, m_S, dest_S, C, use_grouped)

        # 5. Combine: out_t = sum over the token's kept slots of p * expert output.
        y_SD = y_SD * p_S.to(y_SD.dtype).unsqueeze(1)
        out_TD = torch.zeros_like(x_TD).index_add(0, tok_S, y_SD)

        stats = routing_stats(idx_TK.detach(), keep_TK, E, lb, z)
        mean_width = (m_TK.float() / self.ffn_hidden_size).mean()
        if self.shared_ffn is not None:
            shared_TD, shared_units = self._run_shared(x_TD, w_TK)
            out_TD = out_TD + shared_TD
            units = units + shared_units
        return out_TD.view(S, B, D), RoutingInfo(aux, stats, mean_width, units, T)

    def _run_shared(self, x_TD: torch.Tensor, w_TK: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The shared experts on every token: at full width, or (moe.shared_slimmable) at the
        mean width of the token's routed experts. Returns the output and the units executed."""
        shared, T = self.shared_ffn, x_TD.shape[0]
        if not self.moe.shared_slimmable:
            return shared(x_TD, shared.ffn_hidden_size), float(T * shared.ffn_hidden_size)
        m_T = hidden_units(w_TK.detach().mean(dim=-1), shared.ffn_hidden_size, self.moe.width_quantum)
        out_TD, units = shared.forward_slots(x_TD, m_T)
        return out_TD, float(units)

    def _run_expert_parallel(self, x_SD: torch.Tensor, m_S: torch.Tensor, dest_S: torch.Tensor,
                             C: int, use_grouped: bool) -> tuple[torch.Tensor, float]:
        """Pack slots into `[E * C]` capacity blocks, all-to-all them (with their hidden sizes)
        to the ranks owning their experts, run them, and bring results back in slot order.
        Also returns the hidden units this rank executed (for whichever rank's tokens).

        Rows are expert-major, so rank r's experts form the r-th contiguous chunk, which is
        what DeepSpeed's all-to-all splits on.
        """
        R, L, D = self.ep_size, self.num_local_experts, x_SD.shape[-1]
        group = self.deepspeed_moe.ep_group
        if group is None:
            raise RuntimeError("expert_parallel_size > 1 but no expert-parallel group: wrap the "
                               "model with the DeepSpeed engine (or call set_deepspeed_parallelism)")
        x_XD = x_SD.new_zeros(R * L * C, D).index_copy(0, dest_S, x_SD)
        m_X = torch.zeros(R * L * C, dtype=torch.long, device=x_SD.device).index_copy(0, dest_S, m_S)
        x_XD = _AllToAll.apply(group, x_XD)
        m_recv = torch.empty_like(m_X)
        dist.all_to_all_single(m_recv, m_X, group=group)
        if use_grouped:   # the received rows in the grouped layout, and back
            e_X = torch.arange(L, device=x_XD.device).view(1, L, 1).expand(R, L, C).reshape(-1)
            layout = grouped.plan_layout(e_X, m_recv, L, self.ffn_hidden_size)
            y_sorted = grouped.grouped_ffn(self.local_experts, x_XD.index_select(0, layout.order_N),
                                           m_recv[layout.order_N], layout)
            y_XD = torch.zeros_like(y_sorted).index_copy(0, layout.order_N, y_sorted)
            units = layout.units
        else:
            # unbind (not x[:, j]) so that backward stacks once instead of zero-filling per expert
            x_L = x_XD.view(R, L, C, D).unbind(1)                        # L x [R, C, D]
            m_L = m_recv.view(R, L, C).unbind(1)
            outs = [expert.forward_slots(x_L[j].reshape(R * C, D), m_L[j].reshape(R * C))
                    for j, expert in enumerate(self.local_experts)]
            y_XD = torch.stack([y.view(R, C, D) for y, _ in outs], dim=1).reshape(R * L * C, D)
            units = sum(u for _, u in outs)
        y_XD = _AllToAll.apply(group, y_XD)
        return y_XD.index_select(0, dest_S), float(units)
