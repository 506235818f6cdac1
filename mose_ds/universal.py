"""Layout-free ("universal") checkpoints: a DeepSpeed MoE checkpoint made readable by any
world size and expert-parallel size.

DeepSpeed's ZeRO-1/2 checkpoint holds each rank's flat partition of the fp32 master weights
and Adam moments, with experts named by their local index on that rank; its own universal
conversion does not understand the per-expert files of MoE models. `convert` reassembles,
per parameter and with experts named by their global index, the fp32 master weights, both
Adam moments and the step, and writes them as safetensors files with the schedule and data
position. `load` puts such a folder into a freshly built engine of any layout: every rank
takes its experts' rows and its ZeRO partition through DeepSpeed's fragment API.

Checkpoints written without ZeRO (stage 0) carry weights only: their optimizer state is
reset, and both the converter and the resuming job say so.
"""

from __future__ import annotations

import json
import os

import torch
import yaml

from .checkpoint import MANIFEST, CheckpointError, TrainState, read_model_states, torch_load
from .model import global_expert_name
from .shards import read_header, read_tensor, staged_folder, write_file

FORMAT = "mose-ds-universal/1"
INFO = "universal.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


def is_universal(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, INFO))


def read_deepspeed(folder: str) -> tuple[dict, dict | None, dict]:
    """(fp32 weights, {moment: {name: tensor}} or None, metadata) of a DeepSpeed checkpoint
    tag folder written by mose_ds.checkpoint; names are global (layout-independent)."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
        with open(os.path.join(folder, "config.yaml")) as f:
            config = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError):
        raise CheckpointError(f"{folder} is not a complete MoSE-DS checkpoint (manifest.json and config.yaml "
                              "are needed)") from None
    world, ep = manifest["world_size"], manifest["expert_parallel_size"]
    ep_ranks = manifest.get("expert_ranks") or [r % ep for r in range(world)]
    local_experts = config["moe"]["num_experts"] // ep

    states, weights = read_model_states(folder)
    weights = {n: t.float() for n, t in weights.items() if not n.endswith("_extra_state")}
    meta = {k: states.get(k) for k in ("iteration", "data_position", "global_steps", "global_samples",
                                       "skipped_steps", "lr_scheduler")}
    meta.update(world_size=world, expert_parallel_size=ep, config=config)

    # ZeRO-1/2 shards; "bf16_" ones come from DeepSpeed's BF16 optimizer (ZeRO-1, bf16, fp32 accumulation)
    for prefix in ("", "bf16_"):
        shards = [os.path.join(folder, f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt") for r in range(world)]
        if all(os.path.isfile(p) for p in shards):
            break
    else:
        meta["step"] = None
        return weights, None, meta
    pieces: dict[str, list] = {}       # name -> [(partition index, master, exp_avg, exp_avg_sq)]
    step = None
    for rank, path in enumerate(shards):
        opt = torch_load(path)["optimizer_state_dict"]
        groups = opt["base_optimizer_state"]["param_groups"]
        for g, mapping in enumerate(opt["param_slice_mappings"]):
            master, state = opt["single_partition_of_fp32_groups"][g], opt["base_optimizer_state"]["state"][g]
            step = float(state["step"])
            expert_group = bool(groups[g].get("moe"))
            # Non-expert groups are partitioned over all ranks; expert groups over the ranks
            # holding the same experts (same expert-parallel rank), in rank order.
            part = ([r for r in range(world) if ep_ranks[r] == ep_ranks[rank]].index(rank)
                    if expert_group else rank)
            for name, frag in mapping.items():
                sl = slice(frag.start, frag.start + frag.numel)
                key = global_expert_name(name, ep_ranks[rank], local_experts) if expert_group else name
                pieces.setdefault(key, []).append((part, master[sl], state["exp_avg"][sl], state["exp_avg_sq"][sl]))
    missing = sorted(set(weights) - set(pieces))
    if missing:
        raise CheckpointError(f"{folder}: the optimizer shards lack {len(missing)} parameter(s), e.g. {missing[0]}")
    moments = {m: {} for m in MOMENTS}
    for name, shape_of in weights.items():
        frags = sorted(pieces[name], key=lambda p: p[0])
        full = [torch.cat([f[i] for f in frags]) for i in (1, 2, 3)]
        if full[0].numel() != shape_of.numel():
            raise CheckpointError(f"{folder}: {name} has {full[0].numel()} optimizer values for "
                                  f"{shape_of.numel()} weights")
        weights[name] = full[0].reshape(shape_of.shape).clone()
        for m, t in zip(MOMENTS, full[1:]):
            moments[m][name] = t.reshape(shape_of.shape).clone()
    meta["step"] = step
    return weights, moments, meta


def convert(folder: str, out: str, overwrite: bool = False) -> dict:
    """Write the universal form of checkpoint tag folder `folder` to `out`; returns its info."""
    weights, moments, meta = read_deepspeed(folder)
    config = meta.pop("config")
    info = {"format": FORMAT, "source": os.path.abspath(folder), "optimizer_state": moments is not None,
            "tensors": len(weights), **meta}
    names = sorted(weights)
    files = {"weights": weights, **(moments or {})}
    with staged_folder(out, overwrite) as tmp:
        for kind, table in files.items():
            write_file(os.path.join(tmp, f"{kind}.safetensors"),
                       [(n, torch.float32, tuple(table[n].shape)) for n in names], table.__getitem__)
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        with open(os.path.join(tmp, INFO), "w") as f:
            json.dump(info, f, indent=1)
    return info


def read_info(folder: str) -> dict:
    try:
        with open(os.path.join(folder, INFO)) as f:
            info = json.load(f)
    except (OSError, ValueError):
        raise CheckpointError(f"{os.path.join(folder, INFO)} is unreadable") from None
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{folder}: format {info.get('format')!r}, expected {FORMAT!r}")
    return info


@torch.no_grad()
def load(engine, folder: str, expert_rank: int) -> tuple[TrainState, bool]:
    """Load a universal folder into `engine` (any layout): weights, fp32 masters, Adam moments
    and step, schedule and counters. Returns the train state and whether the optimizer state
    was carried over. Collective under ZeRO (fragments are assembled over data parallel)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from .engine import base_optimizer
    info = read_info(folder)
    kinds = ("weights",) + (MOMENTS if info["optimizer_state"] else ())
    headers = {k: read_header(os.path.join(folder, f"{k}.safetensors")) for k in kinds}
    params = dict(engine.module.global_parameters(expert_rank))
    missing = [n for n in params if n not in headers["weights"]]
    if missing:
        raise CheckpointError(f"{folder} lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    opt = base_optimizer(engine)
    if info["optimizer_state"]:
        # torch AdamW creates its state at the first step: create it now (one entry per
        # parameter, or per flat fp32 partition under ZeRO) and let DeepSpeed link its fragments.
        # The step counter lives where torch AdamW keeps it: on the parameter's device for
        # the fused (CUDA) and capturable kernels, on the CPU otherwise.
        for group in opt.param_groups:
            for p in group["params"]:
                where = p.device if group.get("fused") or group.get("capturable") else "cpu"
                opt.state[p] = {"step": torch.tensor(float(info["step"]), device=where),
                                "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
            engine.optimizer._hp_optimizer_states_linked = False
            engine.optimizer._lazy_init_hp_params_optimizer_state()
    for name, param in params.items():
        value = read_tensor(headers["weights"][name])
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(f"{folder}: {name} is {list(value.shape)}, the model has {list(param.shape)}")
        param.copy_(value.to(param.dtype))
        zero = hasattr(param, "_hp_mapping")
        if zero:
            safe_set_full_fp32_param(param, value.to(param.device))
        if not info["optimizer_state"]:
            continue
        for m in MOMENTS:
            moment = read_tensor(headers[m][name]).to(param.device)
            if zero:
                safe_set_full_optimizer_state(param, moment, m)
            else:                        # no ZeRO: torch AdamW keeps per-parameter state
                opt.state[param][m].copy_(moment)
    if info.get("lr_scheduler") and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(info["lr_scheduler"])
    engine.global_steps = info.get("global_steps") or 0
    engine.global_samples = info.get("global_samples") or 0
    engine.skipped_steps = info.get("skipped_steps") or 0
    return TrainState(iteration=info["iteration"], data_position=info["data_position"]), info["optimizer_state"]
