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

A decoding step (a few tokens, no gradient, one rank: `_forward_few`) takes the same steps
with the plan made on the host from one copy of the routed experts and sizes.

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
from .dispatch import AllToAllDispatcher, LocalDispatcher, sort_slots, sum_over_choices, to_host
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
    aux_loss: torch.Tensor | None # None after a decoding step: no gradient needs it (the stats
                                  # still give both losses when read)
    stats: RoutingStats
    nominal_units: torch.Tensor | int   # the paper's count for this rank's tokens: sum over their
                                  # kept slots of ceil(w H) (no width_quantum), plus the shared
                                  # experts' units (device; a host int after a decoding step)
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
FEW_SLOTS = 256        # routed slots up to which a forward without gradients is a decoding step


def _runs(keys: list) -> list[tuple]:
    """Runs of equal neighbours in sorted keys: [(key, length), ...]."""
    runs: list[list] = []
    for key in keys:
        if runs and runs[-1][0] == key:
            runs[-1][1] += 1
        else:
            runs.append([key, 1])
    return [tuple(r) for r in runs]


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
        k = getattr(width_policy, "top_k", None) or self.k
        if not 1 <= k <= self.k:
            raise ValueError(f"routing to top_k={k} experts: needs 1 <= k' <= trained k={self.k}")
        if self._host_grouped(S * B * k, relaxed):
            out_TD, info = self._forward_few(x_TD, width_policy, k, B)
            return out_TD.view(S, B, D), info
        route = self.route(x_TD, B, k)                                                # 1.
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

    def _host_grouped(self, slots: int, relaxed: bool) -> bool:
        """Whether this forward takes `_forward_few`: a decoding step (few slots, no
        gradient, every expert on this rank, no capacity)."""
        return (slots <= FEW_SLOTS and not relaxed and not torch.is_grad_enabled() and not self.moe.drop_tokens
                and isinstance(self.dispatcher, LocalDispatcher))

    def _forward_few(self, x_TD: torch.Tensor, width_policy: WidthPolicy, k: int, batch: int
                     ) -> tuple[torch.Tensor, RoutingInfo]:
        """Steps 1-6 for a decoding step of a few tokens, in about half the operations.

        The general path plans on the device (sort, histogram, one host copy of counts) and
        computes the auxiliary losses and routing statistics in every forward: some 120
        operations per layer, more time than a decoding step's products take. Here the
        slots' experts and sizes come to the host in one copy (the same one host sync), the
        slots that share (expert, size) run as one product pair, and each token sums its K
        outputs as the general combine does (fp32, choice 0 first). Units are counted on the
        host; the losses are computed only if read (no gradient needs them)."""
        T, D, H = x_TD.shape[0], x_TD.shape[1], self.ffn_hidden_size
        logits_TE = self.router(x_TD)
        idx_TK, p_TK = top_k_routing(logits_TE, k, self.router_spec)
        w_TK = width_policy(p_TK, self.layer_index, False)
        m_TK = hidden_units(w_TK, H, self.moe.width_quantum)
        shared_T = self._shared_sizes(w_TK)
        # Slots sorted by (expert, widest first) on the device, as the general path sorts them;
        # the host groups the same sorted order from its copy (no index travels to the device).
        slot_N = torch.sort((idx_TK * (H + 1) + H - m_TK).reshape(-1), stable=True).indices
        idx, m, *shared = (t.tolist() for t in to_host(idx_TK.reshape(-1), m_TK.reshape(-1), *shared_T))
        # ^ the host sync; idx and m are per flat slot t K + k
        runs = _runs(sorted(zip(idx, m), key=lambda em: (em[0], -em[1])))        # ((expert, size), rows)
        x_ND = x_TD.index_select(0, slot_N // k)
        ys = [self.local_experts[expert].sliced(x_nD, size)
              for ((expert, size), _), x_nD in zip(runs, x_ND.split([n for _, n in runs]))]
        y_ND = torch.empty_like(x_ND).index_copy_(0, slot_N, torch.cat(ys))    # slot order
        out_TD = sum_over_choices(y_ND.view(T, k, D), p_TK.float()).to(x_TD.dtype)
        units = sum(m)
        if shared:                                             # moe.shared_slimmable: sizes per token
            token_T = torch.sort(-shared_T[0], stable=True).indices              # widest first
            runs = _runs(sorted(shared[0], reverse=True))
            x_sizes = x_TD.index_select(0, token_T).split([n for _, n in runs])
            y_TD = torch.cat([self.shared_ffn.sliced(x_nD, size) for (size, _), x_nD in zip(runs, x_sizes)])
            out_TD = out_TD.index_add(0, token_T, y_TD)
            units += sum(shared[0])
        elif self.shared_ffn is not None:
            out_TD = out_TD + self.shared_ffn.sliced(x_TD, self.shared_ffn.ffn_hidden_size)
            units += T * self.shared_ffn.ffn_hidden_size
        nominal = units if self.moe.width_quantum == 1 else \
            hidden_units(w_TK, H).sum() + self._shared_nominal(w_TK)          # the paper's count
        counts_E = expert_counts(idx_TK, self.num_experts)                       # device, as the general path's

        def losses():
            lb = balance_loss(self.router_spec, logits_TE, idx_TK, p_TK / self.router_spec.scale, counts_E, batch)
            return lb, router_z_loss(logits_TE)
        stats = RoutingStats(counts_E, counts_E.sum(), len(idx), losses)
        return out_TD, RoutingInfo(None, stats, nominal, float(units), T)

    def _shared_sizes(self, w_TK: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The shared experts' hidden size per token [T] under moe.shared_slimmable (the mean
        width of its routed experts), else nothing: they run at full width."""
        if self.shared_ffn is None or not self.moe.shared_slimmable:
            return ()
        return (hidden_units(w_TK.mean(dim=-1), self.shared_ffn.ffn_hidden_size, self.moe.width_quantum),)

    def route(self, x_TD: torch.Tensor, batch: int, k: int) -> Route:
        """fp32 logits, top-k (k <= the trained k) and combine weights (RouterSpec), capacity
        slots (top-1 choices first; all kept when dropless), balance and z losses, routing
        statistics."""
        T, E, K = x_TD.shape[0], self.num_experts, k
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
        m_T1 = self._shared_sizes(w_TK.detach())[0].unsqueeze(1)
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
