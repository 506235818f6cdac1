"""MoSE (Mixture of Slimmable Experts) causal LM for `transformers` (trust_remote_code).

The same maths as MoSE-DS (`mose_ds.model`, `moe_layer`, `widths`, `deepseek`), written for
`transformers` and torch alone. Two families: GPT-2 MoSE (learned positions, LayerNorm, GELU,
MoE in every `moe_every`-th block from `moe_offset`) and DeepSeek-V2 (multi-latent attention
with yarn rotary, RMSNorm, SwiGLU, dense first blocks, shared experts).

Expert widths: each routed expert of a token runs its first ceil(w H) hidden units, w given
by the width policy, set in the config (`width_policy`) or per call
(`model(ids, width_policy={...})`, `model.generate(..., width_policy={...})`):

    {"kind": "full"}                                   every expert at full width
    {"kind": "uniform", "width": 0.5}                  every expert at one width
    {"kind": "normprob", "budget": 1.0, "gamma": 1.0}  w_i = clip(Gamma p_i^g / sum_j p_j^g, wmin, wmax)
    {"kind": "gamma", "budget": 1.0, "gamma_mode": "layerwise"}   g from the calibrated gamma table

rounded to the training grid (`"continuous": true` keeps them exact); any policy may add
`"top_k": k'` to route to fewer experts. The model is dropless: no expert capacity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_mose import MoSEConfig


# --------------------------------------------------------------------------- widths

def hidden_units(w_TK: torch.Tensor, hidden: int, quantum: int = 1) -> torch.Tensor:
    """m(w) = ceil(w H) in [1, H], rounded up to a multiple of `quantum`."""
    m = torch.ceil(w_TK.float() * hidden - 1e-4).clamp_(1, hidden).long()
    if quantum > 1:
        m = (torch.div(m + quantum - 1, quantum, rounding_mode="floor") * quantum).clamp_(max=hidden)
    return m


def round_to_grid(w_TK: torch.Tensor, grid) -> torch.Tensor:
    """Each width to the nearest grid point (ties to the larger)."""
    g = torch.tensor(sorted(grid), dtype=torch.float32, device=w_TK.device)
    dist = (w_TK.float().unsqueeze(-1) - g).abs()
    return g.flip(0)[dist.flip(-1).argmin(-1)]


class WidthPolicy:
    """A policy dict (module docstring) resolved against the config: `widths(p_TK, layer)`."""

    KINDS = ("full", "uniform", "normprob", "gamma")

    def __init__(self, spec: dict, config: MoSEConfig):
        spec = dict(spec or {"kind": "full"})
        self.kind = spec.get("kind", "full")
        if self.kind not in self.KINDS:
            raise ValueError(f"width_policy kind {self.kind!r}: expected one of {', '.join(self.KINDS)}")
        self.top_k = spec.get("top_k") or config.routed_top_k
        if not 1 <= self.top_k <= config.routed_top_k:
            raise ValueError(f"width_policy top_k={self.top_k}: needs 1 <= k' <= trained k={config.routed_top_k}")
        self.width = float(spec.get("width", 1.0))
        if not 0 < self.width <= 1:
            raise ValueError(f"width_policy width {self.width} is outside (0, 1]")
        self.wmin, self.wmax = config.width_min, config.width_max
        self.grid = None if spec.get("continuous") else config.grid
        self.budget, self.gammas = spec.get("budget"), None
        if self.kind in ("normprob", "gamma"):
            if self.budget is None or not 0 < float(self.budget) <= config.routed_top_k:
                raise ValueError(f"width_policy {self.kind} needs a budget in (0, k={config.routed_top_k}]")
            self.budget = float(self.budget)
            self.gammas = [float(spec.get("gamma", 1.0))] if self.kind == "normprob" else \
                self._table(config, spec.get("gamma_mode", "layerwise"))

    def _table(self, config: MoSEConfig, mode: str) -> list[float]:
        table = (config.gamma_table or {}).get("modes", {}).get(mode)
        if not table:
            raise ValueError(f"width_policy gamma: the export carries no {mode!r} gamma table")
        for entry in table:
            if abs(entry["budget"] - self.budget) < 1e-9:
                deployed = config.gamma_table.get("policy", {})
                self.wmin, self.wmax = deployed.get("wmin", self.wmin), deployed.get("wmax", self.wmax)
                if not deployed.get("round_to_grid", True):
                    self.grid = None
                return [float(g) for g in entry["gamma"]]
        raise ValueError(f"width_policy gamma: no budget {self.budget:g} in the {mode!r} table "
                         f"(calibrated: {[e['budget'] for e in table]})")

    def widths(self, p_TK: torch.Tensor, layer: int) -> torch.Tensor:
        if self.kind in ("full", "uniform"):
            return torch.full_like(p_TK, 1.0 if self.kind == "full" else self.width, dtype=torch.float32)
        gamma = self.gammas[0] if len(self.gammas) == 1 else self.gammas[layer]
        q_TK = torch.softmax(gamma * p_TK.float().clamp_min(1e-30).log(), dim=-1)     # p^g / sum p^g
        w_TK = (self.budget * q_TK).clamp(self.wmin, self.wmax)
        return w_TK if self.grid is None else round_to_grid(w_TK, self.grid)


# --------------------------------------------------------------------------- experts

class Expert(nn.Module):
    """An FFN whose weights are stored hidden-major ([H, D]): width m uses rows 0..m-1."""

    def __init__(self, hidden: int, ffn: int, activation: str):
        super().__init__()
        self.activation = activation
        if activation == "swiglu":
            self.w_gate = nn.Parameter(torch.empty(ffn, hidden))
        self.w_up = nn.Parameter(torch.empty(ffn, hidden))
        self.w_down = nn.Parameter(torch.empty(ffn, hidden))

    def forward(self, x_ND: torch.Tensor, m: int) -> torch.Tensor:
        up = F.linear(x_ND, self.w_up[:m])
        h = F.silu(F.linear(x_ND, self.w_gate[:m])) * up if self.activation == "swiglu" else F.gelu(up)
        return h @ self.w_down[:m]


class Router(nn.Module):
    def __init__(self, hidden: int, experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden))


class SlimmableMoE(nn.Module):
    """Routed experts at the policy's widths, summed with the router's weights in fp32 (choice
    0 first), plus the shared experts (full width, or the routed experts' mean width)."""

    def __init__(self, config: MoSEConfig, layer_index: int):
        super().__init__()
        D, H = config.hidden_size, config.expert_hidden
        self.config, self.layer_index, self.H = config, layer_index, H
        self.router = Router(D, config.num_experts)
        self.experts = nn.ModuleList(Expert(D, H, config.activation) for _ in range(config.num_experts))
        self.shared_ffn = Expert(D, config.shared_hidden, config.activation) if config.shared_hidden else None

    def route(self, x_TD: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        logits_TE = F.linear(x_TD.float(), self.router.weight.float())
        if c.router_scores == "topk_softmax":
            top_TK, idx_TK = logits_TE.topk(k, dim=-1)
            p_TK = torch.softmax(top_TK, dim=-1)
        else:
            p_TK, idx_TK = torch.softmax(logits_TE, dim=-1).topk(k, dim=-1)
            if c.router_normalize:
                p_TK = p_TK / p_TK.sum(dim=-1, keepdim=True)
        return idx_TK, p_TK * c.router_scale

    def forward(self, x_SBD: torch.Tensor, policy: WidthPolicy) -> torch.Tensor:
        shape = x_SBD.shape
        x_TD = x_SBD.reshape(-1, shape[-1])
        idx_TK, p_TK = self.route(x_TD, policy.top_k)
        w_TK = policy.widths(p_TK, self.layer_index)
        m_TK = hidden_units(w_TK, self.H, self.config.width_quantum)
        T, K = idx_TK.shape
        expert_N, m_N = idx_TK.flatten(), m_TK.flatten()               # slot n = (token n // K, choice n % K)
        token_N = torch.arange(T, device=x_TD.device).repeat_interleave(K)
        y_ND = x_TD.new_zeros(T * K, x_TD.shape[-1])
        for e, m in torch.unique(torch.stack([expert_N, m_N], 1), dim=0).tolist():   # one product per (expert, size)
            rows_N = (expert_N == e) & (m_N == m)
            y_ND[rows_N] = self.experts[e](x_TD[token_N[rows_N]], m)
        y_TKD = y_ND.view(T, K, -1)
        out_TD = y_TKD[:, 0].float() * p_TK[:, :1]
        for k in range(1, idx_TK.shape[1]):
            out_TD = out_TD.addcmul(y_TKD[:, k].float(), p_TK[:, k:k + 1])
        out_TD = out_TD.to(x_TD.dtype)
        if self.shared_ffn is not None:
            out_TD = out_TD + self._shared(x_TD, w_TK)
        return out_TD.view(shape)

    def _shared(self, x_TD: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        H = self.config.shared_hidden
        if not self.config.shared_slimmable:
            return self.shared_ffn(x_TD, H)
        m_T = hidden_units(w_TK.mean(-1), H, self.config.width_quantum)
        out_TD = torch.zeros_like(x_TD)
        for m in torch.unique(m_T).tolist():
            rows = m_T == m
            out_TD[rows] = self.shared_ffn(x_TD[rows], m)
        return out_TD


class DenseMLP(nn.Module):
    """megatron's MLP: fc1 (SwiGLU: gate rows, then up rows), the activation, fc2."""

    def __init__(self, config: MoSEConfig):
        super().__init__()
        F_ = config.ffn_hidden * (2 if config.activation == "swiglu" else 1)
        self.activation = config.activation
        self.linear_fc1 = nn.Linear(config.hidden_size, F_, bias=False)
        self.linear_fc2 = nn.Linear(config.ffn_hidden, config.hidden_size, bias=False)

    def forward(self, x, policy=None):
        h = self.linear_fc1(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.linear_fc2(h)


# --------------------------------------------------------------------------- attention

class GPT2Attention(nn.Module):
    """megatron's self-attention: fused qkv (per head: q, k, v), causal softmax, projection."""

    def __init__(self, config: MoSEConfig):
        super().__init__()
        self.N, self.hd = config.num_heads, config.hidden_size // config.num_heads
        self.linear_qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.linear_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        qkv = self.linear_qkv(x_BSD).view(B, S, self.N, 3, self.hd)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(self.hd))
        return self.linear_proj(o.transpose(1, 2).reshape(B, S, -1))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _rope(hf: dict) -> dict:
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    rope["rope_theta"] = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return rope


def _inv_freq(dim: int, rope: dict) -> tuple[torch.Tensor, float]:
    """Plain or yarn rotary frequencies and their cos/sin scale (DeepSeek-V2's)."""
    base = float(rope["rope_theta"])
    freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if rope["rope_type"] in ("default", None):
        return freq, 1.0
    factor, orig = float(rope["factor"]), rope["original_max_position_embeddings"]
    mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rope.get("beta_fast") or 32)), 0)
    high = min(math.ceil(correction_dim(rope.get("beta_slow") or 1)), dim - 1)
    keep = 1.0 - ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    inv = freq / factor * (1 - keep) + freq * keep
    scale = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all \
        else _yarn_mscale(factor)
    return inv, scale


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1])."""
    xf = x.float()
    even, odd = xf[..., 0::2], xf[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).to(x.dtype)


class MultiLatentAttention(nn.Module):
    """DeepSeek-V2's attention: queries (optionally low-rank), keys and values from a shared
    normed latent plus one rotary key shared by the heads."""

    def __init__(self, config: MoSEConfig):
        super().__init__()
        hf = config.hf
        D, N = hf["hidden_size"], hf["num_attention_heads"]
        self.N, self.R, self.P = N, hf["kv_lora_rank"], hf["qk_rope_head_dim"]
        self.Q, self.V = hf["qk_nope_head_dim"], hf["v_head_dim"]
        self.q_lora_rank = hf.get("q_lora_rank")
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=False)
            self.q_a_layernorm = nn.RMSNorm(self.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(self.q_lora_rank, N * (self.Q + self.P), bias=False)
        else:
            self.q_proj = nn.Linear(D, N * (self.Q + self.P), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.R + self.P, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(self.R, eps=1e-6)
        self.kv_b_proj = nn.Linear(self.R, N * (self.Q + self.V), bias=False)
        self.o_proj = nn.Linear(N * self.V, D, bias=False)
        self.rope = rope = _rope(hf)
        self.scale = (self.Q + self.P) ** -0.5
        if rope["rope_type"] not in ("default", None) and rope.get("mscale_all_dim"):
            self.scale *= _yarn_mscale(float(rope["factor"]), rope["mscale_all_dim"]) ** 2

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD))) if self.q_lora_rank else self.q_proj(x_BSD)
        q_nope, q_rope = q.view(B, S, self.N, self.Q + self.P).transpose(1, 2).split([self.Q, self.P], dim=-1)
        kv, k_rope = self.kv_a_proj_with_mqa(x_BSD).split([self.R, self.P], dim=-1)
        # made here, not kept as a buffer: from_pretrained builds modules on the meta device and
        # does not restore non-persistent buffers
        inv_freq, rope_scale = _inv_freq(self.P, self.rope)
        angles = torch.arange(S, device=x_BSD.device, dtype=torch.float32)[:, None] * inv_freq.to(x_BSD.device)
        cos, sin = angles.cos() * rope_scale, angles.sin() * rope_scale
        q_rope, k_rope = _apply_rope(q_rope, cos, sin), _apply_rope(k_rope.unsqueeze(1), cos, sin)
        kv = self.kv_b_proj(self.kv_a_layernorm(kv)).view(B, S, self.N, self.Q + self.V).transpose(1, 2)
        k_nope, v = kv.split([self.Q, self.V], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, self.N, S, self.P)], dim=-1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.N * self.V))


# --------------------------------------------------------------------------- model

class Block(nn.Module):
    def __init__(self, config: MoSEConfig, index: int, moe_index: int | None):
        super().__init__()
        D, eps = config.hidden_size, config.layernorm_eps
        norm = (lambda: nn.RMSNorm(D, eps=eps)) if config.family == "deepseek_v2" else (lambda: nn.LayerNorm(D, eps=eps))
        self.input_layernorm, self.pre_mlp_layernorm = norm(), norm()
        self.self_attention = MultiLatentAttention(config) if config.family == "deepseek_v2" else GPT2Attention(config)
        self.mlp = SlimmableMoE(config, moe_index) if moe_index is not None else DenseMLP(config)

    def forward(self, h_BSD: torch.Tensor, policy: WidthPolicy) -> torch.Tensor:
        h_BSD = h_BSD + self.self_attention(self.input_layernorm(h_BSD))
        return h_BSD + self.mlp(self.pre_mlp_layernorm(h_BSD), policy)


class MoSEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MoSEConfig
    base_model_prefix = "mose"
    _no_split_modules = ["Block"]

    def __init__(self, config: MoSEConfig):
        super().__init__(config)
        D = config.hidden_size
        self.wte = nn.Embedding(config.vocab_size, D)
        self.wpe = nn.Embedding(config.seq_len, D) if config.family == "gpt2" else None
        moe = [i >= config.moe_offset and (i - config.moe_offset) % config.moe_every == 0
               for i in range(config.num_layers)]
        self.layers = nn.ModuleList(Block(config, i, sum(moe[:i]) if moe[i] else None)
                                    for i in range(config.num_layers))
        self.final_norm = nn.RMSNorm(D, eps=config.layernorm_eps) if config.family == "deepseek_v2" \
            else nn.LayerNorm(D, eps=config.layernorm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(D, config.vocab_size, bias=False)
        self.width_policy = WidthPolicy(config.width_policy, config)
        self.post_init()

    def _init_weights(self, module):
        """Weights come from the export; nothing to initialise."""

    def get_input_embeddings(self):
        return self.wte

    def set_width_policy(self, spec: dict) -> None:
        """The policy of every later call that names none."""
        self.width_policy = WidthPolicy(spec, self.config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels=None,
                width_policy: dict | None = None, **_unused) -> CausalLMOutput:
        """Logits of every position (no KV cache: `generate` feeds the whole sequence).
        `attention_mask` must be all ones (left padding would shift learned positions)."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("MoSEForCausalLM takes unpadded sequences (attention_mask all ones)")
        policy = self.width_policy if width_policy is None else WidthPolicy(width_policy, self.config)
        S = input_ids.shape[1]
        h = self.wte(input_ids)
        if self.wpe is not None:
            h = h + self.wpe(torch.arange(S, device=input_ids.device))
        for layer in self.layers:
            h = layer(h, policy)
        head = self.wte.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(self.final_norm(h), head)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, width_policy=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask, "width_policy": width_policy}
