"""FLOPs per token of a forward (DESIGN section 5, paper appendix B.2).

Two counts of expert work:

* **nominal** (the paper's count, used for frontiers and "FLOPs saved"): each kept slot at
  m = ceil(w H) hidden units of the width w the policy deployed;
* **executed**: the hidden units the kernels computed, so executed >= nominal. The per-expert
  kernel runs an expert's rows in at most `experts.MAX_RANGES` (16) hidden-unit ranges and
  rounds each row up to its range's end: widths rounded to the 16-point training grid run
  exactly their units. What remains: the grouped kernel (bf16 on Hopper / B200) first rounds
  every size up to a multiple of 8 units (`grouped.GRANULE`); `moe.width_quantum` rounds
  sizes up to its multiple; continuous widths (`--continuous`), a grid of more than 16
  widths and slimmable shared experts (at the mean of a token's widths) have more sizes
  than ranges and round up to range ends.

Two conventions, both broken down into MoE / attention / other:

* **paper**: multiply-accumulates of the linear layers inside the transformer blocks only:
  attention projections (4 d^2 per layer; MLA's own projections for DeepSeek-V2), dense
  FFNs (2 d H, 3 d H for SwiGLU), and each executed expert slot (2 d m, 3 d m for SwiGLU,
  m = its hidden units; shared experts count as executed units too). No embeddings, LM
  head, attention scores or router.
* **standard**: 2 FLOPs per multiply-accumulate, adding attention scores (QK^T and AV over
  the full S x S square, which is what the kernel computes: 2 S d MACs per token and layer),
  the router (d E per MoE layer) and the LM head (d V).

Categories: `moe` = experts (+ router), `attention` = projections (+ scores), `other` =
dense FFNs (+ LM head). Dropped slots execute nothing and cost nothing; a training step
costs three forward passes. Pure functions of the config and the executed hidden units.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .config import ModelConfig, MoEConfig
from .widths import hidden_units

CONVENTIONS = ("paper", "standard")


def flop_counter():
    """torch's FlopCounterMode (no display), also counting `addmm_` (the per-expert kernel
    accumulates its range products in place, and torch's registry knows only the out-of-place
    addmm), `_grouped_mm` (the grouped kernel; not in torch's registry) and the CPU's flash
    attention, forward and backward, as torch counts its CUDA kernels (the full S x S products)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
    aten = torch.ops.aten

    def attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    def attention_backward_flops(grad_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                 **kwargs) -> int:
        return sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)

    def addmm_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        # a [n, K] x b [E, K, N] (each row with its group's matrix), or a [U, n] x b [n, D]
        # (each group's rows reduced): 2 a0 a1 b[-1] either way
        return 2 * a_shape[0] * a_shape[1] * b_shape[-1]
    return FlopCounterMode(display=False, custom_mapping={
        aten.addmm_: addmm_flops, aten._grouped_mm: grouped_mm_flops,
        aten._scaled_dot_product_flash_attention_for_cpu: attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward_flops})


