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


def _kernels(device: torch.device, masked: bool = False):
    """On CUDA only the fused kernels: a shape they refuse fails instead of silently taking the
    math fallback's S x S memory. A masked call (decoding against a KV cache: a few queries
    per row) may also take the math kernel, whose memory is queries x slots. The CPU's choice
    is left to torch (flash for our causal shapes; tests/test_attention.py checks it)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(CUDA_BACKENDS + [SDPBackend.MATH] if masked else CUDA_BACKENDS)


def causal_attention(q_BNSH: torch.Tensor, k_BNLH: torch.Tensor, v_BNLV: torch.Tensor,
                     scale: float, visible_B1SL: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v through a fused kernel: [B, N, S, V].

    Without `visible_B1SL` the queries and keys are the same S positions (causal from the
    top left); with it (decoding: S new queries against L cached slots) query i of row b
    sees the slots where `visible_B1SL[b, 0, i]` is true."""
    H, V = q_BNSH.shape[-1], v_BNLV.shape[-1]
    if V < H:      # the fused kernels need equal head dims: zero columns, dropped below
        v_BNLV = F.pad(v_BNLV, (0, H - V))
    with _kernels(q_BNSH.device, masked=visible_B1SL is not None):
        o_BNSH = F.scaled_dot_product_attention(q_BNSH, k_BNLH, v_BNLV, attn_mask=visible_B1SL,
                                                is_causal=visible_B1SL is None, scale=scale)
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


class FullSequence:
    """The attention context of a whole-sequence forward (training, evaluation; decoding
    against a KV cache has its own, kv_cache.py): positions 0..S-1, nothing stored, the
    fused causal kernel. Stateless; `FULL_SEQUENCE` is the one instance."""

    def layer(self, index: int) -> "FullSequence":
        return self

    def positions(self, S: int, device) -> torch.Tensor:
        return torch.arange(S, device=device)                                     # [S]

    def extend(self, *new_BqX: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return new_BqX

    def attend(self, q_BNqH, k_BNLH, v_BNLV, scale: float) -> torch.Tensor:
        return causal_attention(q_BNqH, k_BNLH, v_BNLV, scale)

    def latent_attention(self, mla, *args) -> torch.Tensor:
        """Multi-latent attention over the whole sequence: keys and values expanded."""
        return mla.expanded(self, *args)


FULL_SEQUENCE = FullSequence()


def context_of(attention_mask):
    """The attention context carried in megatron's `attention_mask` argument: ours when the
    model passes one (kv_cache.py), else the whole sequence (megatron's own callers pass
    None or its causal mask tensor, which the fused kernel reproduces)."""
    return attention_mask if hasattr(attention_mask, "attend") else FULL_SEQUENCE


class FusedCausalAttention(nn.Module):
    """megatron's `core_attention` interface ([S, B, N, H] q, k, v in; [S, B, N * H] out)
    on `causal_attention`. The attention mask argument carries the attention context of
    `kv_cache.py` instead of a mask: the only mask our blocks use is causal (checked at
    construction), which the context applies."""

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
        """`attention_mask`: the forward's attention context (kv_cache.py; None: the whole
        sequence), which stores this chunk's keys and values when decoding."""
        context = context_of(attention_mask)
        S, B, N, _ = query_SBNH.shape
        k_BLNH, v_BLNH = context.extend(key_SBNH.transpose(0, 1), value_SBNH.transpose(0, 1))
        o_BNSH = context.attend(query_SBNH.permute(1, 2, 0, 3), k_BLNH.transpose(1, 2), v_BLNH.transpose(1, 2),
                                self.scale)
        return o_BNSH.permute(2, 0, 1, 3).reshape(S, B, -1)
