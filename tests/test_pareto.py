"""Pareto frontiers and matched-perplexity FLOPs reductions on hand-made points."""

import pytest

from mose_ds.pareto import below, flops_at, flops_reduction, frontier, ppl_at

UNIFORM = [(1.0, 30.0), (2.0, 20.0), (3.0, 22.0), (4.0, 15.0)]   # (3, 22) is dominated


def test_frontier_keeps_only_non_dominated_points():
    assert frontier(UNIFORM) == [(1.0, 30.0), (2.0, 20.0), (4.0, 15.0)]
    assert frontier([(2.0, 10.0), (1.0, 10.0)]) == [(1.0, 10.0)]


def test_ppl_at_interpolates_is_flat_beyond_and_undefined_below():
    front = frontier(UNIFORM)
    assert ppl_at(front, 1.5) == pytest.approx(25.0)
    assert ppl_at(front, 3.0) == pytest.approx(17.5)
    assert ppl_at(front, 1.0) == 30.0
    assert ppl_at(front, 9.0) == 15.0          # more compute can always run the best point
    assert ppl_at(front, 0.5) is None


def test_flops_at_inverts_the_frontier_within_its_range():
    front = frontier(UNIFORM)
    assert flops_at(front, 25.0) == pytest.approx(1.5)
    assert flops_at(front, 17.5) == pytest.approx(3.0)
    assert flops_at(front, 10.0) is None and flops_at(front, 40.0) is None


def test_below_and_flops_reduction_against_a_reference():
    mode = [(1.5, 24.0), (3.0, 18.0), (5.0, 16.0), (0.5, 50.0)]
    assert below(mode, UNIFORM) == [True, False, False, None]
    # mode frontier (0.5, 50) (1.5, 24) (3, 18) (5, 16): reaches the reference's 30 and 20
    reduction = dict(flops_reduction(mode, UNIFORM))
    assert set(reduction) == {30.0, 20.0}
    assert reduction[30.0] == pytest.approx(1 - (0.5 + (1.5 - 0.5) * (50 - 30) / (50 - 24)) / 1.0)
    assert reduction[20.0] == pytest.approx(1 - (1.5 + 1.5 * (24 - 20) / (24 - 18)) / 2.0)   # -25%
