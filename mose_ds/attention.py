"""Causal self-attention on torch's fused `scaled_dot_product_attention`.

megatron's local `DotProductAttention` materialises the S x S scores (baddbmm, an fp32
masked softmax, bmm) and keeps the probabilities for backward: the largest activation of a
block at sequence 1024-4096, and a slow kernel. `FusedCausalAttention` takes its place in
the `core_attention` slot of the GPT layer spec and runs one fused kernel that keeps only
q, k, v, the output and one fp32 log-sum-exp per row, so attention memory grows linearly
with the sequence: flash or memory-efficient attention on CUDA (the slow math fallback is
not allowed, so a shape the fused kernels refuse fails loudly), flash attention on CPU.

Both fused kernels need one head dim for q, k and v. DeepSeek's multi-latent attention has
q/k heads of 192 and v heads of 128: `causal_attention` pads v with zero columns to the q/k
head dim and drops them from the output, which is exact (the padded columns of
`probs @ v` are zero) and costs a 1.5x copy of v.

Shape legend: B batch, N heads, S sequence, H q/k head dim, V value head dim.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# The kernels allowed on CUDA, best first; the math fallback (S x S probabilities) is not.
CUDA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def _kernels(device: torch.device):
    """On CUDA only the fused kernels: a shape they refuse fails instead of silently taking the
    math fallback's S x S memory. The CPU's choice is left to torch (flash for our shapes;
    tests/test_attention.py checks it)."""
    return sdpa_kernel(CUDA_BACKENDS) if device.type == "cuda" else contextlib.nullcontext()


def causal_attention(q_BNSH: torch.Tensor, k_BNSH: torch.Tensor, v_BNSV: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v through a fused kernel: [B, N, S, V]."""
    H, V = q_BNSH.shape[-1], v_BNSV.shape[-1]
    if V < H:      # the fused kernels need equal head dims: zero columns, dropped below
        v_BNSV = F.pad(v_BNSV, (0, H - V))
    with _kernels(q_BNSH.device):
        o_BNSH = F.scaled_dot_product_attention(q_BNSH, k_BNSH, v_BNSV, is_causal=True, scale=scale)
    return o_BNSH[..., :V] if V < H else o_BNSH


def backend_name(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int, seq: int = 128) -> str:
    """The fused kernel `causal_attention` takes on `device` for these shapes (for the
    environment banner): 'flash', 'memory-efficient', or 'flash (CPU)'."""
    if device.type != "cuda":
        return "flash (CPU)"
    shape = (1, heads, seq, head_dim)
    q = torch.empty(shape, device=device, dtype=dtype)
    params = torch.backends.cuda.SDPAParams(q, q, q, None, 0.0, True, False)
    if torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.can_use_flash_attention(params):
        return "flash"
    if torch.backends.cuda.mem_efficient_sdp_enabled() and torch.backends.cuda.can_use_efficient_attention(params):
        return "memory-efficient"
    return "none (no fused kernel accepts these shapes; attention will fail)"


class FusedCausalAttention(nn.Module):
    """megatron's `core_attention` interface ([S, B, N, H] q, k, v in; [S, B, N * H] out)
    on `causal_attention`. The attention mask argument is ignored: the kernel applies the
    causal mask itself (the only mask our blocks use, checked at construction)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, softmax_scale=None,
                 **_megatron_kwargs):
        super().__init__()
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"FusedCausalAttention: attention mask type {attn_mask_type} is not causal")
        if config.num_query_groups not in (None, config.num_attention_heads) or config.attention_dropout:
            raise ValueError(f"FusedCausalAttention: num_query_groups={config.num_query_groups} with "
                             f"{config.num_attention_heads} heads, attention_dropout={config.attention_dropout}: "
                             "grouped-query attention and attention dropout are not supported")
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query_SBNH, key_SBNH, value_SBNH, attention_mask=None, **_unused):
        S, B, N, _ = query_SBNH.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query_SBNH, key_SBNH, value_SBNH))
        o_BNSH = causal_attention(q, k, v, self.scale)
        return o_BNSH.permute(2, 0, 1, 3).reshape(S, B, -1)
