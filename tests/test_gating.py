import math

import torch

from mose_ds.gating import (assign_slots, expert_capacity, expert_counts, load_balance_loss, router_z_loss,
                            routing_stats, top_k_routing)


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


def test_load_balance_loss_is_one_when_balanced():
    probs = torch.full((4, 4), 0.25)
    idx = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    torch.testing.assert_close(load_balance_loss(probs, expert_counts(idx, 4)), torch.tensor(1.0))


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
