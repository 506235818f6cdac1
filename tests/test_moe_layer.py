import pytest
import torch

from conftest import sliced_ffn, tiny_config
from mose_ds import moe_layer
from mose_ds.gating import RouterSpec, top_k_routing
from mose_ds.model import transformer_config
from mose_ds.moe_layer import SlimmableMoE
from mose_ds.widths import NormProbPolicy, UniformPolicy, hidden_units


def build_moe(world, activation="gelu", router=RouterSpec(), shared=0, **moe):
    cfg = tiny_config(moe={"capacity_factor": 8.0, "eval_capacity_factor": 8.0, **moe},
                      model={"activation": activation})
    layer = SlimmableMoE(transformer_config(cfg.model), cfg.moe, cfg.model.ffn_hidden_size,
                         activation, layer_index=0, router=router, shared_hidden_size=shared)
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


def router_prob_policy(p_TK, layer, relaxed=False):
    """Per-slot widths that differ token by token (here: the router weight itself)."""
    return p_TK.clamp(0.05, 1.0)


@pytest.mark.parametrize("kernel", ["loop", "grouped"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("policy", [UniformPolicy(1.0), UniformPolicy(0.5), router_prob_policy,
                                    NormProbPolicy(1.0), NormProbPolicy(0.9, gamma=2.0, exact_budget=True)],
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
    out, info = layer(x, UniformPolicy(1.0))
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
    out, info = layer(x, UniformPolicy(1.0))
    assert info.stats.counts_E[3] == 0
    out.sum().backward()
    idle = layer.local_experts[3]
    assert idle.w_up.grad is not None and idle.w_up.grad.abs().sum() == 0
    assert layer.local_experts[0].w_up.grad.abs().sum() > 0


def test_narrower_width_changes_output(world):
    layer = build_moe(world)
    x = torch.randn(4, 2, 32)
    assert not torch.allclose(layer(x, UniformPolicy(1.0))[0], layer(x, UniformPolicy(0.25))[0])


def test_layer_is_a_deepspeed_moe_with_tagged_expert_params(world):
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import is_moe_param
    layer = build_moe(world)
    assert isinstance(layer, MoE)
    experts = {n for n, p in layer.named_parameters() if is_moe_param(p)}
    assert experts and all("deepspeed_experts" in n for n in experts)
    assert not is_moe_param(layer.router.weight)


def forward_backward(layer, x, policy):
    """Output and every gradient (input, then each parameter) of one forward + backward."""
    x = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    out, info = layer(x, policy)
    torch.autograd.backward([out, info.aux_loss], [torch.ones_like(out), None])
    return [out.detach(), x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("kernel", ["loop", "grouped"])
def test_same_inputs_give_bitwise_equal_outputs_and_gradients(world, kernel):
    """Run to run on one device (the sequence balance loss and slimmable shared experts too)."""
    layer = build_moe(world, "swiglu", RouterSpec(scores="softmax", balance="sequence"), shared=64,
                      expert_kernel=kernel, shared_slimmable=True)
    x = torch.randn(6, 3, 32)
    first, second = (forward_backward(layer, x, NormProbPolicy(1.0)) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_combine_sums_each_tokens_outputs_in_a_fixed_order():
    """The combine gathers each token's K outputs and adds them choice by choice in fp32, so
    the result does not depend on the order the rows arrive in (an index_add over rows would:
    float addition is not associative); nor does the dispatch's input gradient."""
    from mose_ds.dispatch import LocalDispatcher
    gen = torch.Generator().manual_seed(0)
    T, K, D, E = 64, 4, 16, 8
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    p = torch.softmax(torch.randn(T, K, generator=gen), -1)
    m = torch.ones(T, K, dtype=torch.long)
    plan = LocalDispatcher(E, 1).plan(idx, m, torch.ones(T, K, dtype=torch.bool))
    y = torch.randn(T * K, D, generator=gen) * torch.logspace(-4, 4, T * K).unsqueeze(1)   # wide range: rounding shows
    shuffled = torch.randperm(T * K, generator=gen)
    reordered = LocalDispatcher(E, 1).plan(idx, m, torch.ones(T, K, dtype=torch.bool))
    reordered.slot_N, reordered.token_N = plan.slot_N[shuffled], plan.token_N[shuffled]
    reordered.row_TK = torch.empty_like(plan.row_TK).view(-1).index_copy_(
        0, reordered.slot_N, torch.arange(T * K)).view(T, K)
    dispatcher = LocalDispatcher(E, 1)
    assert torch.equal(dispatcher.combine(y, p, plan), dispatcher.combine(y[shuffled], p, reordered))
    x = torch.randn(T, D, generator=gen, requires_grad=True)
    g = torch.randn(T * K, D, generator=gen) * torch.logspace(-4, 4, T * K).unsqueeze(1)
    dx = torch.autograd.grad(dispatcher.dispatch(x, plan).x(), x, g)[0]
    dx_reordered = torch.autograd.grad(dispatcher.dispatch(x, reordered).x(), x, g[shuffled])[0]
    assert torch.equal(dx, dx_reordered)


@pytest.mark.parametrize("kernel", ["loop", "grouped"])
@pytest.mark.parametrize("experts", [4, 64])
def test_one_host_sync_per_layer_forward_and_backward(world, kernel, experts):
    """Counted as on a GPU (mose_ds.counters): the dispatch plan's one copy to the host, at
    any number of experts, per-token widths (gamma and grid moved to the device without a
    wait) and the shared experts included."""
    from mose_ds.counters import HostSyncCounter
    layer = build_moe(world, shared=64, expert_kernel=kernel, num_experts=experts, shared_slimmable=True)
    x = torch.randn(8, 4, 32)
    policy = NormProbPolicy(1.0, gamma=1.5, grid=(0.25, 0.5, 0.75, 1.0))   # host gamma and grid
    forward_backward(layer, x, policy)
    counter = HostSyncCounter()
    counter.device(x, *layer.parameters())
    with counter:
        forward_backward(layer, x, policy)
    assert counter.syncs == 1, dict(counter.where)


@pytest.mark.parametrize("factors", [None, (1.0, 1.5)], ids=["paper-defaults", "set"])
def test_training_uses_capacity_factor_and_eval_the_eval_capacity_factor(world, factors):
    """Every token picks experts 0 and 1 (16 choices each): a mode keeps min(16, capacity)
    of each, capacity = ceil(k * factor * T / E) with moe.capacity_factor in training and
    moe.eval_capacity_factor in eval (paper, k = 2: 1.25 and 2.0)."""
    import math
    moe = {} if factors is None else {"capacity_factor": factors[0], "eval_capacity_factor": factors[1]}
    cfg = tiny_config(moe=moe)
    train_cf, eval_cf = factors or (1.25, 2.0)
    assert (cfg.moe.capacity_factor, cfg.moe.eval_capacity_factor, cfg.moe.min_capacity) == (train_cf, eval_cf, 4)
    layer = SlimmableMoE(transformer_config(cfg.model), cfg.moe, cfg.model.ffn_hidden_size, "gelu", layer_index=0)
    layer.set_deepspeed_parallelism()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.2)
        layer.router.weight.copy_(torch.tensor([1.0, 0.9, 0.8, -1.0]).unsqueeze(1).expand(4, 32))
    x = torch.rand(8, 2, 32, generator=torch.Generator().manual_seed(1)) + 0.1   # T = 16, all positive
    T, E, K = 16, 4, 2
    kept = {}
    for mode, factor in (("train", train_cf), ("eval", eval_cf)):
        getattr(layer, mode)()
        _, info = layer(x, UniformPolicy(1.0))
        assert info.stats.counts_E.tolist() == [16, 16, 0, 0]
        capacity = min(T, math.ceil(K * factor * T / E))
        kept[mode] = int(info.stats.kept)
        assert kept[mode] == 2 * min(16, capacity), mode
    # the paper's factors: capacity 10 drops tokens in training, 16 none in eval
    assert kept == ({"train": 20, "eval": 32} if factors is None else {"train": 16, "eval": 24})


def count_ops(fn):
    """Top-level aten operations of one call (the kernel-launch proxy)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, sum(1 for e in prof.events() if e.name.startswith("aten::")
                       and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


@pytest.mark.parametrize("shared_slimmable", [False, True])
@pytest.mark.parametrize("policy", [UniformPolicy(1.0), UniformPolicy(0.5, top_k=1), router_prob_policy,
                                    NormProbPolicy(1.0), NormProbPolicy(0.9, gamma=2.0, exact_budget=True)],
                         ids=["full", "uniform0.5-top1", "per-token", "normprob", "gamma-exact-budget"])
def test_a_decoding_step_equals_the_general_path(world, policy, shared_slimmable, monkeypatch):
    """A forward of a few tokens without gradients (a decoding step) groups its slots on the
    host: the same outputs, units, paper units, expert counts and losses as the general path
    (taken here with gradients on), and one host sync; at full width, one token takes under
    two thirds of the general path's operations."""
    from mose_ds.counters import HostSyncCounter
    layer = build_moe(world, shared=64, drop_tokens=False, shared_slimmable=shared_slimmable, width_quantum=4)
    x = torch.randn(3, 2, 32)                                 # 3 tokens x 2 rows
    with torch.enable_grad():
        general, info = layer(x, policy)
    with torch.no_grad():
        with monkeypatch.context() as patch:
            patch.setattr(moe_layer, "FEW_SLOTS", 0)           # every forward takes the general path
            _, general_ops = count_ops(lambda: layer(x[:1, :1], UniformPolicy(1.0)))
        few, few_info = layer(x, policy)
        _, few_ops = count_ops(lambda: layer(x[:1, :1], UniformPolicy(1.0)))   # one token: a decoding step
        counter = HostSyncCounter()
        counter.device(x, *layer.parameters())
        with counter:
            layer(x, policy)
    assert few_info.aux_loss is None                          # nothing needs its gradient
    torch.testing.assert_close(few, general.detach(), rtol=1e-5, atol=1e-6)
    assert (few_info.units, int(few_info.nominal_units)) == (info.units, int(info.nominal_units))
    assert torch.equal(few_info.stats.counts_E, info.stats.counts_E)
    torch.testing.assert_close(few_info.stats.load_balance, info.stats.load_balance)
    torch.testing.assert_close(few_info.stats.z_loss, info.stats.z_loss)
    assert few_ops * 3 < general_ops * 2, (few_ops, general_ops)     # 86 against 145 with shared experts
    assert counter.syncs == 1, dict(counter.where)
