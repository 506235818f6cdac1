"""Per-GPU memory of a training run: model states under DeepSpeed ZeRO with expert
parallelism, activations of our blocks, gradient-reduction buffers. Pure arithmetic.

Model states follow the optimizer path DeepSpeed 0.19 takes for a config
(`engine._do_optimizer_sanity_check`) and what each path allocates, per GPU, with
`local = N + E / EP` parameters held (N non-expert, E routed-expert parameters of the whole
model) and `shard = (N + E) / W` of them owned by the GPU's optimizer (non-expert state is
partitioned over the W data-parallel ranks, each expert's over its W / EP expert-data-parallel
ranks: (E / EP) / (W / EP) = E / W):

| path | weights | gradients (backward / optimizer step) | optimizer | step temporary |
| --- | --- | --- | --- | --- |
| ZeRO-0, fp32 (torch AdamW) | 4 local | 4 local / 4 local | 8 local | 4 local |
| ZeRO-1, no separate accumulation | p local | p local / 4 shard | 12 shard | 4 shard |
| ZeRO-1, bf16 + fp32 accumulation (BF16 optimizer) | 2 local | 6 local / 6 local | 12 shard | 4 shard |
| ZeRO-2 | p local | g shard / g shard (+ 4 shard copy unless g = 4 and p = 2) | 12 shard | 4 shard |

p is 2 (bf16) or 4 (fp32) bytes, g the gradient-accumulation bytes; "optimizer" is the fp32
master copy plus Adam's two moments; the step temporary is the one fp32 tensor per
parameter that torch's foreach AdamW allocates (the square root of the second moment).

Activations count, term by term, the tensors autograd keeps for backward in our blocks
(mose_ds/model.py, moe_layer.py, experts.py, deepseek.py; tests/test_memory.py checks the
count against torch's saved-tensor hooks), times the two width branches that live at once
(`mose.two_pass: joint`), plus the largest backward working set (the loss gradient over the
vocabulary and one chunk of the loss's fp32 softmax, loss.py). Attention keeps nothing of
size S per token (a fused kernel on CPU and GPU alike), so a CPU run checks the GPU plan.

Shape legend (per token unless said): D model dim, N heads, S sequence, F dense FFN hidden,
H expert hidden, m = ceil(w * H) executed expert units, K top-k, E experts, V vocabulary,
a activation bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


GiB = 2 ** 30
FP32 = 4


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class ParamCounts:
    non_expert: int      # embeddings, attention, dense FFNs, norms, routers, shared experts
    expert: int          # routed experts of every MoE layer (all E of them)

    @property
    def total(self) -> int:
        return self.non_expert + self.expert


def optimizer_path(zero_stage: int, precision: str, grad_accum_dtype: str) -> str:
    """Which DeepSpeed optimizer wraps ours: 'adamw' (no ZeRO), 'zero1', 'bf16_optimizer'
    (ZeRO-1 with bf16 weights and fp32 gradient accumulation) or 'zero2'."""
    if zero_stage == 0:
        return "adamw"
    if zero_stage == 1:
        return "bf16_optimizer" if precision == "bf16" and grad_accum_dtype == "fp32" else "zero1"
    return "zero2"


def _bytes(precision: str) -> int:
    """Bytes of one value in `precision`."""
    return 2 if precision == "bf16" else FP32


def _local(counts: ParamCounts, ep: int) -> float:
    """Parameters one GPU holds: every non-expert one, its 1/EP of the experts."""
    return counts.non_expert + counts.expert / ep


def model_states(counts: ParamCounts, world: int, ep: int, zero_stage: int, precision: str,
                 grad_accum_dtype: str = "fp32") -> dict[str, float]:
    """Bytes per GPU of weights, gradients (in backward and at the optimizer step), optimizer
    state and the optimizer step's temporary (table in the module docstring)."""
    p = _bytes(precision)
    g = p if grad_accum_dtype == precision or zero_stage == 0 else FP32
    local = _local(counts, ep)
    shard = counts.total / world
    path = optimizer_path(zero_stage, precision, grad_accum_dtype)
    if path == "adamw":
        grads = (FP32 * local, FP32 * local)
        optimizer, temp = 2 * FP32 * local, FP32 * local
    elif path == "zero1":
        grads = (p * local, FP32 * shard)
        optimizer, temp = 3 * FP32 * shard, FP32 * shard
    elif path == "bf16_optimizer":
        # fp32 accumulators for every local parameter; bf16 .grad kept until the step
        grads = ((FP32 + 2) * local, (FP32 + 2) * local)
        optimizer, temp = 3 * FP32 * shard, FP32 * shard
    else:
        # the partition's gradient buffer; at the step an fp32 flat copy of it unless the
        # buffer already is the fp32 accumulator of bf16 weights
        copy = 0 if (g == FP32 and p == 2) else FP32 * shard
        grads = (g * shard, g * shard + copy)
        optimizer, temp = 3 * FP32 * shard, FP32 * shard
    return {"weights": p * local, "gradients_backward": grads[0], "gradients_step": grads[1],
            "optimizer": optimizer, "step_temporary": temp}


