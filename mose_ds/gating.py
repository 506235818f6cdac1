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

import torch


@dataclass(frozen=True)
class RouterSpec:
    """How router logits become combine weights and what the balance loss averages over.

    `scores`: "topk_softmax" (the paper's GPT models: softmax over the k selected logits)
    or "softmax" (DeepSeek: softmax over all experts, then the k largest, renormalised only
    when `normalize`). The weights are then multiplied by `scale` (routed_scaling_factor).
    `balance`: "batch" (Switch loss over all tokens of the forward) or "sequence" (DeepSeek's
    sequence-level loss, per sequence then averaged).
    """
    scores: str = "topk_softmax"
    normalize: bool = True
    scale: float = 1.0
    balance: str = "batch"


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


def assign_slots(idx_TK: torch.Tensor, num_experts: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Position of each (token, choice) inside its expert's buffer, and whether it fits.

    Choices are ranked choice-major (every token's first choice, then every second
    choice, ...), so top-1 choices fill capacity before top-2 choices. A stable sort by
    expert keeps that order inside each expert; memory is O(T * K), linear in tokens.
    """
    T, K = idx_TK.shape
    flat_N = idx_TK.t().reshape(-1)                                   # [K*T], choice-major
    order_N = torch.argsort(flat_N, stable=True)
    counts_E = torch.bincount(flat_N, minlength=num_experts)
    starts_E = counts_E.cumsum(0) - counts_E
    pos_N = torch.empty_like(flat_N)
    pos_N[order_N] = torch.arange(flat_N.numel(), device=flat_N.device) - starts_E[flat_N[order_N]]
    pos_TK = pos_N.view(K, T).t()
    return pos_TK, pos_TK < capacity


def load_balance_loss(probs_TE: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
    """Switch-style balance loss E * sum_e f_e * P_e; equals 1 at perfect balance.

    f_e: fraction of routed choices sent to e (before capacity), P_e: mean router
    probability of e over all experts' softmax.
    """
    E = probs_TE.shape[-1]
    counts_E = torch.bincount(idx_TK.reshape(-1), minlength=E).to(probs_TE.dtype)
    f_E = counts_E / idx_TK.numel()
    return E * (f_E * probs_TE.mean(0)).sum()


def sequence_balance_loss(probs_TE: torch.Tensor, idx_TK: torch.Tensor, batch: int) -> torch.Tensor:
    """DeepSeek's sequence-level balance loss: per sequence, sum_e f_e * P_e with
    f_e = E / (S K) x (the sequence's choices sent to e) and P_e the mean probability of e
    over the sequence; averaged over sequences. Tokens are in [S, B] order; equals 1 at
    perfect balance."""
    T, E = probs_TE.shape
    K, S = idx_TK.shape[-1], T // batch
    choices_BN = idx_TK.view(S, batch, K).permute(1, 0, 2).reshape(batch, S * K)
    f_BE = torch.zeros(batch, E, dtype=probs_TE.dtype, device=probs_TE.device).scatter_add_(
        1, choices_BN, torch.ones_like(choices_BN, dtype=probs_TE.dtype)) * (E / (S * K))
    return (f_BE * probs_TE.view(S, batch, E).mean(0)).sum(1).mean()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Mean squared logsumexp of the router logits (Zoph et al., 2022)."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


@dataclass
class RoutingStats:
    """Per-layer diagnostics of one forward (detached; paper appendix B.5)."""
    load_balance: torch.Tensor
    z_loss: torch.Tensor
    load_cv: torch.Tensor
    entropy: torch.Tensor
    dropped_frac: torch.Tensor
    counts_E: torch.Tensor


def routing_stats(idx_TK: torch.Tensor, keep_TK: torch.Tensor, num_experts: int,
                  load_balance: torch.Tensor, z_loss: torch.Tensor) -> RoutingStats:
    """Load coefficient of variation, normalised entropy of the expert-selection histogram,
    and the fraction of routed choices dropped for lack of capacity."""
    counts_E = torch.bincount(idx_TK.reshape(-1), minlength=num_experts).float()
    share_E = counts_E / counts_E.sum().clamp_min(1)
    entropy = -(share_E * share_E.clamp_min(1e-12).log()).sum() / math.log(max(num_experts, 2))
    cv = counts_E.std(unbiased=False) / counts_E.mean().clamp_min(1e-12)
    dropped = 1.0 - keep_TK.float().mean()
    return RoutingStats(load_balance.detach(), z_loss.detach(), cv, entropy, dropped, counts_E)
