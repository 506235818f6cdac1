"""The DeepSeek-V2 family: reading an HF `config.json`, yarn rotary maths, multi-latent attention.

A DeepSeek-V2 recipe names the HF config (`model.hf_config`); the architecture fields of our
`ModelConfig` are derived from it (`model_fields`) and the whole HF dict travels with every
checkpoint (`model.hf`), so a converted model can be exported back to HF unchanged.

Multi-latent attention is our own small module in megatron's `self_attention` slot rather
than megatron-core's `MLASelfAttention`: in megatron-core 0.16.1 that module's yarn rotary
embedding moves its frequencies to `torch.cuda.current_device()` on every forward
(`YarnRotaryEmbedding.get_emb`), so it cannot run on a CPU-only machine, where our tests and
the tiny recipes run. Ours follows the reference (`transformers`' `DeepseekV2Attention`)
step by step and runs on any device through the fused causal attention of `attention.py`.

Shape legend: S sequence, B batch, D model dim, N heads, R kv_lora_rank,
P rope head dim, Q no-rope head dim, V value head dim.
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn

from .attention import context_of

MODEL_TYPE = "deepseek_v2"
# HF keys every DeepSeek-V2 config must have (others have the reference's defaults).
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size",
            "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


class HFConfigError(ValueError):
    """An HF config that is not a DeepSeek-V2 config we can build; the message names it."""


def read_hf_config(path: str) -> dict:
    """The dict of an HF `config.json` (or of the folder holding one), checked for DeepSeek-V2."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise HFConfigError(f"{file}: no such file") from None
    except json.JSONDecodeError as e:
        raise HFConfigError(f"{file}: not valid JSON ({e.msg})") from None
    check_hf_config(hf, file)
    return hf


def check_hf_config(hf: dict, source: str = "HF config") -> None:
    if not isinstance(hf, dict) or hf.get("model_type") != MODEL_TYPE:
        found = hf.get("model_type") if isinstance(hf, dict) else type(hf).__name__
        raise HFConfigError(f"{source}: model_type {found!r} is not {MODEL_TYPE!r}")
    missing = [k for k in REQUIRED if k not in hf]
    if missing:
        raise HFConfigError(f"{source}: missing key(s) {', '.join(missing)}")
    unsupported = {"scoring_func": ("softmax",), "topk_method": ("greedy", None), "hidden_act": ("silu",)}
    for key, allowed in unsupported.items():
        if hf.get(key, allowed[0]) not in allowed:
            raise HFConfigError(f"{source}: {key}={hf[key]!r} is not supported (expected {allowed[0]!r})")
    if hf.get("num_key_value_heads", hf["num_attention_heads"]) != hf["num_attention_heads"]:
        raise HFConfigError(f"{source}: num_key_value_heads must equal num_attention_heads in MLA")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise HFConfigError(f"{source}: attention_bias / mlp_bias are not supported")


def model_fields(hf: dict) -> dict:
    """Our ModelConfig fields implied by an HF DeepSeek-V2 config."""
    return {"num_layers": hf["num_hidden_layers"], "num_heads": hf["num_attention_heads"],
            "hidden_size": hf["hidden_size"], "vocab_size": hf["vocab_size"],
            "ffn_hidden": hf["intermediate_size"], "expert_hidden": hf["moe_intermediate_size"],
            "moe_offset": min(hf.get("first_k_dense_replace", 0), hf["num_hidden_layers"] - 1),
            "moe_every": hf.get("moe_layer_freq", 1), "activation": "swiglu",
            "layernorm_eps": hf.get("rms_norm_eps", 1e-6), "tie_embeddings": bool(hf.get("tie_word_embeddings", False))}


def moe_fields(hf: dict) -> dict:
    """MoEConfig fields fixed by the architecture (a recipe that says otherwise is refused)."""
    return {"num_experts": hf["n_routed_experts"], "top_k": hf["num_experts_per_tok"]}


# --------------------------------------------------------------------------- rotary (yarn)

