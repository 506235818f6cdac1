import math

import torch

from mose_ds.gating import (RouterSpec, assign_slots, balance_loss, expert_capacity, expert_counts,
                            router_z_loss, routing_stats, top_k_routing)


def test_top_k_softmax_is_over_selected_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    idx, p = top_k_routing(logits, 2)
    assert idx.tolist() == [[1, 2]]
    e = math.exp(1.0)
    torch.testing.assert_close(p, torch.tensor([[e / (e + 1), 1 / (e + 1)]]))


def test_capacity_formula():
    assert expert_capacity(100, 8, 2, 1.25, 4) == math.ceil(2 * 1.25 * 100 / 8)   # 32
    assert expert_capacity(4, 8, 2, 1.25, 4) == 4                                 # min_capacity (<= T)
    assert expert_capacity(3, 8, 2, 1.25, 4) == 3                                 # never above T


def test_top1_choices_fill_capacity_before_top2():
    # Expert 0 is token 2's first choice but tokens 0 and 1's second choice; with capacity 1
    # the slot must go to token 2 even though tokens 0 and 1 come first.
    idx = torch.tensor([[1, 0], [2, 0], [0, 1]])
    pos, keep = assign_slots(idx, expert_counts(idx, 3), capacity=1)
    assert keep.tolist() == [[True, False], [True, False], [True, False]]
    assert pos[2, 0] == 0 and pos[0, 1] == 1 and pos[1, 1] == 2


def test_positions_are_in_token_order_within_a_choice_rank():
    idx = torch.tensor([[0, 1], [0, 1], [0, 1]])
    pos, keep = assign_slots(idx, expert_counts(idx, 2), capacity=2)
    assert pos[:, 0].tolist() == [0, 1, 2] and keep[:, 0].tolist() == [True, True, False]


def _balance(logits, k, balance="topk"):
    spec = RouterSpec(balance=balance)
    idx, p = top_k_routing(logits, k, spec)
    return balance_loss(spec, logits, idx, p, expert_counts(idx, logits.shape[1]), batch=1)


def test_balance_loss_is_nanomoe_on_hand_cases():
    # Perfect balance: nanoMoE's loss is k (f sums to k), DeepSeek's batch-level one is 1.
    balanced = torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 1.0], [1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 2.0]])
    assert math.isclose(_balance(balanced, 2).item(), 2.0, rel_tol=1e-6)
    assert math.isclose(_balance(balanced, 2, "batch").item(), 1.0, rel_tol=1e-6)
    # Unbalanced, by hand: token 0 picks experts (0, 1) with p (0.75, 0.25), token 1 (0, 2)
    # with p (0.6, 0.4). f = counts / T = (1, 0.5, 0.5, 0); P = mean top-k-masked softmax
    # = (0.675, 0.125, 0.2, 0); loss = 4 (0.675 + 0.0625 + 0.1) = 3.35.
    l0, l1 = math.log(0.75), math.log(0.25)
    m0, m2 = math.log(0.6), math.log(0.4)
    logits = torch.tensor([[l0, l1, -9.0, -9.0], [m0, -9.0, m2, -9.0]], requires_grad=True)
    loss = _balance(logits, 2)
    assert math.isclose(loss.item(), 3.35, rel_tol=1e-6)
    # Gradient: dL/dp_tk = E f_e / T = 2 f_e; through the softmax over the k selected logits,
    # dL/dl_i = p_i (g_i - sum_j p_j g_j); the unselected logits get none (nanoMoE masks them).
    loss.backward()
    g0 = (2 * 1.0, 2 * 0.5)                       # token 0: experts 0, 1
    mean0 = 0.75 * g0[0] + 0.25 * g0[1]
    g1 = (2 * 1.0, 2 * 0.5)                       # token 1: experts 0, 2
    mean1 = 0.6 * g1[0] + 0.4 * g1[1]
    expected = torch.tensor([[0.75 * (g0[0] - mean0), 0.25 * (g0[1] - mean0), 0.0, 0.0],
                             [0.6 * (g1[0] - mean1), 0.0, 0.4 * (g1[1] - mean1), 0.0]])
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-6)
    # Collapse onto two experts costs more than balance: T f P with all on (0, 1) is E = 4 x 1.
    collapsed = torch.tensor([[2.0, 1.0, 0.0, 0.0]] * 4)
    assert _balance(collapsed, 2).item() > _balance(balanced, 2).item() * 1.9


def test_z_loss_is_mean_squared_logsumexp():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (math.log(2) ** 2 + math.log(math.e + math.e ** 2) ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(expected))


def test_routing_stats_balanced_and_collapsed():
    keep = torch.ones(4, 1, dtype=torch.bool)
    balanced = routing_stats(torch.tensor([1, 1, 1, 1]), keep, torch.tensor(1.0), torch.tensor(0.0))
    collapsed = routing_stats(torch.tensor([4, 0, 0, 0]), keep, torch.tensor(1.0), torch.tensor(0.0))
    torch.testing.assert_close(balanced.entropy, torch.tensor(1.0))
    assert balanced.load_cv == 0 and collapsed.entropy < 1e-6 and collapsed.load_cv > 1.5
    half = routing_stats(torch.tensor([1, 1]), torch.tensor([[True], [False]]), torch.tensor(1.0), torch.tensor(0.0))
    assert half.dropped_frac == 0.5


def test_expert_counts_is_the_histogram_of_routed_choices():
    idx = torch.tensor([[0, 3], [3, 1], [3, 0]])
    assert expert_counts(idx, 5).tolist() == [2, 1, 0, 3, 0]
