"""Where a checkpoint is written and read.

A checkpoint is DeepSpeed's own (`save_checkpoint`: model states, ZeRO optimizer shards and
one file per expert) plus, in the same tag folder, the resolved `config.yaml` and one
`rng_state_rank{r}.pt` per rank. The iteration and data position travel in DeepSpeed's
client state. The `latest` pointer is written by us, atomically, only after every rank has
finished writing, so an interrupted save never becomes the checkpoint a resume picks.
Resuming with a config whose architecture differs from the checkpoint's is refused.

`checkpoint.init_from` is the other way in: a weights folder (written by
`tools/convert_hf_to_mose.py`) whose tensors initialise a new run at iteration 0 with a fresh
optimizer, under any expert-parallel layout. Resuming continues a run; init_from starts one.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import yaml
from deepspeed import comm as dist

from .config import ConfigError, RunConfig, from_dict, save_config

LATEST = "latest"


class CheckpointError(RuntimeError):
    """A missing, unreadable or mismatched checkpoint; the message names it."""


@dataclass
class TrainState:
    iteration: int = 0
    data_position: int = 0     # training samples consumed so far (see data.py)


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:08d}"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, cfg: RunConfig, state: TrainState) -> str:
    """Write a checkpoint for `state` and point `latest` at it; returns the tag folder."""
    root, tag = cfg.checkpoint_dir, tag_for(state.iteration)
    client = {"iteration": state.iteration, "data_position": state.data_position}
    engine.save_checkpoint(root, tag=tag, client_state=client, save_latest=False)
    folder = os.path.join(root, tag)
    torch.save(_rng_state(), os.path.join(folder, f"rng_state_rank{dist.get_rank()}.pt"))
    if dist.get_rank() == 0:
        save_config(cfg, os.path.join(folder, "config.yaml"))
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = os.path.join(root, f"{LATEST}.tmp")
        with open(tmp, "w") as f:
            f.write(tag)
        os.replace(tmp, os.path.join(root, LATEST))
    dist.barrier()
    return folder


def find_resume(cfg: RunConfig) -> str | None:
    """The tag folder to resume from, following `checkpoint.resume` (auto / never / a path)."""
    mode = cfg.checkpoint.resume
    if mode == "never":
        if os.path.exists(os.path.join(cfg.checkpoint_dir, LATEST)):
            raise ConfigError(f"checkpoint.resume=never but {cfg.checkpoint_dir} already holds a run; "
                              "use checkpoint.resume=auto to continue it or another logging.out_dir")
        return None
    if mode == "auto":
        root = cfg.checkpoint_dir
        if not os.path.exists(os.path.join(root, LATEST)):
            return None
    else:
        root = mode
        if not os.path.exists(root):
            raise CheckpointError(f"checkpoint.resume: no such checkpoint: {root}")
        if os.path.isfile(os.path.join(root, "config.yaml")):
            return os.path.abspath(root)
    try:
        with open(os.path.join(root, LATEST)) as f:
            tag = f.read().strip()
    except OSError:
        raise CheckpointError(f"checkpoint.resume: {root} has neither config.yaml nor a '{LATEST}' file") from None
    folder = os.path.join(root, tag)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{os.path.join(root, LATEST)} names {tag!r}, which does not exist")
    return os.path.abspath(folder)


def checkpoint_config(folder: str) -> RunConfig:
    path = os.path.join(folder, "config.yaml")
    try:
        with open(path) as f:
            return from_dict(yaml.safe_load(f), source=path)
    except OSError:
        raise CheckpointError(f"{path}: missing or unreadable (not a MoSE-DS checkpoint?)") from None
    except (yaml.YAMLError, ConfigError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint config ({e})") from None


def check_architecture(cfg: RunConfig, folder: str) -> None:
    """Refuse to resume when any architecture field differs from the checkpoint's."""
    saved = checkpoint_config(folder).architecture()
    current = cfg.architecture()
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
             for k in current if saved.get(k) != current.get(k)]
    if diffs:
        raise CheckpointError(f"checkpoint {folder} has a different architecture ({'; '.join(diffs)})")


def load(engine, folder: str) -> TrainState:
    """Load weights, optimizer, scheduler, data position and this rank's RNG state."""
    root, tag = os.path.split(folder.rstrip("/"))
    try:
        path, client = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    except Exception as e:   # DeepSpeed raises many types for a damaged file
        raise CheckpointError(f"checkpoint {folder} could not be loaded: {type(e).__name__}: {e}") from e
    if path is None or client is None:
        raise CheckpointError(f"checkpoint {folder} could not be loaded (missing model states)")
    rng_path = os.path.join(folder, f"rng_state_rank{dist.get_rank()}.pt")
    if os.path.exists(rng_path):
        _set_rng_state(torch.load(rng_path, weights_only=False))
    return TrainState(iteration=client["iteration"], data_position=client["data_position"])


WEIGHTS_INDEX = "weights.index.json"


def read_weights_index(folder: str) -> dict[str, str]:
    """{tensor name: file} of a weights folder written by tools/convert_hf_to_mose.py."""
    index_path = os.path.join(folder, WEIGHTS_INDEX)
    try:
        with open(index_path) as f:
            return dict(json.load(f)["weight_map"])
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint.init_from: {index_path} is missing (not a folder written by "
                              "tools/convert_hf_to_mose.py)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise CheckpointError(f"checkpoint.init_from: {index_path} is not a weights index") from None


@torch.no_grad()
def load_weights(model, folder: str, expert_rank: int = 0) -> int:
    """Copy a weights folder into `model` (this rank's experts only); returns tensors read.

    Every parameter must be present with its shape: a partial folder is refused, never
    half-loaded into a run. Values are cast to the parameter's dtype.
    """
    from .shards import ShardError, read_header, read_tensor
    weight_map = read_weights_index(folder)
    params = dict(model.global_parameters(expert_rank))
    missing = [n for n in params if n not in weight_map]
    if missing:
        raise CheckpointError(f"checkpoint.init_from: {folder} lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    headers = {}
    try:
        for file in sorted({weight_map[n] for n in params}):
            headers[file] = read_header(os.path.join(folder, file))
        for name, param in params.items():
            entry = headers[weight_map[name]].get(name)
            if entry is None or tuple(entry.shape) != tuple(param.shape):
                found = "absent" if entry is None else f"shape {list(entry.shape)}"
                raise CheckpointError(f"checkpoint.init_from: {name} in {weight_map[name]} is {found}, "
                                      f"the model has {list(param.shape)}")
        for name, param in params.items():
            param.copy_(read_tensor(headers[weight_map[name]][name]))
    except ShardError as e:
        raise CheckpointError(f"checkpoint.init_from: {e}") from None
    return len(params)