def rope_parameters(hf: dict) -> dict:
    """The rope settings whichever spelling the config uses (`rope_scaling` in the original
    DeepSeek files, `rope_parameters` in transformers 5)."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    rope["rope_theta"] = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return rope


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(dim: int, rope: dict) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim / 2] and the cos/sin scale of plain or yarn RoPE.

    Yarn blends interpolated (divided by `factor`) and original frequencies with a linear
    ramp between the correction dimensions of `beta_fast` and `beta_slow` rotations.
    """
    base = float(rope["rope_theta"])
    freq_P2 = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if rope["rope_type"] in ("default", None):
        return freq_P2, 1.0
    if rope["rope_type"] != "yarn":
        raise HFConfigError(f"rope type {rope['rope_type']!r} is not supported (expected 'yarn' or none)")
    factor, orig = float(rope["factor"]), rope["original_max_position_embeddings"]
    mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rope.get("beta_fast") or 32)), 0)
    high = min(math.ceil(correction_dim(rope.get("beta_slow") or 1)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    keep_P2 = 1.0 - ramp                                    # 1: original frequency, 0: interpolated
    inv_P2 = freq_P2 / factor * (1 - keep_P2) + freq_P2 * keep_P2
    scale = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all) if mscale and mscale_all \
        else yarn_mscale(factor)
    return inv_P2, scale


def softmax_scale(hf: dict) -> float:
    """1 / sqrt(q head dim), times mscale(factor, mscale_all_dim)^2 under yarn."""
    scale = (hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"]) ** -0.5
    rope = rope_parameters(hf)
    if rope["rope_type"] not in ("default", None) and rope.get("mscale_all_dim"):
        scale *= yarn_mscale(float(rope["factor"]), rope["mscale_all_dim"]) ** 2
    return scale


def apply_rope(x_BNSP: torch.Tensor, cos_SP2: torch.Tensor, sin_SP2: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by position angles (the reference's layout)."""
    x = x_BNSP.float()
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.stack((even * cos_SP2 - odd * sin_SP2, even * sin_SP2 + odd * cos_SP2), dim=-1)
    return out.flatten(-2).to(x_BNSP.dtype)


# --------------------------------------------------------------------------- attention

class MultiLatentAttention(nn.Module):
    """DeepSeek-V2 multi-latent attention in megatron's `self_attention` slot.

    Queries from the hidden state (or through a low-rank `q_a`/`q_b` pair with a norm when
    `q_lora_rank` is set); keys and values from a shared latent of rank R (normed, then
    expanded per head) plus one rotary key part P shared by all heads. Parameter names are
    the reference's, so conversion is a rename.
    """

    def __init__(self, config, layer_number: int, hf: dict, **_megatron_kwargs):
        super().__init__()
        D, N = hf["hidden_size"], hf["num_attention_heads"]
        self.N, self.R, self.P = N, hf["kv_lora_rank"], hf["qk_rope_head_dim"]
        self.Q, self.V = hf["qk_nope_head_dim"], hf["v_head_dim"]
        eps = 1e-6                      # the reference's latent norms ignore rms_norm_eps
        self.q_lora_rank = hf.get("q_lora_rank")
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=False)
            self.q_a_layernorm = nn.RMSNorm(self.q_lora_rank, eps=eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, N * (self.Q + self.P), bias=False)
        else:
            self.q_proj = nn.Linear(D, N * (self.Q + self.P), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.R + self.P, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(self.R, eps=eps)
        self.kv_b_proj = nn.Linear(self.R, N * (self.Q + self.V), bias=False)
        self.o_proj = nn.Linear(N * self.V, D, bias=False)
        inv_freq, self.rope_scale = rope_inv_freq(self.P, rope_parameters(hf))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scale = softmax_scale(hf)

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of positions [S] or [B, S]: [1, S, P / 2] or [B, 1, S, P / 2], which
        broadcast over the heads of [B, N, S, P]."""
        angles = positions.float()[..., None] * self.inv_freq.to(positions.device)
        return (angles.cos() * self.rope_scale).unsqueeze(-3), (angles.sin() * self.rope_scale).unsqueeze(-3)

    def forward(self, hidden_SBD: torch.Tensor, attention_mask=None, **_unused):
        """Causal self-attention; returns (output, None) like megatron's attention modules.
        `attention_mask` is the attention context (kv_cache.py; None: the whole sequence).
        A KV cache holds the compressed latent (normed, R) and the rotated shared key (P)
        per token: (R + P) values instead of N (Q + P + V)."""
        context = context_of(attention_mask)
        S, B, _ = hidden_SBD.shape
        x_BSD = hidden_SBD.transpose(0, 1)
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD))) if self.q_lora_rank else self.q_proj(x_BSD)
        q_BNSH = q.view(B, S, self.N, self.Q + self.P).transpose(1, 2)
        q_nope, q_rope = q_BNSH.split([self.Q, self.P], dim=-1)
        latent_BSRP = self.kv_a_proj_with_mqa(x_BSD)
        kv_BSR, k_rope_BSP = latent_BSRP.split([self.R, self.P], dim=-1)
        cos, sin = self.rotary(context.positions(S, x_BSD.device))
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope_BSP = apply_rope(k_rope_BSP.unsqueeze(1), cos, sin).squeeze(1)
        kv_BLR, k_rope_BLP = context.extend(self.kv_a_layernorm(kv_BSR), k_rope_BSP)
        o_BNSV = context.latent_attention(self, q_nope, q_rope, kv_BLR, k_rope_BLP)
        out_BSD = self.o_proj(o_BNSV.transpose(1, 2).reshape(B, S, self.N * self.V))
        return out_BSD.transpose(0, 1), None

    def expanded(self, context, q_nope, q_rope, kv_BLR, k_rope_BLP) -> torch.Tensor:
        """Attention over keys and values expanded from the latent of every position (the
        whole-sequence forward: L = S, one expansion per token)."""
        B, L = kv_BLR.shape[:2]
        kv_BNLH = self.kv_b_proj(kv_BLR).view(B, L, self.N, self.Q + self.V).transpose(1, 2)
        k_nope, v_BNLV = kv_BNLH.split([self.Q, self.V], dim=-1)
        q_BNSH = torch.cat([q_nope, q_rope], dim=-1)
        k_BNLH = torch.cat([k_nope, k_rope_BLP.unsqueeze(1).expand(B, self.N, L, self.P)], dim=-1)
        return context.attend(q_BNSH, k_BNLH, v_BNLV, self.scale)     # v padded for the fused kernel

    def absorbed(self, context, q_nope, q_rope, kv_BLR, k_rope_BLP) -> torch.Tensor:
        """The same attention with the key and value up-projections absorbed (decoding: a
        few queries against L cached latents). q_nope . (W_uk c) = (W_uk^T q_nope) . c, and
        sum_l p_l W_uv c_l = W_uv (sum_l p_l c_l): queries move into the latent space and
        the attention runs there, over R + P dims per position, one head-shared key and
        value; no position's keys or values are ever expanded (O(L R) per query instead of
        O(L R N (Q + V)))."""
        B, L = kv_BLR.shape[:2]
        w_NHR = self.kv_b_proj.weight.view(self.N, self.Q + self.V, self.R)
        q_lat_BNSR = torch.einsum("bnsq,nqr->bnsr", q_nope, w_NHR[:, :self.Q])
        q_BNSK = torch.cat([q_lat_BNSR, q_rope], dim=-1)
        k_B1LK = torch.cat([kv_BLR, k_rope_BLP], dim=-1).unsqueeze(1).expand(B, self.N, L, self.R + self.P)
        v_B1LR = kv_BLR.unsqueeze(1).expand(B, self.N, L, self.R)
        o_BNSR = context.attend(q_BNSK, k_B1LK, v_B1LR, self.scale)
        return torch.einsum("bnsr,nvr->bnsv", o_BNSR, w_NHR[:, self.Q:])
