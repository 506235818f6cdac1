"""Fused causal attention: equal to megatron's DotProductAttention and to the multi-latent
reference, on the fused kernel, with memory linear in the sequence."""

from __future__ import annotations

import functools
import operator
import os
import subprocess
import sys

import pytest
import torch
from torch.profiler import profile

from conftest import ROOT, clean_env, tiny_config
from mose_ds.attention import FusedCausalAttention, causal_attention
from mose_ds.config import from_dict

TINY_DEEPSEEK = os.path.join(ROOT, "ds_configs", "hf", "tiny_deepseek_v2", "config.json")

FLASH_CPU = "aten::_scaled_dot_product_flash_attention_for_cpu"


def _qkv(S=48, B=2, N=4, H=16, V=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(S, B, N, H), (S, B, N, H), (S, B, N, V or H)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).float().requires_grad_() for s in shapes]


def megatron_attention(monkeypatch, N: int, H: int):
    """megatron's local DotProductAttention, its CUDA-only score buffer and RNG tracker
    redirected to the CPU for this test only."""
    from megatron.core import utils as mcore_utils
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from mose_ds.model import transformer_config

    def get_tensor(self, shape, dtype, name, mem_alloc_context=None):
        return torch.empty(functools.reduce(operator.mul, shape, 1), dtype=dtype).view(*shape)

    class CpuTracker:
        def fork(self, name=None):
            import contextlib
            return contextlib.nullcontext()

    monkeypatch.setattr(mcore_utils.GlobalMemoryBuffer, "get_tensor", get_tensor)
    monkeypatch.setattr(mcore_random, "get_cuda_rng_tracker", lambda *a, **k: CpuTracker())
    import megatron.core.tensor_parallel as tp
    monkeypatch.setattr(tp, "get_cuda_rng_tracker", lambda *a, **k: CpuTracker())
    cfg = tiny_config(model={"num_heads": N, "hidden_size": N * H})
    tconfig = transformer_config(cfg.model)
    return (DotProductAttention(tconfig, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                attention_type="self"),
            FusedCausalAttention(tconfig, layer_number=1, attn_mask_type=AttnMaskType.causal))


def test_fused_attention_equals_megatron_dot_product_attention(world, monkeypatch):
    reference, fused = megatron_attention(monkeypatch, N=4, H=16)
    q, k, v = _qkv()
    S = q.shape[0]
    mask = torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1)[None, None]   # True: masked out
    grad_out = torch.randn(S, q.shape[1], 4 * 16, generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for module in (reference, fused):
        out = module(q, k, v, mask)
        (dq, dk, dv) = torch.autograd.grad(out, (q, k, v), grad_out)
        outs.append(out)
        grads.append((dq, dk, dv))
    assert outs[1].shape == outs[0].shape == (S, 2, 64)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def math_attention(q_BNSH, k_BNSH, v_BNSV, scale):
    """softmax(q k^T scale, causal) v in plain float64 operations."""
    S = q_BNSH.shape[-2]
    scores = (q_BNSH.double() @ k_BNSH.double().transpose(-1, -2)) * scale
    scores = scores.masked_fill(torch.triu(torch.ones(S, S, dtype=torch.bool), 1), float("-inf"))
    return (scores.softmax(-1) @ v_BNSV.double()).float()


def test_multi_latent_shapes_take_the_flash_kernel_and_equal_the_reference():
    # DeepSeek-V2's arrangement in miniature: q/k head dim 24 (16 no-rope + 8 rope), v 16.
    q, k, v = (t.permute(1, 2, 0, 3).detach().requires_grad_() for t in _qkv(S=40, H=24, V=16))
    scale = 24 ** -0.5
    with profile() as prof:
        out = causal_attention(q, k, v, scale)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    kernels = {e.name for e in prof.events()}
    assert FLASH_CPU in kernels and "aten::_scaled_dot_product_attention_math" not in kernels
    ref = math_attention(q, k, v, scale)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert out.shape == (2, 4, 40, 16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "deepseek_v2"])
def test_every_block_runs_the_fused_kernel_forward_and_backward(world, family):
    from mose_ds.model import MoSEGPT
    cfg = tiny_config() if family == "gpt2" else from_dict({"model": {"hf_config": TINY_DEEPSEEK, "seq_len": 32}})
    model = MoSEGPT(cfg.model, cfg.moe)
    model.init_weights(0)
    with profile() as prof:
        logits, _ = model(torch.randint(0, cfg.model.vocab_size, (2, 16)))
        logits.sum().backward()
    names = [e.name for e in prof.events()]
    assert names.count(FLASH_CPU) == names.count(FLASH_CPU + "_backward") == cfg.model.num_layers
    assert "aten::baddbmm" not in names and "aten::_scaled_dot_product_attention_math" not in names


ATTENTION_PEAK = """
import sys, torch
from mose_ds import measure
from mose_ds.attention import causal_attention
S = int(sys.argv[1])
torch.manual_seed(0)
q, k, v = (torch.randn(1, 8, S, 64, requires_grad=True) for _ in range(3))
measure.reset_peak()
base = measure.current()
out = causal_attention(q, k, v, 0.125)
out.backward(torch.ones_like(out))
print(measure.peak() - base)
"""


def attention_peak(seq: int) -> int:
    """Peak bytes of one attention forward + backward (8 heads of 64) over its inputs, in a
    fresh process whose freed tensors leave the resident set."""
    env = {**clean_env(), "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", ATTENTION_PEAK, str(seq)], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs a resettable resident peak")
def test_attention_memory_grows_linearly_with_the_sequence():
    short, long = attention_peak(512), attention_peak(2048)
    # 4x the tokens: linear growth is 4x; the S x S scores of the unfused path grow 16x.
    assert long <= 5 * short, (short, long)
