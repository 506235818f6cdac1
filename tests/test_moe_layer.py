import pytest
import torch

from conftest import sliced_ffn, tiny_config
from mose_ds.gating import top_k_routing
from mose_ds.model import transformer_config
from mose_ds.moe_layer import SlimmableMoE
from mose_ds.widths import hidden_units, normprob_policy, uniform_policy


def build_moe(world, activation="gelu", **moe):
    cfg = tiny_config(moe={"capacity_factor": 8.0, "eval_capacity_factor": 8.0, **moe},
                      model={"activation": activation})
    layer = SlimmableMoE(transformer_config(cfg.model), cfg.moe, cfg.model.ffn_hidden_size,
                         activation, layer_index=0)
    layer.set_deepspeed_parallelism()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return layer


def reference_moe(layer, x_TD, policy):
    """y_t = sum over the token's top-k experts of p_i * E_i^{w_i}(x_t), one token at a time."""
    idx, p = top_k_routing(layer.router(x_TD), layer.k)
    m = hidden_units(policy(p, 0), layer.ffn_hidden_size)
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for j in range(layer.k):
            expert = layer.local_experts[int(idx[t, j])]
            out[t] += p[t, j] * sliced_ffn(expert, x_TD[t:t + 1], int(m[t, j]))[0]
    return out


def router_prob_policy(p_TK, layer):
    """Per-slot widths that differ token by token (here: the router weight itself)."""
    return p_TK.clamp(0.05, 1.0)


@pytest.mark.parametrize("kernel", ["loop", "grouped"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("policy", [uniform_policy(1.0), uniform_policy(0.5), router_prob_policy,
                                    normprob_policy(1.0), normprob_policy(0.9, gamma=2.0, exact_budget=True)],
                         ids=["full", "uniform0.5", "per-token", "normprob", "gamma-exact-budget"])
def test_moe_equals_per_token_reference_loop_without_drops(world, activation, policy, kernel):
    layer = build_moe(world, activation, expert_kernel=kernel)
    x_SBD = torch.randn(6, 3, 32)
    out, info = layer(x_SBD, policy)
    assert info.stats.dropped_frac == 0
    torch.testing.assert_close(out.view(-1, 32), reference_moe(layer, x_SBD.view(-1, 32), policy))


@pytest.mark.parametrize("kernel", ["loop", "grouped"])
def test_gradients_match_reference_loop(world, kernel):
    layer = build_moe(world, expert_kernel=kernel)
    x = torch.randn(5, 2, 32)
    out, _ = layer(x, router_prob_policy)
    out.square().sum().backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    reference_moe(layer, x.view(-1, 32), router_prob_policy).square().sum().backward()
    for name, p in layer.named_parameters():   # equal up to fp32 summation order (ranges of units)
        torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-6 * float(p.grad.abs().max()), msg=name)


def test_overflowing_choices_are_dropped_and_keep_only_the_residual(world):
    layer = build_moe(world, capacity_factor=0.01, eval_capacity_factor=0.01, min_capacity=1)
    layer.eval()
    x = torch.randn(8, 2, 32)
    out, info = layer(x, uniform_policy(1.0))
    # capacity 1 per expert: at most 4 of the 32 routed choices survive
    assert info.stats.dropped_frac >= 1 - 4 / 32
    assert (out.view(-1, 32).abs().sum(-1) > 0).sum() <= 4


def test_deepspeed_gate_is_replaced_by_our_router(world):
    from deepspeed.moe.sharded_moe import TopKGate
    layer = build_moe(world)
    assert not any(isinstance(m, TopKGate) for m in layer.modules())   # its k=2 gate samples in eval
    assert layer.router.weight.shape == (4, 32)


@pytest.mark.parametrize("kernel", ["loop", "grouped"])
def test_an_idle_expert_still_gets_a_zero_gradient(world, kernel):
    """Every rank must reduce the same gradients and enter the same all-to-alls, whatever
    the routing did: an expert that receives no token stays in the autograd graph."""
    layer = build_moe(world, expert_kernel=kernel)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([1.0, 0.9, 0.8, -1.0]).unsqueeze(1).expand(4, 32))
    x = torch.rand(4, 2, 32) + 0.1            # positive inputs: experts 0 and 1 always win, 3 never
    out, info = layer(x, uniform_policy(1.0))
    assert info.stats.counts_E[3] == 0
    out.sum().backward()
    idle = layer.local_experts[3]
    assert idle.w_up.grad is not None and idle.w_up.grad.abs().sum() == 0
    assert layer.local_experts[0].w_up.grad.abs().sum() > 0


def test_narrower_width_changes_output(world):
    layer = build_moe(world)
    x = torch.randn(4, 2, 32)
    assert not torch.allclose(layer(x, uniform_policy(1.0))[0], layer(x, uniform_policy(0.25))[0])


def test_layer_is_a_deepspeed_moe_with_tagged_expert_params(world):
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import is_moe_param
    layer = build_moe(world)
    assert isinstance(layer, MoE)
    experts = {n for n, p in layer.named_parameters() if is_moe_param(p)}
    assert experts and all("deepspeed_experts" in n for n in experts)
    assert not is_moe_param(layer.router.weight)
