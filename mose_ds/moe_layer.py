"""The slimmable MoE layer: DeepSpeed's MoE machinery with our gate, dispatch and experts.

Paper eq. 5: y = sum_i p_i * E_i^{w_i}(x) over the top-k experts of each token.

`SlimmableMoE` subclasses `deepspeed.moe.layer.MoE`, so the DeepSpeed engine recognises it:
it creates the expert-parallel groups, puts expert parameters into MoE optimizer groups and
writes one checkpoint file per expert. We keep DeepSpeed's `Experts` container (and with it
the expert-parameter tags) and replace the rest. A forward is a short sequence of steps:

1. route: fp32 router, top-k, capacity slots, auxiliary losses (`gating.py`);
2. widths: the width policy's w per routed slot, and its hidden size m(w);
3. plan: the dispatcher sorts kept slots and brings their counts to the host, the layer's one
   host sync (`dispatch.py`: local, or all-to-all-v across the expert-parallel group);
4. dispatch: the rows for this rank's experts;
5. experts: one expert kernel (`experts.LoopKernel`, `grouped.GroupedKernel`, or gamma
   calibration's `experts.RelaxedKernel`) on those rows;
6. combine: each token's weighted sum, in fp32 and a fixed order; then the shared experts.

Nothing is sized by capacity or is `[T, E, C]`: memory and traffic follow kept slots.

Shape legend: S sequence, B batch, T = S * B tokens, D model dim, E experts, K top-k,
H expert hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from torch import nn

from . import grouped
from .config import MoEConfig
from .dispatch import AllToAllDispatcher, LocalDispatcher, sort_slots
from .experts import ExpertKernel, ExpertRows, LoopKernel, RelaxedKernel, SlimmableFFN, inverse, permute_rows
from .gating import (RouterSpec, RoutingStats, assign_slots, balance_loss, expert_capacity, expert_counts,
                     router_z_loss, routing_stats, top_k_routing)
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
    nominal_units: torch.Tensor   # the paper's count for this rank's tokens: sum over their kept
                                  # slots of ceil(w H) (no width_quantum), plus the shared
                                  # experts' units (device)
    units: float                  # hidden units this rank's kernels executed (each size rounded up
                                  # to a range end, so at least the nominal units with EP = 1)
    tokens: int                   # T, the tokens this forward routed


@dataclass
class Route:
    """Step 1's result: each token's experts, their weights, which slots were kept."""
    idx_TK: torch.Tensor
    p_TK: torch.Tensor
    keep_TK: torch.Tensor
    aux_loss: torch.Tensor
    stats: RoutingStats


LOOP, RELAXED, GROUPED = LoopKernel(), RelaxedKernel(), grouped.GroupedKernel()


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
        self.dispatcher = (LocalDispatcher(moe.num_experts, ffn_hidden_size) if moe.expert_parallel_size == 1
                           else AllToAllDispatcher(moe.num_experts, ffn_hidden_size, moe.expert_parallel_size))

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """DeepSpeed's group creation (the engine calls this), handing the expert-parallel
        group to the all-to-all dispatcher."""
        super().set_deepspeed_parallelism(use_data_before_expert_parallel_)
        self.dispatcher.group = self.deepspeed_moe.ep_group

    def expert_kernel(self, x: torch.Tensor, relaxed: bool) -> ExpertKernel:
        """The kernel for inputs like x: the relaxation in relaxed forwards, else
        moe.expert_kernel (`auto` resolved by `grouped.auto_picks_grouped`)."""
        if relaxed:
            return RELAXED
        name = self.moe.expert_kernel
        if name == "auto":
            name = "grouped" if grouped.auto_picks_grouped(x.device, x.dtype, x.shape[-1], self.ffn_hidden_size) \
                else "loop"
        return GROUPED if name == "grouped" else LOOP

    @property
    def router(self) -> Router:
        return self.deepspeed_moe.gate

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    def forward(self, hidden_SBD: torch.Tensor, width_policy: WidthPolicy, relaxed: bool = False):
        S, B, D = hidden_SBD.shape
        x_TD = hidden_SBD.reshape(S * B, D)
        route = self.route(x_TD, B, getattr(width_policy, "top_k", None) or self.k)   # 1.
        w_TK = width_policy(route.p_TK, self.layer_index, relaxed)                    # 2.
        m_TK = hidden_units(w_TK, self.ffn_hidden_size, self.moe.width_quantum)
        shared_sort = self._sort_shared(w_TK)
        plan = self.dispatcher.plan(route.idx_TK, m_TK, route.keep_TK,              # 3. host sync
                                    also=shared_sort[2:] if shared_sort else ())
        rows = self.dispatcher.dispatch(x_TD, plan, w_TK if relaxed else None)        # 4.
        y_ND, units, order_N = self.expert_kernel(x_TD, relaxed)(self.local_experts, rows)   # 5.
        del rows                       # frees the received rows: the kernel keeps its own copy
        out_TD = self.dispatcher.combine(y_ND, route.p_TK, plan, order_N)             # 6.
        if self.shared_ffn is not None:
            shared_TD, shared_units = self._run_shared(x_TD, shared_sort, plan.also)
            out_TD, units = out_TD + shared_TD, units + shared_units
        paper_m_TK = m_TK if self.moe.width_quantum == 1 else hidden_units(w_TK, self.ffn_hidden_size)
        nominal = (paper_m_TK * route.keep_TK).sum() + self._shared_nominal(w_TK)
        return out_TD.view(S, B, D), RoutingInfo(route.aux_loss, route.stats, nominal, float(units), S * B)

    def route(self, x_TD: torch.Tensor, batch: int, k: int) -> Route:
        """fp32 logits, top-k (k <= the trained k) and combine weights (RouterSpec), capacity
        slots (top-1 choices first; all kept when dropless), balance and z losses, routing
        statistics."""
        T, E, K = x_TD.shape[0], self.num_experts, k
        if not 1 <= k <= self.k:
            raise ValueError(f"routing to top_k={k} experts: needs 1 <= k' <= trained k={self.k}")
        logits_TE = self.router(x_TD)
        idx_TK, p_TK = top_k_routing(logits_TE, K, self.router_spec)
        counts_E = expert_counts(idx_TK, E)
        lb = balance_loss(self.router_spec, logits_TE, idx_TK, p_TK / self.router_spec.scale, counts_E, batch)
        z = router_z_loss(logits_TE)
        if self.moe.drop_tokens:
            factor = self.moe.capacity_factor if self.training else self.moe.eval_capacity_factor
            _, keep_TK = assign_slots(idx_TK, counts_E, expert_capacity(T, E, K, factor, self.moe.min_capacity))
        else:
            keep_TK = torch.ones_like(idx_TK, dtype=torch.bool)
        aux = self.moe.load_balance_coef * lb + self.moe.z_loss_coef * z
        return Route(idx_TK, p_TK, keep_TK, aux, routing_stats(counts_E, keep_TK, lb, z))

    def _sort_shared(self, w_TK: torch.Tensor) -> tuple | None:
        """With moe.shared_slimmable, the shared experts run each token at the mean width of
        its routed experts: tokens sorted widest first, and their size histogram (which
        travels to the host with the dispatch plan's counts)."""
        if self.shared_ffn is None or not self.moe.shared_slimmable:
            return None
        H = self.shared_ffn.ffn_hidden_size
        m_T1 = hidden_units(w_TK.detach().mean(dim=-1, keepdim=True), H, self.moe.width_quantum)
        zeros_T1 = torch.zeros_like(m_T1)
        return sort_slots(zeros_T1, m_T1, torch.ones_like(m_T1, dtype=torch.bool), 1, H)

    def _shared_nominal(self, w_TK: torch.Tensor) -> torch.Tensor | int:
        """The shared experts' units in the paper's count: every token at full width, or
        (moe.shared_slimmable) at ceil of its routed experts' mean width times H."""
        if self.shared_ffn is None:
            return 0
        H = self.shared_ffn.ffn_hidden_size
        if not self.moe.shared_slimmable:
            return w_TK.shape[0] * H
        return hidden_units(w_TK.detach().mean(dim=-1), H).sum()

    def _run_shared(self, x_TD: torch.Tensor, shared_sort, host: list) -> tuple[torch.Tensor, int]:
        """The shared experts on every token: at full width, or (moe.shared_slimmable) each
        token at its own width through the loop kernel. Returns the output and units."""
        shared, T = self.shared_ffn, x_TD.shape[0]
        if shared_sort is None:
            return shared(x_TD, shared.ffn_hidden_size), T * shared.ffn_hidden_size
        order_T, key_T, _ = shared_sort
        back_T, H = inverse(order_T), shared.ffn_hidden_size
        rows = ExpertRows(H - key_T, torch.zeros_like(key_T), host[0].flip(1),
                          lambda _: permute_rows(x_TD, order_T, back_T))
        y_TD, units, _ = LOOP([shared], rows)
        return permute_rows(y_TD, back_T, order_T), units
