"""Top-k routing maths as pure functions (paper section 2.1, appendix A.2; DESIGN section 3).

Shape legend: T tokens, E experts, K = top-k, D model dim.
The router is linear without bias and computed in fp32; the k selected logits are
softmaxed, so the k weights p_i sum to one. Each expert holds `capacity` slots; all
top-1 choices take slots before any top-2 choice, and overflow is dropped (the token
then keeps only its residual for that choice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch


BALANCES = ("topk", "batch", "sequence")


@dataclass(frozen=True)
class RouterSpec:
    """How router logits become combine weights and what the balance loss averages over.

    `scores`: "topk_softmax" (the paper's GPT models: softmax over the k selected logits)
    or "softmax" (DeepSeek: softmax over all experts, then the k largest, renormalised only
    when `normalize`). The weights are then multiplied by `scale` (routed_scaling_factor).
    `balance` (what the balance loss averages; `balance_loss`):
    * "topk": nanoMoE's loss, the paper's base: f_e counts all k choices (sums to k) and P_e
      is the top-k-masked softmax, so it equals k at perfect balance;
    * "batch": DeepSeek-V2's batch-level loss (`seq_aux: false`): f_e normalised over the
      T k choices (sums to 1), P_e over the full softmax; 1 at perfect balance;
    * "sequence": DeepSeek-V2's sequence-level loss, per sequence then averaged.
    """
    scores: str = "topk_softmax"
    normalize: bool = True
    scale: float = 1.0
    balance: str = "topk"

    def __post_init__(self):
        if self.balance not in BALANCES:
            raise ValueError(f"unknown balance loss {self.balance!r}: expected one of {BALANCES}")


def top_k_routing(logits_TE: torch.Tensor, k: int, spec: RouterSpec = RouterSpec()
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the k chosen experts and their combine weights p [T, K]."""
    if spec.scores == "topk_softmax":
        top_TK, idx_TK = logits_TE.topk(k, dim=-1)
        p_TK = torch.softmax(top_TK, dim=-1)
    else:
        p_TK, idx_TK = torch.softmax(logits_TE, dim=-1).topk(k, dim=-1)
        if spec.normalize:
            p_TK = p_TK / p_TK.sum(dim=-1, keepdim=True)
    return idx_TK, p_TK * spec.scale                                # exact when scale is 1


def expert_capacity(num_tokens: int, num_experts: int, k: int, factor: float, min_capacity: int) -> int:
    """Slots per expert: ceil(k * factor * T / E), at least `min_capacity`, at most T."""
    cap = math.ceil(k * factor * num_tokens / num_experts)
    return max(1, min(num_tokens, max(cap, min_capacity)))


def expert_counts(idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routed choices per expert (before capacity) [E]: an integer histogram, so exact in any
    summation order, and sized on the host (bincount would wait for the device to size it)."""
    flat_N = idx_TK.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat_N.device).index_add_(
        0, flat_N, torch.ones_like(flat_N))


def assign_slots(idx_TK: torch.Tensor, counts_E: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Position of each (token, choice) inside its expert's buffer, and whether it fits.

    Choices are ranked choice-major (every token's first choice, then every second
    choice, ...), so top-1 choices fill capacity before top-2 choices. A stable sort by
    expert keeps that order inside each expert; memory is O(T * K), linear in tokens.
    `counts_E`: `expert_counts(idx_TK, E)`.
    """
    T, K = idx_TK.shape
    flat_N = idx_TK.t().reshape(-1)                                   # [K*T], choice-major
    order_N = torch.argsort(flat_N, stable=True)
    starts_E = counts_E.cumsum(0) - counts_E
    pos_N = torch.empty_like(flat_N)
    pos_N[order_N] = torch.arange(flat_N.numel(), device=flat_N.device) - starts_E[flat_N[order_N]]
    pos_TK = pos_N.view(K, T).t()
    return pos_TK, pos_TK < capacity


def load_balance_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Switch-style balance loss E * sum_e f_e * P_e with f_e = (choices routed to e) / T.

    f sums to k (nanoMoE, the paper's base, counts every one of the k choices of a token);
    `probs_TE` is the per-expert probability the router gives (nanoMoE: the softmax over the
    k selected logits, zero elsewhere, so P sums to 1), `counts_E` from `expert_counts`,
    before capacity. At perfect balance f_e = k / E and P_e = 1 / E, so the loss is k: with
    coefficient 0.01 it weighs what it weighs in nanoMoE. The gradient reaches the router
    through P alone (f is a count)."""
    T, E = probs_TE.shape
    f_E = counts_E.to(probs_TE.dtype) / max(T, 1)
    return E * (f_E * probs_TE.mean(0)).sum()


def topk_probs(p_TK: torch.Tensor, idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The top-k-masked softmax [T, E]: each token's k combine weights at their experts."""
    return torch.zeros(p_TK.shape[0], num_experts, dtype=p_TK.dtype, device=p_TK.device).scatter(1, idx_TK, p_TK)


def balance_loss(spec: RouterSpec, logits_TE: torch.Tensor, idx_TK: torch.Tensor, p_TK: torch.Tensor,
                 counts_E: torch.Tensor, batch: int) -> torch.Tensor:
    """The balance loss `spec.balance` names (RouterSpec) for one forward; tokens in [S, B]
    order, `p_TK` the combine weights before `spec.scale`."""
    E, K = logits_TE.shape[-1], idx_TK.shape[-1]
    if spec.balance == "topk":
        return load_balance_loss(topk_probs(p_TK, idx_TK, E), counts_E)
    probs_TE = torch.softmax(logits_TE, dim=-1)
    if spec.balance == "sequence":
        return sequence_balance_loss(probs_TE, idx_TK, batch)
    return load_balance_loss(probs_TE, counts_E) / K


def sequence_balance_loss(probs_TE: torch.Tensor, idx_TK: torch.Tensor, batch: int) -> torch.Tensor:
    """DeepSeek's sequence-level balance loss: per sequence, sum_e f_e * P_e with
    f_e = E / (S K) x (the sequence's choices sent to e) and P_e the mean probability of e
    over the sequence; averaged over sequences. Tokens are in [S, B] order; equals 1 at
    perfect balance."""
    T, E = probs_TE.shape
    K, S = idx_TK.shape[-1], T // batch
    choices_BN = idx_TK.view(S, batch, K).permute(1, 0, 2).reshape(batch, S * K)
    # integer counts: exact whatever order the device adds them in (run-to-run identical)
    counts_BE = torch.zeros(batch, E, dtype=torch.long, device=probs_TE.device).scatter_add_(
        1, choices_BN, torch.ones_like(choices_BN))
    f_BE = counts_BE.to(probs_TE.dtype) * (E / (S * K))
    return (f_BE * probs_TE.view(S, batch, E).mean(0)).sum(1).mean()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Mean squared logsumexp of the router logits (Zoph et al., 2022)."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


@dataclass
class RoutingStats:
    """Per-layer diagnostics of one forward (paper appendix B.5): detached tensors, read at
    logging steps. The statistics are computed when read, not in every forward; so are the
    two losses when the forward did not need them (`losses`: a decoding step)."""
    counts_E: torch.Tensor        # routed choices per expert (before capacity)
    kept: torch.Tensor            # routed choices that found a slot
    routed: int                   # routed choices, T K
    losses: Callable[[], tuple[torch.Tensor, torch.Tensor]]   # (load balance, z loss)

    @cached_property
    def _losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(loss.detach() for loss in self.losses())

    @property
    def load_balance(self) -> torch.Tensor:
        return self._losses[0]

    @property
    def z_loss(self) -> torch.Tensor:
        return self._losses[1]

    @property
    def load_cv(self) -> torch.Tensor:
        """Coefficient of variation of the expert loads."""
        counts_E = self.counts_E.float()
        return counts_E.std(unbiased=False) / counts_E.mean().clamp_min(1e-12)

    @property
    def entropy(self) -> torch.Tensor:
        """Entropy of the expert-selection histogram over its maximum, log E."""
        share_E = self.counts_E.float() / self.counts_E.sum().clamp_min(1)
        return -(share_E * share_E.clamp_min(1e-12).log()).sum() / math.log(max(self.counts_E.numel(), 2))

    @property
    def dropped_frac(self) -> torch.Tensor:
        """The fraction of routed choices dropped for lack of capacity."""
        return 1.0 - self.kept.float() / max(self.routed, 1)


def routing_stats(counts_E: torch.Tensor, keep_TK: torch.Tensor, load_balance: torch.Tensor,
                  z_loss: torch.Tensor) -> RoutingStats:
    """The diagnostics of one forward from its expert histogram (`expert_counts`) and kept slots."""
    return RoutingStats(counts_E, keep_TK.sum(), keep_TK.numel(), lambda: (load_balance, z_loss))
