import math

import pytest
import torch
import torch.nn.functional as F

from mose_ds.experts import SlimmableFFN
from mose_ds.widths import hidden_units


def make(activation, D=16, H=64):
    torch.manual_seed(0)
    ffn = SlimmableFFN(D, H, activation)
    for p in ffn.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return ffn


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("width", [0.25, 0.3, 0.55, 1.0])
def test_sliced_expert_equals_dense_ffn_of_sliced_weights(activation, width):
    ffn = make(activation)
    m = math.ceil(width * 64)
    x = torch.randn(10, 16)
    up = ffn.w_up[:m].detach().clone()
    down = ffn.w_down[:m].detach().clone()
    if activation == "swiglu":
        gate = ffn.w_gate[:m].detach().clone()
        ref = (F.silu(x @ gate.t()) * (x @ up.t())) @ down
    else:
        ref = F.gelu(x @ up.t()) @ down
    torch.testing.assert_close(ffn(x, m), ref)


def test_hidden_units_is_ceil_of_width_times_hidden():
    w = torch.tensor([0.25, 0.3, 0.35, 0.05, 1.0])
    assert hidden_units(w, 1536).tolist() == [384, 461, 538, 77, 1536]
    assert hidden_units(torch.tensor([0.001]), 64).tolist() == [1]


def test_forward_slots_runs_each_row_at_its_own_width_and_skips_empty_slots():
    ffn = make("gelu")
    x = torch.randn(6, 16)
    m = torch.tensor([16, 64, 0, 16, 33, 0])
    out = ffn.forward_slots(x, m)
    for i in range(6):
        ref = torch.zeros(16) if m[i] == 0 else ffn(x[i:i + 1], int(m[i]))[0]
        torch.testing.assert_close(out[i], ref)


def test_slicing_does_less_work_than_full_width():
    from torch.utils.flop_counter import FlopCounterMode
    ffn, x = make("gelu"), torch.randn(8, 16)
    counts = []
    for m in (16, 64):
        with FlopCounterMode(display=False) as counter:
            ffn(x, m)
        counts.append(counter.get_total_flops())
    assert counts[0] * 4 == counts[1]
