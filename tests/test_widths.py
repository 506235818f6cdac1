"""Width policy maths on hand-computed cases, the calibration relaxation, and FLOPs accounting
against torch's FlopCounterMode (`flops.flop_counter`)."""

import math

import pytest
import torch

from conftest import tiny_config
from mose_ds.flops import FlopsMeter, flop_counter, forward_flops_per_token
from mose_ds.model import MoSEGPT, lm_loss
from mose_ds.moe_layer import SlimmableMoE
from mose_ds.widths import (NormProbPolicy, UniformPolicy, allocation, budget_widths, exact_budget_widths,
                            round_to_grid, sample_width)

GRID = [round(0.25 + 0.05 * i, 2) for i in range(16)]


def close(a, b):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.tensor(b), atol=1e-5, rtol=0)


def test_allocation_sharpens_with_gamma():
    p = torch.tensor([[0.8, 0.2]])
    close(allocation(p, 1.0), [[0.8, 0.2]])
    close(allocation(p, 2.0), [[0.64 / 0.68, 0.04 / 0.68]])
    close(allocation(p, 1e-6), [[0.5, 0.5]])                  # gamma -> 0: uniform split


def test_budget_widths_clip():
    q = torch.tensor([[0.8, 0.2], [0.5, 0.5]])
    close(budget_widths(q, 1.0, 0.25, 1.0), [[0.8, 0.25], [0.5, 0.5]])
    close(budget_widths(q, 1.5, 0.25, 1.0), [[1.0, 0.3], [0.75, 0.75]])


@pytest.mark.parametrize("q, budget, expected", [
    ([0.8, 0.2], 1.0, [0.75, 0.25]),            # raising the small one to wmin is paid by the other
    ([0.9, 0.1], 1.2, [0.95, 0.25]),
    ([0.8, 0.2], 1.5, [1.0, 0.5]),              # what wmax cut off goes to the other
    ([0.6, 0.3, 0.1], 1.5, [0.6 * 1.25 / 0.9, 0.3 * 1.25 / 0.9, 0.25]),
    ([0.5, 0.5], 1.0, [0.5, 0.5]),              # nothing clipped: plain Gamma * q
    ([0.7, 0.3], 0.4, [0.25, 0.25]),            # infeasible (< k * wmin): the bound
])
def test_exact_budget_hand_cases(q, budget, expected):
    w = exact_budget_widths(torch.tensor([q]), budget, 0.25, 1.0)
    close(w, [expected])
    if 2 * 0.25 <= budget:
        close(w.sum(-1), [budget])


def test_exact_budget_sums_to_budget_on_random_tokens():
    q = torch.softmax(torch.randn(500, 4) * 3, dim=-1)
    for budget in (1.0, 1.7, 2.5, 3.9):
        w = exact_budget_widths(q, budget, 0.25, 1.0)
        assert w.min() >= 0.25 - 1e-6 and w.max() <= 1.0 + 1e-6
        torch.testing.assert_close(w.sum(-1), torch.full((500,), budget), atol=1e-4, rtol=0)


def test_round_to_grid():
    close(round_to_grid(torch.tensor([0.33, 0.326, 0.31, 0.1, 0.999, 1.0]), GRID),
          [0.35, 0.35, 0.3, 0.25, 1.0, 1.0])


def test_NormProbPolicy_layerwise_gamma_and_grid():
    p = torch.tensor([[0.7, 0.3]])
    shared = NormProbPolicy(1.0)
    close(shared(p, 0), [[0.7, 0.3]])
    layered = NormProbPolicy(1.0, gamma=[1.0, 2.0])
    close(layered(p, 0), [[0.7, 0.3]])
    close(layered(p, 1), [[0.49 / 0.58, 0.25]])                  # 0.155 clipped up to wmin
    close(NormProbPolicy(1.0, gamma=[1.0, 2.0], grid=GRID)(p, 1), [[0.85, 0.25]])
    with pytest.raises(ValueError, match="gamma"):
        NormProbPolicy(1.0, gamma=-1.0)


def tiny_model(world, **moe):
    cfg = tiny_config(moe=moe, model={"num_layers": 4})          # MoE blocks 0 and 2
    model = MoSEGPT(cfg.model, cfg.moe)
    for layer in model.moe_layers():
        layer.set_deepspeed_parallelism()
    model.init_weights(0)
    return model.eval()


