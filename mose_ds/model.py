"""GPT-2-style MoSE decoder built from megatron-core transformer layers (paper Table 3).

Blocks are megatron's local-spec `TransformerLayer` with exactly one slot swapped: the
`mlp` of blocks `moe_offset, moe_offset + moe_every, ...` is our `SlimmableMoE`, the other
blocks keep megatron's dense MLP. Learned absolute positions, tied input/output
embeddings, no linear biases, no dropout (DESIGN section 3).

The model is single-device code: expert-parallel groups, ZeRO and optimizer groups are
set up in `engine.py`. Widths reach the MoE layers only through the `width_policy` (and
`relaxed`) arguments of `forward`.

Shape legend: B batch, S sequence, D model dim, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import FULL_SEQUENCE, FusedCausalAttention
from .config import ModelConfig, MoEConfig
from .deepseek import MultiLatentAttention
from .gating import RouterSpec
from .loss import chunked_cross_entropy
from .moe_layer import RoutingInfo, SlimmableMoE
from .widths import FULL_WIDTH, WidthPolicy

# Output projections get std / sqrt(2 * num_layers) (GPT-2 / nanoGPT residual scaling).
_OUTPUT_PROJECTIONS = re.compile(r"(linear_proj\.weight|o_proj\.weight|linear_fc2\.weight|\.w_down)$")
_NORMS = re.compile(r"(layernorm|final_norm)\.(weight|bias)$")
_EXPERT = re.compile(r"deepspeed_experts\.(\d+)\.")


def global_expert_name(name: str, expert_rank: int, local_experts: int) -> str:
    """A parameter name with its local expert index (on expert-parallel rank `expert_rank`,
    holding `local_experts` experts) replaced by the global one; other names unchanged."""
    local = _EXPERT.search(name)
    if not local:
        return name
    return name[:local.start(1)] + str(expert_rank * local_experts + int(local.group(1))) + name[local.end(1):]


def transformer_config(model: ModelConfig, bf16: bool = False) -> TransformerConfig:
    """megatron's TransformerConfig for our blocks; every fusion off so CPU and GPU agree.
    `use_cpu_initialization` makes megatron's layers allocate on torch's default device rather
    than `torch.cuda.current_device()`: the device `engine.build_model` builds under."""
    swiglu = model.activation == "swiglu"
    return TransformerConfig(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_heads, ffn_hidden_size=model.ffn_hidden_size,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        layernorm_epsilon=model.layernorm_eps,
        normalization="RMSNorm" if model.family == "deepseek_v2" else "LayerNorm",
        gated_linear_unit=swiglu, activation_func=F.silu if swiglu else F.gelu,
        use_cpu_initialization=True, perform_initialization=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, apply_rope_fusion=False,
        attention_softmax_in_fp32=True, bf16=bf16)


class MoSETransformerLayer(TransformerLayer):
    """megatron's TransformerLayer whose forward hands the width policy to a MoE `mlp`.

    Reuses the layer's own attention, layernorm and bias-dropout-add steps; only the
    `mlp` call differs, so the MoE can take its widths as an explicit argument and return
    its routing information instead of hiding it on the module.
    """

    def forward(self, hidden_SBD, attention_mask, width_policy: WidthPolicy, relaxed: bool = False):
        hidden_SBD, _ = self._forward_attention(hidden_SBD, attention_mask=attention_mask)
        residual_SBD = hidden_SBD
        x_SBD = self._forward_pre_mlp_layernorm(hidden_SBD)
        routing = None
        if isinstance(self.mlp, SlimmableMoE):
            out_SBD, routing = self.mlp(x_SBD, width_policy, relaxed)
            out_with_bias = (out_SBD, None)
        else:
            out_with_bias = self.mlp(x_SBD)
        return self._forward_post_mlp(out_with_bias, residual_SBD), routing


def router_spec(model: ModelConfig) -> RouterSpec:
    """The paper's top-k softmax for GPT models; the HF config's scoring for DeepSeek-V2."""
    if model.family != "deepseek_v2":
        return RouterSpec()
    hf = model.hf
    return RouterSpec(scores="softmax", normalize=bool(hf.get("norm_topk_prob", False)),
                      scale=float(hf.get("routed_scaling_factor", 1.0)),
                      balance="sequence" if hf.get("seq_aux", True) else "batch")


def layer_spec(model: ModelConfig, moe: MoEConfig, index: int) -> ModuleSpec:
    """The local spec with three slots named by us: torch's LayerNorm / RMSNorm for both
    norms (megatron's local spec takes apex's fused LayerNorm whenever apex is importable,
    which changes numerics, or raises without its CUDA extension), fused causal attention
    in `core_attention` (DeepSeek-V2: our multi-latent attention as the whole
    `self_attention`), and our MoE in the `mlp` slot of MoE blocks."""
    local = get_gpt_layer_local_spec().submodules
    if model.family == "deepseek_v2":
        attention = ModuleSpec(module=MultiLatentAttention, params=dict(hf=model.hf))
    else:
        attention = dataclasses.replace(local.self_attention, submodules=dataclasses.replace(
            local.self_attention.submodules, core_attention=FusedCausalAttention))
    submodules = dataclasses.replace(local, input_layernorm=WrappedTorchNorm, pre_mlp_layernorm=WrappedTorchNorm,
                                     self_attention=attention)
    if model.is_moe_layer(index):
        moe_index = sum(model.is_moe_layer(i) for i in range(index))
        mlp = ModuleSpec(module=SlimmableMoE, params=dict(
            moe=moe, ffn_hidden_size=model.expert_hidden_size, activation=model.activation,
            layer_index=moe_index, router=router_spec(model),
            shared_hidden_size=model.shared_expert_hidden_size))
        submodules = dataclasses.replace(submodules, mlp=mlp)
    return ModuleSpec(module=MoSETransformerLayer, submodules=submodules)


class MoSEGPT(nn.Module):
    def __init__(self, model: ModelConfig, moe: MoEConfig, bf16: bool = False,
                 activation_checkpointing: bool = False):
        super().__init__()
        self.cfg, self.moe_cfg = model, moe
        # Keep only each block's input during training; recompute the rest in backward.
        self.activation_checkpointing = activation_checkpointing
        tconfig = transformer_config(model, bf16)
        D = model.hidden_size
        self.wte = nn.Embedding(model.vocab_size, D)
        # GPT-2: learned absolute positions; DeepSeek-V2: rotary inside attention.
        self.wpe = nn.Embedding(model.seq_len, D) if model.family == "gpt2" else None
        self.layers = nn.ModuleList(
            build_module(layer_spec(model, moe, i), config=tconfig, layer_number=i + 1)
            for i in range(model.num_layers))
        self.final_norm = nn.LayerNorm(D, eps=model.layernorm_eps) if model.family == "gpt2" \
            else nn.RMSNorm(D, eps=model.layernorm_eps)
        self.lm_head = None if model.tie_embeddings else nn.Linear(D, model.vocab_size, bias=False)

    def moe_layers(self) -> list[SlimmableMoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, SlimmableMoE)]

    def forward(self, tokens_BS: torch.Tensor, width_policy: WidthPolicy = FULL_WIDTH, relaxed: bool = False,
                context=FULL_SEQUENCE) -> tuple[torch.Tensor, list[RoutingInfo]]:
        """Logits and one RoutingInfo per MoE layer. `relaxed`: gamma calibration's
        differentiable forward (continuous widths through a soft mask over hidden units).
        `context`: the whole sequence, or one step of decoding against a KV cache
        (`kv_cache.KVCache.step`), which gives the positions and stores keys and values."""
        B, S = tokens_BS.shape
        h_BSD = self.wte(tokens_BS)
        if self.wpe is not None:
            h_BSD = h_BSD + self.wpe(context.positions(S, tokens_BS.device))
        h_SBD = h_BSD.transpose(0, 1).contiguous()
        routing = []
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for index, layer in enumerate(self.layers):
            attention = context.layer(index)    # megatron's attention_mask slot carries the context
            if recompute:   # non-reentrant: RNG state is replayed, outputs may be any structure
                h_SBD, info = checkpoint(layer, h_SBD, attention, width_policy, relaxed, use_reentrant=False)
            else:
                h_SBD, info = layer(h_SBD, attention, width_policy, relaxed)
            if info is not None:
                routing.append(info)
        h_BSD = self.final_norm(h_SBD).transpose(0, 1)
        head = self.wte.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h_BSD, head), routing                           # [B, S, V]

    def first_moe_block(self) -> int:
        """The index of the first block with a MoE mlp (the block count when there is none):
        the blocks up to it (attention included) see the same inputs at every width policy."""
        return next((i for i, layer in enumerate(self.layers) if isinstance(layer.mlp, SlimmableMoE)),
                    len(self.layers))

    def global_parameters(self, expert_rank: int = 0):
        """(name, parameter) pairs with experts named by their global index
        (`expert_rank * local experts + local index`): the same names under any layout."""
        for name, param in self.named_parameters():
            if _EXPERT.search(name):
                moe = self.get_submodule(name.split(".deepspeed_moe.")[0])
                name = global_expert_name(name, expert_rank, moe.num_local_experts)
            yield name, param

    @torch.no_grad()
    def init_weights(self, seed: int, expert_rank: int = 0) -> None:
        """Initialise every parameter from its own generator, seeded by (seed, global name).

        Experts are named by their global index (`expert_rank * local + local index`), so
        every expert starts different, and a model built with any expert-parallel layout
        starts from exactly the same weights. Values are sampled on the CPU, one tensor at a
        time, and copied to the parameter's device: the same on any device.
        """
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        for name, param in self.global_parameters(expert_rank):
            match = _NORMS.search(name)
            if match:
                param.fill_(1.0 if match.group(2) == "weight" else 0.0)
                continue
            gen = torch.Generator(device="cpu").manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            sample = torch.empty(param.shape, dtype=torch.float32, device="cpu")
            sample.normal_(0.0, out_std if _OUTPUT_PROJECTIONS.search(name) else std, generator=gen)
            param.copy_(sample)


def build_model(cfg, device="cpu", one_rank: bool = False, seed: int | None = None) -> MoSEGPT:
    """The one way a process builds a model of a RunConfig: allocated on `device` (on "meta",
    shapes only: no memory, no process group needed), its MoE layers joined to DeepSpeed's
    expert-parallel groups, and initialised from `seed` when given (the same weights under any
    layout). `one_rank`: every expert in this process (expert_parallel_size 1), as inference,
    conversion and counting want; training keeps the recipe's layout."""
    moe = dataclasses.replace(cfg.moe, expert_parallel_size=1) if one_rank else cfg.moe
    with torch.device(device):
        model = MoSEGPT(cfg.model, moe, bf16=cfg.engine.precision == "bf16",
                        activation_checkpointing=cfg.train.activation_checkpointing)
    if torch.device(device).type != "meta":
        for layer in model.moe_layers():
            layer.set_deepspeed_parallelism()
    if seed is not None:
        model.init_weights(seed, expert_rank(model))
    return model


