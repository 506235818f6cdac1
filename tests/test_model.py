import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, clean_env, tiny_config
from mose_ds.model import lm_loss
from mose_ds.moe_layer import SlimmableMoE

TABLE3 = {  # recipe: parameters from the paper's Table 3 (medium/large as this architecture gives them)
    "gpt2_small_e8a2": 55e6, "gpt2_small_e8a4": 55e6, "gpt2_small_e16a4": 83e6,
    "gpt2_small_e64a8": 253e6, "gpt2_small_e128a8": 480e6, "gpt2_standard_e8a2": 322e6,
    "gpt2_standard_e8a4": 322e6, "gpt2_medium_e8a2": 1.06e9, "gpt2_large_e8a2": 2.43e9,
}


def build(world, **sections):
    cfg = tiny_config(**sections)
    return cfg, world.build_model(cfg)


def test_model_info_reproduces_table3_parameter_counts(world):
    from mose_ds.model import model_info
    from mose_ds.config import load_config
    for recipe, expected in TABLE3.items():
        info = model_info(load_config(os.path.join(ROOT, "ds_configs", f"{recipe}.yaml")))
        assert abs(info["params_total"] / expected - 1) < 0.02, (recipe, info["params_total"])
        assert info["params_active_per_token"] < info["params_total"]


def test_model_info_cli_prints_json():
    out = subprocess.run([sys.executable, "-m", "mose_ds.commands.info",
                          os.path.join(ROOT, "ds_configs", "gpt2_small_e8a2.yaml"), "--json"],
                         check=True, capture_output=True, text=True, env=clean_env()).stdout
    info = json.loads(out)
    assert info["params_total"] == 55_118_592 and info["params_active_per_token"] == 33_884_928
    # paper convention, d = 384: 6 x 4d^2 attention + 3 dense x 8d^2 + 3 MoE x 2 experts x 8d^2
    assert info["mflops_per_token"]["paper"] == pytest.approx((24 + 24 + 48) * 384**2 / 1e6)
    assert info["mflops_per_token"]["standard"] > 2 * info["mflops_per_token"]["paper"]


def test_moe_in_every_other_block_starting_at_zero(world):
    cfg, model = build(world, model={"num_layers": 4})
    kinds = [isinstance(layer.mlp, SlimmableMoE) for layer in model.layers]
    assert kinds == [True, False, True, False]
    assert [m.layer_index for m in model.moe_layers()] == [0, 1]


def test_swiglu_is_silu_of_gate_times_up_then_down(world):
    """A SwiGLU model's expert: silu(x W_gate) * (x W_up) W_down from its weights at full width;
    at m units, the first m of each (the rest of the weights unused, their gradient zero).
    Its dense block: megatron's GLU, gate the first half of fc1."""
    import torch.nn.functional as F
    _, model = build(world, model={"activation": "swiglu"})
    expert = model.moe_layers()[0].local_experts[0]
    gate_DH, up_DH, down_HD = expert.w_gate.t(), expert.w_up.t(), expert.w_down   # stored [H, D]
    assert gate_DH.shape == (32, 128) and down_HD.shape == (128, 32)
    x_ND = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    full = (F.silu(x_ND @ gate_DH) * (x_ND @ up_DH)) @ down_HD
    torch.testing.assert_close(expert(x_ND, 128), full)
    m = 52                                                       # ceil(0.4 * 128)
    slim = (F.silu(x_ND @ gate_DH[:, :m]) * (x_ND @ up_DH[:, :m])) @ down_HD[:m]
    assert not torch.allclose(slim, full, atol=1e-3)
    out = expert(x_ND, m)
    torch.testing.assert_close(out, slim)
    out.square().sum().backward()
    for w in (expert.w_gate, expert.w_up, expert.w_down):
        assert w.grad[m:].abs().sum() == 0 and w.grad[:m].abs().sum() > 0

    fc1, fc2 = model.layers[1].mlp.linear_fc1.weight, model.layers[1].mlp.linear_fc2.weight   # [2F, D], [D, F]
    a_DF, b_DF = fc1[:128].t(), fc1[128:].t()
    x_SBD = x_ND.view(5, 1, 32)
    dense, _ = model.layers[1].mlp(x_SBD)
    torch.testing.assert_close(dense.view(5, 32), (F.silu(x_ND @ a_DF) * (x_ND @ b_DF)) @ fc2.t())


def test_embeddings_are_tied(world):
    _, model = build(world)
    assert model.lm_head is None
    names = [n for n, _ in model.named_parameters()]
    assert "wte.weight" in names and not any("lm_head" in n or "output_layer" in n for n in names)