def grouped_stack_bytes(counts: ParamCounts, ep: int, zero_stage: int, precision: str, kernel: str,
                        moe_layers: int = 1) -> float:
    """What the grouped expert kernel needs besides the weights (`grouped.weight_stacks`): it
    reads each MoE layer's local expert weights as [L, H, D] stacks. Under ZeRO-1/2 they are
    views of DeepSpeed's flat parameter buffer (nothing). Without ZeRO (fp32 only, so only an
    explicit `moe.expert_kernel: grouped`) the layer's forward and backward each copy them for
    their own use: one layer's local expert weights at a time, a transient."""
    grouped = kernel == "grouped" or (kernel == "auto" and precision == "bf16")
    if not grouped or zero_stage != 0:
        return 0.0
    return _bytes(precision) * counts.expert / ep / max(1, moe_layers)


def reduce_buffers(counts: ParamCounts, ep: int, zero_stage: int, precision: str,
                   reduce_bucket_size: int, overlap_comm: bool) -> float:
    """Gradient-reduction buckets of ZeRO (two with `overlap_comm`), capped by the local size."""
    if zero_stage == 0:
        return 0.0
    return (2 if overlap_comm else 1) * _bytes(precision) * min(reduce_bucket_size, _local(counts, ep))


# --------------------------------------------------------------------------- activations

@dataclass(frozen=True)
class ActivationShape:
    """What the activation count needs to know about a model (from ModelConfig + MoEConfig)."""
    family: str                # gpt2 | deepseek_v2
    num_layers: int
    moe_layers: int
    hidden: int                # D
    heads: int                 # N
    vocab: int                 # V
    ffn_hidden: int            # F (dense blocks)
    expert_hidden: int         # H
    shared_hidden: int         # routed-expert-sized shared FFN units (0: none)
    swiglu: bool
    num_experts: int           # E
    top_k: int                 # K
    capacity_factor: float
    min_capacity: int
    drop_tokens: bool
    mla: dict                  # DeepSeek multi-latent attention dims (empty for gpt2)


def _norm(s: ActivationShape, a: int) -> float:
    """LayerNorm keeps its input and two statistics; torch's RMSNorm computes in fp32 and
    keeps the fp32 input, output and one statistic."""
    D = s.hidden
    return a * (D + 2) if s.family == "gpt2" else FP32 * (2 * D + 1)


def _attention(s: ActivationShape, a: int) -> float:
    """Self-attention without its norm, on the fused kernel (attention.py), which keeps q, k,
    v, its output and one fp32 log-sum-exp per head, nothing of size S. GPT-2: qkv input D,
    qkv output 3D (q, k, v are views of it), the attention output D (the output projection's
    input is a view of it), the log-sum-exp. DeepSeek-V2 multi-latent attention: the two projection inputs,
    the fp32 latent norm(s) and the kv expansion input R, then q, k and v padded to the q/k
    head dim (N*(Q+P) each) and the padded output, and the output-projection input N*V."""
    D, N = s.hidden, s.heads
    if s.family == "gpt2":
        return a * 5 * D + FP32 * N
    m = s.mla
    R, P, Q, Vh, Rq = m["kv_lora_rank"], m["qk_rope_head_dim"], m["qk_nope_head_dim"], m["v_head_dim"], m["q_lora_rank"]
    q_path = FP32 * (2 * Rq + 1) + a * Rq if Rq else 0
    latent = FP32 * (2 * R + 1) + (FP32 * P if a == FP32 else 0) + a * R
    sdpa = a * 4 * N * (Q + P) + FP32 * N
    return a * 2 * D + q_path + latent + sdpa + a * N * Vh


