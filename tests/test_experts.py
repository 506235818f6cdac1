import math

import pytest
import torch
import torch.nn.functional as F

from conftest import sliced_ffn, tiny_config
from mose_ds.dispatch import LocalDispatcher
from mose_ds.experts import LoopKernel, SlimmableFFN
from mose_ds.grouped import GroupedKernel
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
    x = torch.randn(10, 16, requires_grad=True)
    up = ffn.w_up[:m].detach().clone()
    down = ffn.w_down[:m].detach().clone()
    if activation == "swiglu":
        gate = ffn.w_gate[:m].detach().clone()
        ref = (F.silu(x @ gate.t()) * (x @ up.t())) @ down
    else:
        ref = F.gelu(x @ up.t()) @ down
    out = ffn(x, m)
    torch.testing.assert_close(out, ref)
    # the hand-written backward against autograd on the same slices, every gradient
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *ffn.parameters()], g)
    want = torch.autograd.grad(sliced_ffn(ffn, x, m), [x, *ffn.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def run_kernel(kernel, experts, x_ND, m_N, e_N=None):
    """`kernel` on rows in any order (expert e_N, size m_N; 0: no row, output zero): the
    rows go through the local dispatcher as the MoE layer's do. Outputs in input order and
    the units computed."""
    e_N = torch.zeros_like(m_N) if e_N is None else e_N
    dispatcher = LocalDispatcher(len(experts), experts[0].ffn_hidden_size)
    plan = dispatcher.plan(e_N[:, None], m_N[:, None], (m_N > 0)[:, None])
    y_ND, units, order_N = kernel(experts, dispatcher.dispatch(x_ND, plan))
    slot_N = plan.slot_N if order_N is None else plan.slot_N[order_N]
    return torch.zeros_like(x_ND).index_copy(0, slot_N, y_ND), units


def test_hidden_units_is_ceil_of_width_times_hidden():
    w = torch.tensor([0.25, 0.3, 0.35, 0.05, 1.0])
    assert hidden_units(w, 1536).tolist() == [384, 461, 538, 77, 1536]
    assert hidden_units(torch.tensor([0.001]), 64).tolist() == [1]


def test_loop_kernel_runs_each_row_at_its_own_width():
    ffn = make("gelu")
    x = torch.randn(6, 16)
    m = torch.tensor([16, 64, 0, 16, 33, 0])
    out, units = run_kernel(LoopKernel(), [ffn], x, m)
    for i in range(6):
        ref = torch.zeros(16) if m[i] == 0 else sliced_ffn(ffn, x[i:i + 1], int(m[i]))[0]
        torch.testing.assert_close(out[i], ref)
    assert units == 16 + 64 + 16 + 33              # three sizes: one range each, nothing rounded


def test_slicing_does_less_work_than_full_width():
    from mose_ds.flops import flop_counter
    ffn, x = make("gelu"), torch.randn(8, 16)
    counts = []
    for m in (16, 64):
        with flop_counter() as counter:
            ffn(x, m)
        counts.append(counter.get_total_flops())
    assert counts[0] * 4 == counts[1]


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_loop_kernel_with_many_widths_equals_a_per_row_loop_forward_and_backward(activation):
    """More distinct widths than MAX_RANGES: planned ranges with the units past a row's own
    size zeroed; output and every gradient as a per-row loop computes them."""
    from mose_ds.experts import MAX_RANGES
    ffn = make(activation, D=16, H=96)
    gen = torch.Generator().manual_seed(1)
    m = torch.randint(0, 97, (60,), generator=gen)
    assert len(torch.unique(m[m > 0])) > MAX_RANGES
    x = torch.randn(60, 16, generator=gen, requires_grad=True)
    g = torch.randn(60, 16, generator=gen)
    out, _ = run_kernel(LoopKernel(), [ffn], x, m)
    grads = torch.autograd.grad(out, [x, *ffn.parameters()], g)
    ref = torch.stack([torch.zeros(16) if m[i] == 0 else sliced_ffn(ffn, x[i:i + 1], int(m[i]))[0]
                       for i in range(60)])
    ref_grads = torch.autograd.grad(ref, [x, *ffn.parameters()], g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_loop_kernel_work_follows_the_executed_widths():
    """FLOPs of the ranged execution: at least those of each row at its own size, at most
    those of each row rounded up to a multiple of H / MAX_RANGES (the planned ends do no
    worse than an even split), and exactly the units it reports to the FLOPs accounting."""
    from mose_ds.flops import flop_counter
    from mose_ds.experts import MAX_RANGES
    D, H = 16, 128
    ffn, gen = make("gelu", D=D, H=H), torch.Generator().manual_seed(2)
    m = torch.randint(1, H + 1, (200,), generator=gen)
    with flop_counter() as counter:
        _, units = run_kernel(LoopKernel(), [ffn], torch.randn(200, D, generator=gen), m)
    step = H // MAX_RANGES
    exact = 2 * 2 * D * int(m.sum())
    rounded = 2 * 2 * D * int(((m + step - 1) // step * step).sum())
    assert exact <= counter.get_total_flops() <= rounded
    assert counter.get_total_flops() == 2 * 2 * D * units
    assert counter.get_total_flops() < 0.6 * 2 * 2 * D * H * 200     # widths average ~0.5


def test_planned_ranges_are_the_cheapest_aligned_ends():
    """plan_ranges against every choice of at most MAX_RANGES candidate ends (brute force):
    the same least work, the last end at the largest size, and row counts per range."""
    import itertools
    from mose_ds.experts import plan_ranges
    gen = torch.Generator().manual_seed(5)
    for trial in range(20):
        H, max_ranges, align = 256, 3, 16
        m = torch.randint(1, H + 1, (int(torch.randint(4, 40, (1,), generator=gen)),), generator=gen)
        sizes, counts = (v.tolist() for v in torch.unique(m, return_counts=True))
        ranges = plan_ranges(sizes, counts, H, max_ranges, align)
        work = sum(n * (hi - lo) for lo, hi, n, _ in ranges)
        cand = sorted({min(-(-s // align) * align, sizes[-1]) for s in sizes})
        def cost(ends):
            return sum(min(e for e in ends if e >= s) for s in m.tolist())
        best = min(cost(c + (cand[-1],)) for r in range(max_ranges)
                   for c in itertools.combinations(cand[:-1], r))
        assert work == (best if len(sizes) > max_ranges else int(m.sum()))
        assert len(ranges) <= max_ranges and ranges[-1][1] == sizes[-1] and ranges[0][0] == 0
        for lo, hi, n, full in ranges:
            assert n == int((m > lo).sum()) and full == int((m >= hi).sum())
            assert hi == sizes[-1] or hi % align == 0 or hi in sizes


def test_width_quantum_rounds_hidden_units_up():
    w = torch.tensor([0.01, 0.25, 0.3, 0.99, 1.0])
    assert hidden_units(w, 1000, quantum=64).tolist() == [64, 256, 320, 1000, 1000]
    assert hidden_units(w, 1000, quantum=1).tolist() == hidden_units(w, 1000).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ranged_backward_with_frozen_weights_and_in_bf16(dtype):
    """Frozen expert weights get no gradient (and none is computed) while the input still
    does; in bf16 the ranged kernels agree with autograd on the slices to bf16 precision."""
    ffn = make("swiglu", D=16, H=96).to(dtype)
    gen = torch.Generator().manual_seed(3)
    m = torch.randint(0, 97, (40,), generator=gen)
    x = torch.randn(40, 16, generator=gen).to(dtype).requires_grad_()
    g = torch.randn(40, 16, generator=gen).to(dtype)
    ref = torch.stack([torch.zeros(16, dtype=dtype) if m[i] == 0 else sliced_ffn(ffn, x[i:i + 1], int(m[i]))[0]
                       for i in range(40)])
    want = torch.autograd.grad(ref, x, g)[0]
    ffn.requires_grad_(False)
    out, _ = run_kernel(LoopKernel(), [ffn], x, m)
    out.backward(g)
    assert all(p.grad is None for p in ffn.parameters())
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(x.grad, want, **tol)


def test_grouped_layout_on_a_hand_made_case():
    """Sizes rounded up to 8 units, buckets widest first, experts in order inside a bucket;
    offsets count each bucket's rows per expert. Rows arrive grouped by expert, widest first:
    expert 0's 64, 10, then expert 1's 64, 33, 8."""
    from mose_ds.grouped import plan_layout
    m = torch.tensor([64, 10, 0, 64, 33, 8])
    e = torch.tensor([1, 0, 0, 0, 1, 1])
    dispatcher = LocalDispatcher(2, 64)
    plan = dispatcher.plan(e[:, None], m[:, None], (m > 0)[:, None])
    assert plan.slot_N.tolist() == [3, 1, 0, 4, 5]
    layout = plan_layout(dispatcher.dispatch(torch.zeros(6, 8), plan), hidden=64)
    assert layout.ends == [64, 40, 16, 8] and layout.rows == [2, 1, 1, 1]
    assert plan.slot_N[layout.order_N].tolist() == [3, 0, 4, 1, 5]
    assert layout.offs_BL.tolist() == [[1, 2], [0, 1], [1, 1], [0, 1]]
    assert layout.units == 2 * 64 + 40 + 16 + 8
    assert layout.partial == [False, True, True, False]       # which buckets zero units


def grouped_and_per_expert(experts, x, e, m, g):
    """Outputs and gradients (input, then every weight) of both kernels on the same rows."""
    params = [p for ffn in experts for p in ffn.parameters() if p.requires_grad]
    out, units = run_kernel(GroupedKernel(), experts, x, m, e)
    grads = torch.autograd.grad(out, [x, *params], g)
    ref, ref_units = run_kernel(LoopKernel(), experts, x, m, e)
    ref_grads = torch.autograd.grad(ref, [x, *params], g)
    return (out, grads, units), (ref, ref_grads, ref_units)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_kernel_equals_per_expert_kernel_forward_and_backward(activation):
    """Many distinct widths (planned buckets), an expert without rows: output and every
    gradient equal the per-expert kernel's, and the idle expert's are zero."""
    from mose_ds.experts import MAX_RANGES
    from mose_ds.grouped import plan_layout
    experts = [make(activation, D=16, H=256) for _ in range(4)]   # 32 granules: more than MAX_RANGES
    for i, ffn in enumerate(experts):
        with torch.no_grad():
            for p in ffn.parameters():
                p.mul_(1 + i)                                   # experts differ
    gen = torch.Generator().manual_seed(5)
    e = torch.randint(0, 3, (300,), generator=gen)           # expert 3 idle
    m = torch.randint(0, 257, (300,), generator=gen)         # 0: no row
    x = torch.randn(300, 16, generator=gen, requires_grad=True)
    g = torch.randn(300, 16, generator=gen)
    (out, grads, units), (ref, ref_grads, ref_units) = grouped_and_per_expert(experts, x, e, m, g)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
    assert all(float(p.abs().sum()) == 0 for p in grads[1:][3 * len(grads[1:]) // 4:])   # expert 3
    dispatcher = LocalDispatcher(4, 256)
    layout = plan_layout(dispatcher.dispatch(x, dispatcher.plan(e[:, None], m[:, None], (m > 0)[:, None])), 256)
    assert len(layout.ends) == MAX_RANGES and all(end % 8 == 0 for end in layout.ends)
    ends = torch.tensor(layout.ends).flip(0)
    assert units == layout.units == int(ends[torch.searchsorted(ends, m[m > 0])].sum()) >= ref_units


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_kernel_with_frozen_weights_and_in_bf16(dtype):
    """Frozen weights get no gradient while the input does; bf16 agrees with the fp32
    per-expert kernel to bf16 precision (weight gradients accumulate in fp32)."""
    experts = [make("swiglu", D=16, H=96) for _ in range(3)]
    gen = torch.Generator().manual_seed(3)
    e, m = torch.randint(0, 3, (60,), generator=gen), torch.randint(0, 97, (60,), generator=gen)
    x, g = torch.randn(60, 16, generator=gen, requires_grad=True), torch.randn(60, 16, generator=gen)
    _, (ref, ref_grads, _) = grouped_and_per_expert(experts, x, e, m, g)
    low = [ffn.to(dtype) for ffn in experts]
    (out, grads, _), _ = grouped_and_per_expert(low, x.detach().to(dtype).requires_grad_(), e, m, g.to(dtype))
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(out.float(), ref, **tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.float(), b, **tol)
    for ffn in low:
        ffn.requires_grad_(False)
    (out, grads, _), _ = grouped_and_per_expert(low, x.detach().to(dtype).requires_grad_(), e, m, g.to(dtype))
    assert len(grads) == 1 and all(p.grad is None for ffn in low for p in ffn.parameters())
    torch.testing.assert_close(grads[0].float(), ref_grads[0], **tol)


@pytest.mark.parametrize("kernel", [LoopKernel, GroupedKernel])
def test_kernels_without_any_row(kernel):
    """No row at all for this rank's experts (every slot dropped, or sent elsewhere): an
    empty output, and zero gradients for the input and every expert weight."""
    experts = [make("gelu", D=16, H=64) for _ in range(2)]
    for n in (5, 0):
        m = torch.zeros(n, dtype=torch.long)
        x = torch.randn(n, 16, requires_grad=True)
        out, units = run_kernel(kernel(), experts, x, m)
        assert out.shape == (n, 16) and float(out.abs().sum()) == 0 and units == 0
        grads = torch.autograd.grad(out.sum(), [x, *[p for f in experts for p in f.parameters()]])
        assert all(float(g.abs().sum()) == 0 for g in grads) and grads[1].shape == (64, 16)


def test_grouped_kernel_views_flat_buffers_and_copies_other_weights_each_forward():
    """Weights laid out expert after expert in one buffer (DeepSpeed ZeRO-1/2) are read as a
    strided view (no copy, always current); separately allocated weights are stacked by each
    forward, so a write through `.data` (no storage or version change, as DeepSpeed's
    optimizers write) is seen at once."""
    from mose_ds.grouped import weight_stacks
    experts = [make("gelu", D=16, H=64) for _ in range(3)]
    flat = torch.randn(3 * 2 * 64 * 16)
    for i, ffn in enumerate(experts):      # as ZeRO's flat buffer: e0.w_up, e0.w_down, e1.w_up, ...
        ffn.w_up.data = flat[(2 * i) * 1024:(2 * i + 1) * 1024].view(64, 16)
        ffn.w_down.data = flat[(2 * i + 1) * 1024:(2 * i + 2) * 1024].view(64, 16)
    up, down, gate = weight_stacks(experts, 64)
    assert gate is None and up.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    flat.data.mul_(2)                                             # an optimizer step, in place
    torch.testing.assert_close(up[2], experts[2].w_up.detach())
    loose = [make("gelu", D=16, H=64) for _ in range(3)]
    weight_stacks(loose, 64)
    loose[1].w_up.data.add_(1.0)                                  # neither storage nor version moves
    torch.testing.assert_close(weight_stacks(loose, 64)[0][1], loose[1].w_up.detach())
    assert weight_stacks(loose, 40)[1].shape == (3, 40, 16)                # the units the products read


def test_optimizer_groups_keep_each_layers_experts_in_one_zero_buffer(world, monkeypatch):
    """With a group size limit that DeepSpeed's split would cut inside the second MoE layer,
    every layer's experts still lie in one ZeRO flat buffer: the grouped kernel reads each as
    a view, current after an optimizer step."""
    from mose_ds import engine as engine_lib
    from mose_ds.grouped import weight_stacks
    from mose_ds.train import train_micro_batch
    cfg = tiny_config(model={"num_layers": 4}, engine={"zero_stage": 2})
    model = engine_lib.build_model(cfg)
    layers = model.moe_layers()
    per_layer = sum(p.numel() for p in layers[0].local_experts.parameters())
    monkeypatch.setattr(engine_lib, "MOE_GROUP_LIMIT", per_layer + per_layer // 2)
    engine = engine_lib.create_engine(cfg, model)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.model.seq_len + 1))
    before = layers[-1].local_experts[-1].w_up.detach().clone()
    while not engine.is_gradient_accumulation_boundary():
        train_micro_batch(engine, cfg, tokens[:, :-1], tokens[:, 1:], 0.5)
    train_micro_batch(engine, cfg, tokens[:, :-1], tokens[:, 1:], 0.5)          # with the optimizer step
    assert len(layers) >= 2 and not torch.equal(before, layers[-1].local_experts[-1].w_up)
    for layer in layers:
        experts = list(layer.local_experts)
        up, down, _ = weight_stacks(experts, experts[0].ffn_hidden_size)
        assert up.untyped_storage().data_ptr() == experts[0].w_up.untyped_storage().data_ptr()
        assert down.untyped_storage().data_ptr() == experts[0].w_down.untyped_storage().data_ptr()
        torch.testing.assert_close(up[-1], experts[-1].w_up.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("capability,dtype,picks", [((9, 0), torch.bfloat16, True), ((10, 0), torch.bfloat16, True),
                                                    ((12, 0), torch.bfloat16, False), ((8, 0), torch.bfloat16, False),
                                                    ((9, 0), torch.float32, False)])
def test_auto_kernel_is_grouped_in_bf16_on_hopper_and_b200_only(monkeypatch, capability, dtype, picks):
    """Where torch's grouped product is one fused kernel (capability 9.x, 10.x; not 12.x, where
    it is a loop of products after a host copy of the offsets), and in bf16 only."""
    from mose_ds.grouped import auto_picks_grouped
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    assert auto_picks_grouped(torch.device("cuda", 0), dtype, 64, 256) is picks
    assert not auto_picks_grouped(torch.device("cpu"), torch.bfloat16, 64, 256)