def flops_per_token(model: ModelConfig, moe: MoEConfig, units_per_token: Sequence[float],
                    context: float, convention: str = "standard") -> dict[str, float]:
    """FLOPs of one token's forward. `units_per_token[l]`: expert hidden units executed per
    token in MoE layer l (summed over its k slots; k * H at full width without drops);
    `context`: the attended length S of the forward (token-weighted mean over forwards)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOPs convention {convention!r}: expected one of {CONVENTIONS}")
    d, H, L = model.hidden_size, model.ffn_hidden_size, model.num_layers
    gated = 3 if model.activation == "swiglu" else 2          # matrices per FFN
    n_moe = model.num_moe_layers
    if len(units_per_token) != n_moe:
        raise ValueError(f"{len(units_per_token)} MoE layer widths for a model with {n_moe} MoE layers")
    projections, score_dims = attention_shape(model)
    macs = {"moe": gated * d * float(sum(units_per_token)),
            "attention": L * projections,
            "other": (L - n_moe) * gated * d * H}
    if convention == "paper":
        return {**macs, "total": sum(macs.values())}
    macs["moe"] += n_moe * d * moe.num_experts
    macs["attention"] += L * context * score_dims
    macs["other"] += d * model.vocab_size
    flops = {k: 2.0 * v for k, v in macs.items()}
    return {**flops, "total": sum(flops.values())}


def attention_shape(model: ModelConfig) -> tuple[int, int]:
    """(projection MACs per token and layer, score dims): attention scores cost
    `context * score_dims` MACs per token and layer (QK^T plus AV).

    GPT-2: Q, K, V and output projections of d x d; scores over d for QK^T and for AV.
    DeepSeek-V2 MLA: query (direct or low-rank), the shared latent plus rotary key, the
    latent's expansion to per-head keys and values, and the output projection; scores over
    the query/key head dim (Q + P) and the value head dim V of every head.
    """
    d = model.hidden_size
    if model.family != "deepseek_v2":
        return 4 * d * d, 2 * d
    hf = model.hf
    N, R, P = hf["num_attention_heads"], hf["kv_lora_rank"], hf["qk_rope_head_dim"]
    Q, V, qr = hf["qk_nope_head_dim"], hf["v_head_dim"], hf.get("q_lora_rank")
    query = d * qr + qr * N * (Q + P) if qr else d * N * (Q + P)
    return query + d * (R + P) + R * N * (Q + V) + N * V * d, N * (Q + P + V)


def full_width_units(model: ModelConfig, moe: MoEConfig, width: float = 1.0) -> list[float]:
    """Units per token of every MoE layer when all k slots run at `width` and none is dropped,
    plus the shared experts (at `width` too when they are slimmable)."""
    m = int(hidden_units(torch.tensor(width), model.expert_hidden_size, moe.width_quantum))
    shared = model.shared_expert_hidden_size
    if shared and moe.shared_slimmable:
        shared = int(hidden_units(torch.tensor(width), shared, moe.width_quantum))
    return [float(moe.top_k * m + shared)] * model.num_moe_layers


def forward_flops_per_token(model: ModelConfig, moe: MoEConfig, width: float = 1.0,
                            convention: str = "standard") -> dict[str, float]:
    """Nominal FLOPs per token at a uniform width, full context, no drops."""
    return flops_per_token(model, moe, full_width_units(model, moe, width), model.seq_len, convention)


def two_pass_cost_ratio(model: ModelConfig, moe: MoEConfig, width: float) -> float:
    """Predicted (full + width-w pass) / (full pass) training cost from FLOPs."""
    full = forward_flops_per_token(model, moe, 1.0)["total"]
    return (full + forward_flops_per_token(model, moe, width)["total"]) / full


class FlopsMeter:
    """Accumulates what forwards ran (per MoE layer: `RoutingInfo.units` executed and
    `RoutingInfo.nominal_units`, tokens, context) and reports token-averaged FLOPs in both
    conventions, nominal or executed. Nominal units stay on the device until read."""

    def __init__(self, model: ModelConfig, moe: MoEConfig):
        self.model, self.moe = model, moe
        self.tokens = 0
        self.token_context = 0.0     # sum over forwards of T * S
        self.units: list[float] | None = None
        self.nominal: list | None = None

    def add(self, routing: Sequence, seq_len: int) -> None:
        """One forward: its list of RoutingInfo (one per MoE layer) and its sequence length."""
        units = [float(r.units) for r in routing]
        nominal = [r.nominal_units for r in routing]
        if self.units is None:
            self.units, self.nominal = [0.0] * len(units), [0] * len(units)
        tokens = routing[0].tokens if routing else 0
        self.units = [a + b for a, b in zip(self.units, units)]
        self.nominal = [a + b for a, b in zip(self.nominal, nominal)]
        self.tokens += tokens
        self.token_context += tokens * seq_len

    def layer_units(self, executed: bool = False) -> list[float]:
        """Expert hidden units per token of each MoE layer, nominal or executed."""
        if not self.tokens:
            raise ValueError("FlopsMeter: no forward recorded")
        return [float(u) / self.tokens for u in (self.units if executed else self.nominal)]

    def per_token(self, convention: str = "standard", executed: bool = False) -> dict[str, float]:
        return flops_per_token(self.model, self.moe, self.layer_units(executed),
                               self.token_context / self.tokens, convention)

    def mflops(self, executed: bool = False) -> dict[str, float]:
        """Total MFLOPs per token in both conventions, nominal (the paper's) or executed."""
        return {c: self.per_token(c, executed)["total"] / 1e6 for c in CONVENTIONS}

    def mean_width(self, executed: bool = False) -> float:
        """Expert hidden units (routed and any shared; nominal or executed) over those of the
        model at full width."""
        if not self.tokens:
            return float("nan")
        return sum(self.layer_units(executed)) / sum(full_width_units(self.model, self.moe))