def test_every_expert_starts_different(world):
    _, model = build(world)
    for moe in model.moe_layers():
        ups = [e.w_up for e in moe.local_experts]
        for i in range(len(ups)):
            for j in range(i + 1, len(ups)):
                assert not torch.equal(ups[i], ups[j])


def test_init_std_is_002_and_output_projections_002_over_sqrt_2L(world):
    """Each weight's measured std against the intended one, within 5 standard errors of the
    estimate (sqrt(1 / 2n) relative): attention and MLP output projections and expert down
    projections at 0.02 / sqrt(2 L) (L = 4: 0.00707), every other matrix at 0.02 (experts, router
    and embeddings included); norms at weight 1, bias 0."""
    import math
    _, model = build(world, model={"num_layers": 4, "hidden_size": 64})
    scaled = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight", ".w_down")
    checked = {"scaled": 0, "plain": 0}
    for name, p in model.named_parameters():
        if "layernorm" in name or "final_norm" in name:
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
            continue
        kind = "scaled" if name.endswith(scaled) else "plain"
        want = 0.02 / math.sqrt(2 * 4) if kind == "scaled" else 0.02
        n = p.numel()
        assert abs(p.std().item() / want - 1) < 5 / math.sqrt(2 * n), (name, p.std().item(), want)
        assert abs(p.mean().item()) < 5 * want / math.sqrt(n), name
        checked[kind] += 1
    # scaled: 4 attention projections, 2 dense fc2, 2 MoE layers x 4 experts' down projections;
    # plain: wte, wpe, 4 qkv, 2 routers, 8 expert up projections, 2 dense fc1
    assert checked == {"scaled": 4 + 2 + 8, "plain": 2 + 4 + 2 + 8 + 2}


def test_init_is_deterministic(world):
    _, a = build(world)
    _, b = build(world)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


TINY_DEEPSEEK = os.path.join(ROOT, "ds_configs", "hf", "tiny_deepseek_v2", "config.json")


def test_norms_are_torch_norms_even_where_apex_is_installed(world, monkeypatch):
    """megatron's local spec takes apex's fused LayerNorm whenever apex imports (NGC images);
    our blocks name torch's LayerNorm / RMSNorm whatever is installed."""
    import megatron.core.models.backends as backends
    from mose_ds.config import from_dict
    from mose_ds.model import MoSEGPT

    class ApexNorm(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            raise AssertionError("apex's fused norm was built")

    monkeypatch.setattr(backends, "LNImpl", ApexNorm)
    for cfg, norm in ((tiny_config(), torch.nn.LayerNorm),
                      (from_dict({"model": {"hf_config": TINY_DEEPSEEK, "seq_len": 32}}), torch.nn.RMSNorm)):
        model = MoSEGPT(cfg.model, cfg.moe)
        norms = [m for name, m in model.named_modules() if name.endswith(("input_layernorm", "pre_mlp_layernorm"))]
        assert len(norms) == 2 * cfg.model.num_layers and all(type(m) is norm for m in norms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_loss_is_fp32_cross_entropy_without_an_fp32_copy_of_the_logits(monkeypatch, dtype):
    import torch.nn.functional as F
    from mose_ds import loss
    B, S, V = 3, 10, 50
    monkeypatch.setattr(loss, "CHUNK_BYTES", 4 * V * 7)           # chunks of 7 rows: 5 chunks
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(B, S, V, generator=gen)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, S), generator=gen)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours = lm_loss(logits, targets)
    (grad,) = torch.autograd.grad(2 * ours, logits)
    reference = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    (ref_grad,) = torch.autograd.grad(2 * reference, logits)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=2 ** -7 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-7)
    large = [t for t in saved if t.numel() >= B * S * V]
    assert [t.untyped_storage().data_ptr() for t in large] == [logits.untyped_storage().data_ptr()]


def test_parameters_are_created_on_the_device_the_model_is_built_on(world, monkeypatch):
    """engine.build_model builds under the process's device (here `meta`, standing for a GPU):
    no host copy of the model first, for GPT-2 and DeepSeek-V2 blocks alike."""
    from mose_ds.config import from_dict
    monkeypatch.setattr(world, "_DEVICE", torch.device("meta"))
    for cfg in (tiny_config(), from_dict({"model": {"hf_config": TINY_DEEPSEEK, "seq_len": 32}})):
        model = world.build_model(cfg)
        assert {p.device.type for p in model.parameters()} == {"meta"}