def test_relaxed_policy_matches_hard_widths_at_whole_units(world):
    """At widths where w * H is a whole number the relaxation is the sliced expert."""
    model = tiny_model(world)
    x = torch.randint(0, 4096, (2, 32))
    with torch.no_grad():
        hard, _ = model(x, UniformPolicy(0.5))
        soft, _ = model(x, UniformPolicy(0.5), relaxed=True)
    torch.testing.assert_close(soft, hard)


def test_gamma_gradient_is_finite_and_nonzero_where_widths_are_not_clipped(world):
    model = tiny_model(world)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randint(0, 4096, (2, 33))
    log_gamma = torch.zeros(2, requires_grad=True)                 # one per MoE layer
    policy = NormProbPolicy(1.0, gamma=log_gamma.exp())
    logits, routing = model(x[:, :-1], policy, relaxed=True)
    lm_loss(logits, x[:, 1:]).backward()
    assert torch.isfinite(log_gamma.grad).all() and (log_gamma.grad != 0).all()
    # all widths clipped (budget so large every expert is at wmax): no gradient at all
    log_gamma.grad = None
    logits, _ = model(x[:, :-1], NormProbPolicy(4.0, gamma=log_gamma.exp()), relaxed=True)
    lm_loss(logits, x[:, 1:]).backward()
    assert (log_gamma.grad == 0).all()


@pytest.mark.parametrize("policy", [UniformPolicy(1.0), UniformPolicy(0.4), NormProbPolicy(1.0),
                                    NormProbPolicy(1.3, gamma=[0.5, 3.0], exact_budget=True)],
                         ids=["full", "uniform0.4", "normprob", "gamma-exact"])
@pytest.mark.parametrize("kernel", ["loop", "grouped"])
def test_flops_of_executed_widths_equal_flop_counter(world, policy, kernel):
    """The standard convention counts exactly the matmuls torch runs (eager forward)."""
    model = tiny_model(world, capacity_factor=1.0, eval_capacity_factor=1.0,   # some drops
                       expert_kernel=kernel)
    x = torch.randint(0, 4096, (3, 32))
    counter = flop_counter()
    with counter, torch.no_grad():
        _, routing = model(x, policy)
    meter = FlopsMeter(model.cfg, model.moe_cfg)
    meter.add(routing, 32)
    counted = counter.get_total_flops()
    assert meter.per_token("standard", executed=True)["total"] * x.numel() == pytest.approx(counted, rel=0.01)
    moe_names = {f"MoSEGPT.{name}" for name, m in model.named_modules() if isinstance(m, SlimmableMoE)}
    moe_flops = sum(sum(c.values()) for k, c in counter.get_flop_counts().items() if k in moe_names)
    assert len(moe_names) == 2 and moe_flops > 0
    assert meter.per_token("standard", executed=True)["moe"] * x.numel() == pytest.approx(moe_flops, rel=0.01)


class FixedWidths:
    """A per-token policy with widths chosen by hand: slot 0 at 0.3 on even tokens and 0.8 on
    odd ones, slot 1 at 0.55 (layer 0) or 0.26 (layer 1)."""

    def __call__(self, p_TK, layer, relaxed=False):
        T = p_TK.shape[0]
        first_T = torch.where(torch.arange(T) % 2 == 0, 0.3, 0.8)
        return torch.stack([first_T, torch.full((T,), 0.55 if layer == 0 else 0.26)], dim=1)


def test_paper_flops_of_a_per_token_policy_hand_count(world):
    """Nominal MoE MACs per token = 2 d sum_slots ceil(w H) (GELU: two matrices), by hand:
    H = 128, ceil(0.3 H) = 39, ceil(0.8 H) = 103, ceil(0.55 H) = 71, ceil(0.26 H) = 34 (33.28)."""
    model = tiny_model(world, eval_capacity_factor=4.0)                 # nothing dropped
    x = torch.randint(0, 4096, (2, 32))
    with torch.no_grad():
        _, routing = model(x, FixedWidths())
    meter = FlopsMeter(model.cfg, model.moe_cfg)
    meter.add(routing, 32)
    d, per_token = 32, [(39 + 103) / 2 + 71, (39 + 103) / 2 + 34]
    assert meter.layer_units() == pytest.approx(per_token, abs=1e-9)
    assert meter.per_token("paper")["moe"] == pytest.approx(2 * d * sum(per_token), abs=1e-6)
    assert meter.per_token("paper")["attention"] == 4 * 4 * d * d and meter.per_token("paper")["other"] == 2 * 2 * d * 128
    # 4 distinct sizes per layer: the kernels run exactly these units
    assert meter.layer_units(executed=True) == pytest.approx(per_token, abs=1e-9)


