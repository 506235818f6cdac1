"""FLOPs per token at a uniform expert width, standard convention (DESIGN section 5).

2 FLOPs per multiply-accumulate; counted: attention projections (4 d^2 MACs), attention
scores (2 * S * d MACs: QK^T and AV over the full context), dense FFN (2 * d * H), each of the
k executed experts at m(w) = ceil(w * H) hidden units (2 * d * m(w)), the router (d * E) and
the LM head (d * V). Embedding lookups, norms and softmaxes are not counted. A training step
costs three forward passes (forward + backward). Pure functions of the config.
"""

from __future__ import annotations

import math

from .config import ModelConfig, MoEConfig


def forward_flops_per_token(model: ModelConfig, moe: MoEConfig, width: float = 1.0) -> dict[str, float]:
    d, H, S = model.hidden_size, model.ffn_hidden_size, model.seq_len
    gated = 3 if model.activation == "swiglu" else 2          # matrices per FFN
    m = min(H, max(1, math.ceil(width * H - 1e-4)))
    n_moe = sum(model.is_moe_layer(i) for i in range(model.num_layers))
    n_dense = model.num_layers - n_moe
    macs = {
        "attention": model.num_layers * (4 * d * d + 2 * S * d),
        "moe": n_moe * (moe.top_k * gated * d * m + d * moe.num_experts),
        "dense_ffn": n_dense * gated * d * H,
        "lm_head": d * model.vocab_size,
    }
    flops = {k: 2.0 * v for k, v in macs.items()}
    flops["total"] = sum(flops.values())
    return flops


def two_pass_cost_ratio(model: ModelConfig, moe: MoEConfig, width: float) -> float:
    """Predicted (full + width-w pass) / (full pass) training cost from FLOPs."""
    full = forward_flops_per_token(model, moe, 1.0)["total"]
    return (full + forward_flops_per_token(model, moe, width)["total"]) / full
