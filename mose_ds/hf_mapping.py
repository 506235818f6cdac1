"""Parameter names and layouts between HF DeepSeek-V2 checkpoints and our model.

Pure functions of names and tensors, used by both converters and the tests. Every tensor
maps one to one except the dense FFN of the first blocks, whose HF `gate_proj` and
`up_proj` are the two halves of megatron's `linear_fc1`. Expert down projections are stored
hidden-major on our side (`w_down` is [H, D], so width slices are row blocks), the
transpose of HF's `down_proj` [D, H]. Routed experts keep their global index here; which
expert-parallel rank holds one is the checkpoint writer's business.
"""

from __future__ import annotations

import os
import re

import torch

_ATTENTION = "q_proj|q_a_proj|q_a_layernorm|q_b_proj|kv_a_proj_with_mqa|kv_a_layernorm|kv_b_proj|o_proj"
_EXPERTS = "layers.{L}.mlp.deepspeed_moe.experts.deepspeed_experts.{E}"
# (HF template, our template, layout); {L} layer, {E} expert, {A} attention projection.
# Layouts: "same", "transpose", "fc1.gate", "fc1.up".
_RULES = [
    ("model.embed_tokens.weight", "wte.weight", "same"),
    ("lm_head.weight", "lm_head.weight", "same"),
    ("model.norm.weight", "final_norm.weight", "same"),
    ("model.layers.{L}.input_layernorm.weight", "layers.{L}.input_layernorm.weight", "same"),
    ("model.layers.{L}.post_attention_layernorm.weight", "layers.{L}.pre_mlp_layernorm.weight", "same"),
    ("model.layers.{L}.self_attn.{A}.weight", "layers.{L}.self_attention.{A}.weight", "same"),
    ("model.layers.{L}.mlp.gate_proj.weight", "layers.{L}.mlp.linear_fc1.weight", "fc1.gate"),
    ("model.layers.{L}.mlp.up_proj.weight", "layers.{L}.mlp.linear_fc1.weight", "fc1.up"),
    ("model.layers.{L}.mlp.down_proj.weight", "layers.{L}.mlp.linear_fc2.weight", "same"),
    ("model.layers.{L}.mlp.gate.weight", "layers.{L}.mlp.deepspeed_moe.gate.weight", "same"),
    ("model.layers.{L}.mlp.experts.{E}.gate_proj.weight", _EXPERTS + ".w_gate", "same"),
    ("model.layers.{L}.mlp.experts.{E}.up_proj.weight", _EXPERTS + ".w_up", "same"),
    ("model.layers.{L}.mlp.experts.{E}.down_proj.weight", _EXPERTS + ".w_down", "transpose"),
    ("model.layers.{L}.mlp.shared_experts.gate_proj.weight", "layers.{L}.mlp.shared_ffn.w_gate", "same"),
    ("model.layers.{L}.mlp.shared_experts.up_proj.weight", "layers.{L}.mlp.shared_ffn.w_up", "same"),
    ("model.layers.{L}.mlp.shared_experts.down_proj.weight", "layers.{L}.mlp.shared_ffn.w_down", "transpose"),
]
_GROUPS = {"L": r"(?P<L>\d+)", "E": r"(?P<E>\d+)", "A": f"(?P<A>{_ATTENTION})"}


def _regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for key, group in _GROUPS.items():
        pattern = pattern.replace(re.escape("{" + key + "}"), group)
    return re.compile(pattern + "$")


_FROM_HF = [(_regex(hf), ours, layout) for hf, ours, layout in _RULES]
_FROM_OURS = [(_regex(ours), hf, layout) for hf, ours, layout in _RULES]


def hf_to_ours(name: str) -> tuple[str, str]:
    """(our parameter name, layout) of an HF tensor name; KeyError if it is not one of ours."""
    for pattern, template, layout in _FROM_HF:
        match = pattern.match(name)
        if match:
            return template.format(**match.groupdict()), layout
    raise KeyError(name)


def ours_to_hf(name: str) -> list[tuple[str, str]]:
    """[(HF name, layout)] of one of our parameter names (two for a dense `linear_fc1`)."""
    found = [(template.format(**match.groupdict()), layout)
             for pattern, template, layout in _FROM_OURS if (match := pattern.match(name))]
    if not found:
        raise KeyError(name)
    return found


def to_ours(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """An HF tensor in our layout (fc1 halves are placed by `merge_fc1`)."""
    return tensor.t().contiguous() if layout == "transpose" else tensor


def to_hf(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """Our tensor (or its fc1 half) in HF's layout."""
    if layout == "transpose":
        return tensor.t().contiguous()
    if layout in ("fc1.gate", "fc1.up"):
        gate, up = tensor.chunk(2, dim=0)
        return (gate if layout == "fc1.gate" else up).contiguous()
    return tensor


def hf_shape(shape: tuple, layout: str) -> tuple:
    """The HF shape of one of our tensors (or of its fc1 half) under `layout`."""
    if layout == "transpose":
        return tuple(reversed(shape))
    if layout in ("fc1.gate", "fc1.up"):
        return (shape[0] // 2,) + tuple(shape[1:])
    return tuple(shape)


def merge_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """megatron's SwiGLU `linear_fc1`: gate rows first, then up rows."""
    return torch.cat([gate, up], dim=0)


class ConversionError(ValueError):
    """An HF checkpoint that does not fit the model its config implies; the message names it."""


def conversion_plan(entries: dict, expected: dict) -> dict:
    """How an HF checkpoint's tensors (`entries`: {HF name: shards.TensorEntry}) become ours:
    {our name: (dtype, shape, [(layout, TensorEntry), ...])}, checked against `expected`
    ({our name: shape} of the model built from the config); ConversionError names what
    does not fit."""
    from .shards import DTYPES
    out = {}
    for hf_name, entry in entries.items():
        try:
            name, layout = hf_to_ours(hf_name)
        except KeyError:
            raise ConversionError(f"{entry.file}: unexpected tensor {hf_name} (not part of a DeepSeek-V2 model "
                          "with this config)") from None
        if name not in expected:
            raise ConversionError(f"{entry.file}: tensor {hf_name} does not exist in a model with this config")
        out.setdefault(name, [DTYPES[entry.dtype], None, []])[2].append((layout, entry))
    for name, (dtype, _, sources) in out.items():
        shapes = {layout: entry.shape for layout, entry in sources}
        if "fc1.gate" in shapes or "fc1.up" in shapes:
            if len(shapes) != 2:
                raise ConversionError(f"{sources[0][1].file}: dense FFN {name} lacks its "
                              f"{'up' if 'fc1.gate' in shapes else 'gate'}_proj half")
            shape = (shapes["fc1.gate"][0] + shapes["fc1.up"][0],) + tuple(shapes["fc1.gate"][1:])
            sources.sort(key=lambda s: s[0] != "fc1.gate")
        else:
            layout, entry = sources[0]
            shape = tuple(reversed(entry.shape)) if layout == "transpose" else entry.shape
        if tuple(shape) != tuple(expected[name]):
            hf_names = ", ".join(os.path.basename(e.file) for _, e in sources)
            raise ConversionError(f"tensor for {name} has shape {list(shape)} in {hf_names}, "
                          f"the config implies {list(expected[name])}")
        out[name][1] = tuple(shape)
    missing = [n for n in expected if n not in out]
    if missing:
        raise ConversionError(f"the checkpoint lacks {len(missing)} tensor(s) of the model, e.g. {missing[0]}")
    return out