def _ffn_units(units: int, swiglu: bool) -> int:
    """Per-row tensors a slimmable FFN of `units` hidden units keeps: its pre-activations
    only (GELU: m; SwiGLU: gate and up, 2m), the activation being recomputed in backward."""
    return (2 if swiglu else 1) * units


def capacity(s: ActivationShape, tokens: int) -> int:
    """Slots per expert C for `tokens` routed tokens (all of them when none is dropped)."""
    if not s.drop_tokens:
        return tokens
    from .gating import expert_capacity       # torch: the planner's command line runs without it
    return expert_capacity(tokens, s.num_experts, s.top_k, s.capacity_factor, s.min_capacity)


def kept_slots(s: ActivationShape, tokens: int) -> float:
    """Kept (token, expert) slots per token: k, or what capacity leaves of them (at most E C
    over the tokens; routing fills capacity unevenly, so this is an upper bound)."""
    return min(float(s.top_k), s.num_experts * capacity(s, tokens) / tokens)


def _moe(s: ActivationShape, tokens: int, width: float, a: int) -> float:
    """MoE FFN per token: fp32 router input and routing tensors, then per kept slot its row
    as the expert kernel's input D, the expert's hidden tensors at m units, its output row D
    (kept by the combine for p's gradient) and two indices (the slot's row, the row's slot);
    the shared experts at full width. Expert parallelism keeps nothing more: rows cross
    ranks exactly (`dispatch.py`), and the received rows are the kernel's input."""
    D, E, K = s.hidden, s.num_experts, s.top_k
    m = max(1, math.ceil(width * s.expert_hidden))
    routing = FP32 * (D + 3 * E) + 24 * K + 4
    per_slot = a * (2 * D + _ffn_units(m, s.swiglu)) + 16
    shared = 0.0
    if s.shared_hidden:   # its input is the router's fp32 copy in fp32, a bf16 tensor of its own in bf16
        shared = a * _ffn_units(s.shared_hidden, s.swiglu) + (a * D if a != FP32 else 0)
    return routing + kept_slots(s, tokens) * per_slot + shared


def moe_layer(s: ActivationShape, tokens: int, width: float, precision: str, ep: int) -> dict[str, float]:
    """Bytes of one MoE layer's forward on `tokens` tokens: what it keeps for backward, and
    the largest transient on top of it, the larger of the all-to-all's send and receive
    buffers (expert parallelism: kept rows, 2 N D a) and the combine's working set (a padded
    copy of the output rows, and the fp32 sum and gathered row of every token: N D a + 8 T D)."""
    a = _bytes(precision)
    N, D = kept_slots(s, tokens) * tokens, s.hidden
    saved = tokens * _moe(s, tokens, width, a)
    exchange = 2 * N * D * a if ep > 1 else 0.0
    transient = max(exchange, N * D * a + 2 * FP32 * tokens * D)
    return {"saved": saved, "transient": transient, "peak": saved + transient}


def _dense(s: ActivationShape, a: int) -> float:
    F = s.ffn_hidden
    return a * (s.hidden + (5 * F if s.swiglu else 2 * F))


def block_bytes(s: ActivationShape, moe: bool, tokens: int, width: float, a: int) -> float:
    """Bytes per token one block keeps for backward (one forward, expert width `width`)."""
    mlp = _moe(s, tokens, width, a) if moe else _dense(s, a)
    return 2 * _norm(s, a) + _attention(s, a) + mlp


def activations(s: ActivationShape, micro_batch: int, seq: int, precision: str, widths: tuple[float, ...],
                recompute: bool) -> dict[str, float]:
    """Bytes per GPU of activations for one micro-batch.

    `widths`: the expert widths whose forwards are alive together (the full-width and the
    sampled branch under the joint two-pass objective, one under `sequential`; the widest
    sampled width is the worst case). `recompute`: per-block activation checkpointing keeps
    each block's input and recomputes one block at a time in backward.
    """
    a = _bytes(precision)
    T, D, V = micro_batch * seq, s.hidden, s.vocab
    dense_layers = s.num_layers - s.moe_layers
    # final norm, head input, the logits (which the loss keeps) and their fp32 log-sum-exp; token ids
    head = _norm(s, a) + a * D + a * V + FP32 + 8
    saved = 0.0
    for w in widths:
        blocks = [block_bytes(s, True, T, w, a)] * s.moe_layers + [block_bytes(s, False, T, w, a)] * dense_layers
        saved += T * (head + (s.num_layers * a * D if recompute else sum(blocks)))
    if recompute:   # one block re-run in backward, at the widest width
        saved += T * max(block_bytes(s, moe, T, max(widths), a)
                         for moe in (True, False) if (s.moe_layers if moe else dense_layers))
    # the logits' gradient, and the loss's fp32 softmax of one chunk of rows (loss.py)
    from .loss import CHUNK_BYTES as LOSS_CHUNK_BYTES
    transient = T * a * V + min(T * FP32 * V, LOSS_CHUNK_BYTES)
    return {"saved": saved, "transient": transient, "total": saved + transient}