def expert_rank(model: MoSEGPT) -> int:
    """This process's index in its expert-parallel group (0 without MoE layers)."""
    from deepspeed.utils import groups
    layers = model.moe_layers()
    return groups._get_expert_parallel_rank(layers[0].expert_group_name) if layers else 0


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32 a chunk of rows at a time (loss.py)."""
    return chunked_cross_entropy(logits_BSV.flatten(0, 1), targets_BS.flatten())


def count_parameters(model: MoSEGPT) -> dict:
    """Total parameters and those active per token (non-expert + k of E experts per MoE layer).

    For an expert-parallel model, pass one built with expert_parallel_size=1.
    """
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for moe in model.moe_layers():
        per_expert = sum(p.numel() for p in moe.local_experts[0].parameters())
        inactive += (moe.num_experts - moe.k) * per_expert
    active = total - inactive
    # The input embedding is a table lookup, not compute: DeepSeek's "activated parameters"
    # leave it out (the output head stays in; with tied embeddings there is nothing to leave out).
    lookup = model.wte.weight.numel() if model.lm_head is not None else 0
    return {"params_total": total, "params_active_per_token": active,
            "params_active_excl_embedding": active - lookup}


def model_info(cfg) -> dict:
    """The parameter counts of a recipe's model (built on the meta device: no memory, no
    weights) and its full-width forward MFLOPs per token in both conventions."""
    from . import engine                        # the process group the MoE layers need
    from .flops import CONVENTIONS, forward_flops_per_token

    engine.init_distributed(device="cpu")
    model = build_model(cfg, "meta", one_rank=True)                 # counts do not depend on EP
    counts = count_parameters(model)
    moe_layers = model.moe_layers()
    expert = sum(p.numel() for m in moe_layers for p in m.local_experts.parameters())
    return {"name": cfg.model.name, **counts, "params_experts": expert,
            "num_layers": cfg.model.num_layers, "moe_layers": len(moe_layers),
            "num_experts": cfg.moe.num_experts, "top_k": cfg.moe.top_k,
            "mflops_per_token": {c: forward_flops_per_token(cfg.model, cfg.moe, 1.0, c)["total"] / 1e6
                                 for c in CONVENTIONS}}