class GridNoise:
    """Every slot at a random width of the 16-point grid (or, `grid=None`, a random width):
    each expert's rows then have up to 16 distinct sizes (or as many as rows)."""

    def __init__(self, grid):
        self.grid = grid

    def __call__(self, p_TK, layer, relaxed=False):
        w_TK = 0.25 + 0.75 * torch.rand(p_TK.shape, generator=torch.Generator().manual_seed(layer))
        return w_TK if self.grid is None else round_to_grid(w_TK, self.grid)


def test_grid_rounded_widths_execute_exactly_and_continuous_ones_round_up(world):
    """Up to MAX_RANGES (16, the grid's size) distinct widths per expert run at their own
    sizes, so grid-rounded widths execute exactly their nominal units; continuous widths
    (many sizes) are rounded up to range ends and cost more. Dropped slots cost nothing."""
    from mose_ds.config import MoSEConfig
    model = tiny_model(world, eval_capacity_factor=4.0)
    x = torch.randint(0, 4096, (8, 32))
    for grid, exact in ((MoSEConfig().grid, True), (None, False)):
        with torch.no_grad():
            _, routing = model(x, GridNoise(grid))
        meter = FlopsMeter(model.cfg, model.moe_cfg)
        meter.add(routing, 32)
        nominal, executed = sum(meter.layer_units()), sum(meter.layer_units(executed=True))
        assert (executed == nominal) if exact else (executed > nominal * 1.001)
    dropping = tiny_model(world, eval_capacity_factor=0.5)
    with torch.no_grad():
        _, routing = dropping(x, UniformPolicy(0.5))                     # 64 units a slot
    kept = [int(r.stats.kept) for r in routing]
    assert all(k < x.numel() * 2 for k in kept)
    assert [float(r.nominal_units) for r in routing] == [64.0 * k for k in kept]


def test_relaxation_interpolates_linearly_between_whole_units(world):
    """At w H = m + f the relaxed MoE layer is (1 - f) x the m-unit expert + f x the (m+1)-unit
    one: its output is linear in the weight of the one partial unit."""
    layer = tiny_model(world, eval_capacity_factor=4.0).moe_layers()[0]
    x_SBD = torch.randn(16, 2, 32)
    H, m, f = 128, 40, 0.3
    with torch.no_grad():
        lo, _ = layer(x_SBD, UniformPolicy(m / H))
        hi, _ = layer(x_SBD, UniformPolicy((m + 1) / H))
        soft, _ = layer(x_SBD, UniformPolicy((m + f) / H), relaxed=True)
    assert (hi - lo).abs().max() > 1e-4                                # the unit matters
    torch.testing.assert_close(soft, (1 - f) * lo + f * hi, rtol=1e-5, atol=1e-6)


def test_paper_convention_at_full_width_hand_count():
    """GPT-2 small E8A2 (d 384, 6 layers, 3 MoE): 6 * 4d^2 + 3 * 8d^2 + 3 * 2 experts * 8d^2."""
    from mose_ds.config import load_config
    cfg = load_config("ds_configs/gpt2_small_e8a2.yaml")
    d = 384
    paper = forward_flops_per_token(cfg.model, cfg.moe, convention="paper")
    assert paper["total"] == 6 * 4 * d * d + 3 * 8 * d * d + 3 * 2 * 8 * d * d
    assert paper["moe"] == 3 * 2 * 8 * d * d
    half = forward_flops_per_token(cfg.model, cfg.moe, 0.5, convention="paper")
    assert half["moe"] == paper["moe"] / 2 and half["attention"] == paper["attention"]
    standard = forward_flops_per_token(cfg.model, cfg.moe)
    assert standard["total"] > 2 * paper["total"]          # + scores, router, LM head
    assert math.isclose(standard["other"] / 2 - paper["other"], d * cfg.model.vocab_size)


def test_sample_width_is_uniform_over_the_grid():
    """16,000 training steps against the 16-point grid: chi-square at p = 0.001 (15 degrees
    of freedom: 37.70), and every point drawn."""
    from scipy.stats import chi2
    grid = tiny_config().mose.grid
    assert grid == GRID
    draws = [sample_width(grid, step, seed=5) for step in range(16_000)]
    counts = [draws.count(w) for w in grid]
    assert sum(counts) == len(draws)                              # nothing off the grid
    expected = len(draws) / len(grid)
    statistic = sum((c - expected) ** 2 / expected for c in counts)
    assert statistic < chi2.ppf(0.999, len(grid) - 1), counts