# --------------------------------------------------------------------------- the plan

def peak(states: dict[str, float], act: float, buffers: float) -> dict[str, float]:
    """The two peaks of an iteration (end of forward / start of backward, and the optimizer
    step) and the larger of them; `buffers` is what persists besides model states."""
    persistent = states["weights"] + states["optimizer"] + buffers
    backward = persistent + states["gradients_backward"] + act
    step = persistent + states["gradients_step"] + states["step_temporary"]
    return {"backward_peak": backward, "step_peak": step, "peak": max(backward, step)}


def plan(cfg, counts: ParamCounts, cluster: Cluster, grad_accum_dtype: str = "fp32",
         reserve: float = 0.1) -> dict:
    """Bytes per GPU of a run config (RunConfig) on a cluster, by part, and whether it fits.

    `reserve`: the fraction of GPU memory kept for what is not planned (CUDA context, NCCL
    buffers, allocator fragmentation)."""
    world, ep = cluster.world, cfg.moe.expert_parallel_size
    if world % ep:
        raise ValueError(f"expert_parallel_size={ep} does not divide {world} GPUs")
    e = cfg.engine
    states = model_states(counts, world, ep, e.zero_stage, e.precision, grad_accum_dtype)
    widths = (1.0, cfg.mose.width_max) if cfg.mose.enabled and cfg.mose.two_pass == "joint" else (1.0,)
    act = activations(activation_shape(cfg.model, cfg.moe), cfg.train.micro_batch_size, cfg.model.seq_len,
                      e.precision, widths, cfg.train.activation_checkpointing)
    buffers = reduce_buffers(counts, ep, e.zero_stage, e.precision, e.reduce_bucket_size, e.overlap_comm)
    stacks = grouped_stack_bytes(counts, ep, e.zero_stage, e.precision, cfg.moe.expert_kernel,
                                 cfg.model.num_moe_layers)
    layer = moe_layer(activation_shape(cfg.model, cfg.moe), cfg.train.micro_batch_size * cfg.model.seq_len,
                      1.0, e.precision, ep) if cfg.model.num_moe_layers else None
    peaks = peak(states, act["total"] + stacks, buffers)      # stacks: a transient of forward and backward
    usable = cluster.gpu_memory_gib * GiB * (1 - reserve)
    return {"nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node, "world": world,
            "expert_parallel": ep, "zero_stage": e.zero_stage, "precision": e.precision,
            "optimizer_path": optimizer_path(e.zero_stage, e.precision, grad_accum_dtype),
            "micro_batch": cfg.train.micro_batch_size, "seq_len": cfg.model.seq_len,
            "activation_checkpointing": cfg.train.activation_checkpointing, "widths_alive": list(widths),
            **states, "activations_saved": act["saved"], "activations_transient": act["transient"],
            "activations": act["total"], "buffers": buffers, "expert_stacks": stacks, "moe_layer": layer, **peaks,
            "gpu_memory": cluster.gpu_memory_gib * GiB, "usable": usable, "fits": peaks["peak"] <= usable}


def activation_shape(model, moe) -> ActivationShape:
    """The ActivationShape of a recipe's ModelConfig and MoEConfig."""
    hf = model.hf or {}
    mla = {k: hf.get(k) or 0 for k in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
                                        "v_head_dim", "q_lora_rank")} if model.family != "gpt2" else {}
    return ActivationShape(
        family=model.family, num_layers=model.num_layers, moe_layers=model.num_moe_layers,
        hidden=model.hidden_size, heads=model.num_heads, vocab=model.vocab_size,
        ffn_hidden=model.ffn_hidden_size, expert_hidden=model.expert_hidden_size,
        shared_hidden=model.shared_expert_hidden_size, swiglu=model.activation == "swiglu",
        num_experts=moe.num_experts, top_k=moe.top_k, capacity_factor=moe.capacity_factor,
        min_capacity=moe.min_capacity, drop_tokens=moe.drop_tokens, mla=mla)
