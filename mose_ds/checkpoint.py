"""Where a checkpoint is written, verified and read.

A checkpoint is DeepSpeed's own (`save_checkpoint`: model states, ZeRO optimizer shards and
one file per expert) plus, in the same tag folder, the resolved `config.yaml`, the
tokenizer of the run's data (`tokenizer.write_record`: evaluation needs no data folder), one
`rng_state_rank{r}.pt` per rank and, written last, `manifest.json`: the size and CRC-32 of
every file, computed by all ranks in parallel after every rank has finished writing. A tag
folder without a manifest, or whose files do not match it, is partial or damaged: resuming
reports it and falls back to the newest checkpoint that verifies. `latest` is rewritten,
atomically, only after the manifest; the last `checkpoint.keep_last` good checkpoints are
kept. The iteration and data position travel in DeepSpeed's client state. Resuming with a
config whose architecture or parallel layout differs from the checkpoint's is refused (a
different layout goes through mose-convert-checkpoint). Every `.pt` file, ours and
DeepSpeed's, is read through `safe_load`: as tensors and a few known types, never as code.

`checkpoint.init_from` is the other way in: a weights folder (written by
`mose-convert-hf`) whose tensors initialise a new run at iteration 0 with a fresh
optimizer, under any expert-parallel layout. Resuming continues a run; init_from starts one.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import yaml
from deepspeed import comm as dist

from . import safe_load
from .config import ConfigError, RunConfig, from_dict, save_config
from .safe_load import CheckpointError   # defined beside the loader; callers import it from here
from .tokenizer import write_record

LATEST = "latest"
MANIFEST = "manifest.json"
TAG_RE = re.compile(r"^iter_(\d{8})$")


@dataclass
class TrainState:
    iteration: int = 0
    data_position: int = 0     # training samples consumed so far (see data.py)


def tag_for(iteration: int) -> str:
    return f"iter_{iteration:08d}"


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_initialized():     # this process uses CUDA (a GPU run), not merely sees it
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, cfg: RunConfig, state: TrainState) -> str:
    """Write a checkpoint for `state`, verify-stamp it, point `latest` at it and prune old
    ones; returns the tag folder. Collective: every rank calls it."""
    root, tag = cfg.checkpoint_dir, tag_for(state.iteration)
    folder = os.path.join(root, tag)
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0 and os.path.isdir(folder):   # left by a job that died while writing it
        shutil.rmtree(folder)
    dist.barrier()
    client = {"iteration": state.iteration, "data_position": state.data_position,
              "world_size": world, "expert_parallel_size": cfg.moe.expert_parallel_size}
    engine.save_checkpoint(root, tag=tag, client_state=client, save_latest=False)
    torch.save(_rng_state(), os.path.join(folder, f"rng_state_rank{rank}.pt"))
    if rank == 0:
        save_config(cfg, os.path.join(folder, "config.yaml"))
        write_record(cfg.data.path, folder)
    dist.barrier()                              # every rank has written all its files
    files = _gather(_describe_files(folder, _listing(folder)))
    from .engine import expert_rank
    expert_ranks = _gather({rank: expert_rank(engine.module)})
    if rank == 0:
        manifest = {"tag": tag, "iteration": state.iteration, "world_size": world,
                    "expert_parallel_size": cfg.moe.expert_parallel_size,
                    "expert_ranks": [expert_ranks[r] for r in range(world)], "files": files}
        _write_atomic(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1))
        _write_atomic(os.path.join(root, LATEST), tag)
        prune(root, cfg.checkpoint.keep_last)
    dist.barrier()
    return folder


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _file_record(path: str) -> dict:
    """Size and CRC-32 of a file; also flushes it to stable storage."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
        os.fsync(f.fileno())
    return {"bytes": size, "crc32": f"{crc:08x}"}


def _listing(folder: str) -> list[str]:
    """The folder's file names, the same on every rank: rank 0's listing joined with every
    rank's own. On a shared filesystem a node's listing can lag (a file another node wrote a
    moment ago missing from it); each rank sees the files it wrote itself, so no written file
    is left out of the manifest. Collective."""
    return sorted(set().union(*_gather({dist.get_rank(): os.listdir(folder)}).values()))


def _describe_files(folder: str, names: list[str]) -> dict:
    """This rank's share (every world-size-th file) of the folder's records."""
    rank, world = dist.get_rank(), dist.get_world_size()
    return {n: _file_record(os.path.join(folder, n)) for n in names[rank::world]}


def _gather(part: dict) -> dict:
    """Merge every rank's dict (object all-gather)."""
    parts = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def problems(folder: str, share: tuple[int, int] = (0, 1)) -> list[str]:
    """Why a tag folder is not a complete checkpoint ([] when it verifies). `share` =
    (index, count) checks only every count-th file, so ranks can split the reading."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        return [f"{folder} has no {MANIFEST} (its save never finished)"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{os.path.join(folder, MANIFEST)} is unreadable"]
    found = []
    for name in sorted(files)[share[0]::share[1]]:
        path, want = os.path.join(folder, name), files[name]
        if not os.path.isfile(path):
            found.append(f"{path} is missing")
            continue
        size = os.path.getsize(path)
        if size != want["bytes"]:
            found.append(f"{path} has {size} bytes, the manifest says {want['bytes']} (truncated?)")
        elif _file_record(path)["crc32"] != want["crc32"]:
            found.append(f"{path} fails its CRC-32 check (corrupted)")
    return found


def verify(folder: str) -> list[str]:
    """`problems` with the reading split over all ranks; collective when distributed."""
    if not dist.is_initialized():
        return problems(folder)
    parts = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(parts, problems(folder, (dist.get_rank(), dist.get_world_size())))
    return sorted({p for part in parts for p in part})


def tags(root: str) -> list[str]:
    """Checkpoint tag folders under a run's checkpoint directory, newest first."""
    names = os.listdir(root) if os.path.isdir(root) else []
    return sorted((n for n in names if TAG_RE.match(n) and os.path.isdir(os.path.join(root, n))), reverse=True)


def prune(root: str, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` complete checkpoints (0: keep all) and every
    incomplete folder older than the newest complete one; returns what was deleted."""
    complete = [t for t in tags(root) if os.path.isfile(os.path.join(root, t, MANIFEST))]
    if not complete:
        return []
    doomed = complete[keep_last:] if keep_last else []
    doomed += [t for t in tags(root) if t not in complete and t < complete[0]]
    for t in doomed:
        shutil.rmtree(os.path.join(root, t), ignore_errors=True)
    return doomed


def newest_good(root: str, report=print) -> str | None:
    """The newest tag folder under `root` that verifies, reporting each one skipped."""
    for tag in tags(root):
        folder = os.path.join(root, tag)
        found = verify(folder)
        if not found:
            return os.path.abspath(folder)
        report(f"warning: skipping checkpoint {folder}: {found[0]}"
               + (f" (and {len(found) - 1} more problem(s))" if len(found) > 1 else ""))
    return None


def find_resume(cfg: RunConfig, report=print) -> str | None:
    """The tag folder to resume from, following `checkpoint.resume` (auto / never / a path).

    A run folder (auto, or a path to one) resumes from its newest checkpoint that verifies;
    a tag folder given explicitly must verify itself."""
    mode = cfg.checkpoint.resume
    root = cfg.checkpoint_dir if mode in ("auto", "never") else mode
    if mode == "never":
        if tags(root) or os.path.exists(os.path.join(root, LATEST)):
            raise ConfigError(f"checkpoint.resume=never but {root} already holds a run; "
                              "use checkpoint.resume=auto to continue it or another logging.out_dir")
        return None
    if mode != "auto":
        if not os.path.exists(root):
            raise CheckpointError(f"checkpoint.resume: no such checkpoint: {root}")
        if os.path.isfile(os.path.join(root, "universal.json")):    # mose-convert-checkpoint
            if tags(cfg.checkpoint_dir):     # a restarted job continues from what it saved since
                report(f"note: {cfg.checkpoint_dir} already holds this run's checkpoints; "
                       f"resuming from them, not from {root}")
                return newest_good(cfg.checkpoint_dir, report)
            return os.path.abspath(root)
        if os.path.isfile(os.path.join(root, "config.yaml")):
            found = verify(root)
            if found:
                raise CheckpointError(f"checkpoint.resume: {found[0]}")
            return os.path.abspath(root)
        if os.path.isdir(os.path.join(root, "checkpoints")) and not tags(root):
            root = os.path.join(root, "checkpoints")     # a run folder
        if not tags(root):
            raise CheckpointError(f"checkpoint.resume: {root} holds no checkpoint (no iter_* folder)")
    folder = newest_good(root, report)
    if folder is None and any(os.path.exists(os.path.join(root, t, MANIFEST)) for t in tags(root)):
        # Finished checkpoints exist but all are damaged: never silently start over.
        raise CheckpointError(f"no complete checkpoint under {root}: every iter_* folder failed verification")
    if folder is None and tags(root):
        report(f"note: no checkpoint under {root} was ever finished; starting from iteration 0")
    return folder


def check_layout(folder: str, world_size: int, expert_parallel_size: int) -> None:
    """Refuse a checkpoint written by another world size or expert-parallel size: its ZeRO
    shards cannot be read by this job (mose-convert-checkpoint makes one that can)."""
    with open(os.path.join(folder, MANIFEST)) as f:
        saved = json.load(f)
    if (saved["world_size"], saved["expert_parallel_size"]) != (world_size, expert_parallel_size):
        raise CheckpointError(
            f"checkpoint {folder} was written by {saved['world_size']} rank(s) with expert-parallel size "
            f"{saved['expert_parallel_size']}; this job has {world_size} with {expert_parallel_size}. Convert it: "
            f"mose-convert-checkpoint --ckpt {folder} --out <dir>, then resume from <dir>")


def torch_load(path: str) -> dict:
    """A checkpoint file as data (`safe_load`: tensors and known types, never code)."""
    return safe_load.load(path)


def read_model_states(folder: str) -> tuple[dict, dict]:
    """(DeepSpeed's model-states dict, every weight by name) of a tag folder: non-expert
    weights from mp_rank_00_model_states.pt, experts (already under global names) from
    the layer_*_expert_* files."""
    states = torch_load(os.path.join(folder, "mp_rank_00_model_states.pt"))
    weights = dict(states["module"])
    for path in sorted(glob.glob(os.path.join(folder, "layer_*_expert_*_mp_rank_00_model_states.pt"))):
        weights.update(torch_load(path))
    return states, weights


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
    except CheckpointError:   # safe_load's refusal of an unsafe or unreadable file: it names the file
        raise
    except Exception as e:   # DeepSpeed raises many types for a damaged file
        raise CheckpointError(f"checkpoint {folder} could not be loaded: {type(e).__name__}: {e}") from e
    if path is None or client is None:
        raise CheckpointError(f"checkpoint {folder} could not be loaded (missing model states)")
    rng_path = os.path.join(folder, f"rng_state_rank{dist.get_rank()}.pt")
    if os.path.exists(rng_path):
        _set_rng_state(safe_load.load(rng_path))
    return TrainState(iteration=client["iteration"], data_position=client["data_position"])


WEIGHTS_INDEX = "weights.index.json"


def read_weights_index(folder: str) -> dict[str, str]:
    """{tensor name: file} of a weights folder written by mose-convert-hf."""
    index_path = os.path.join(folder, WEIGHTS_INDEX)
    try:
        with open(index_path) as f:
            return dict(json.load(f)["weight_map"])
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint.init_from: {index_path} is missing (not a folder written by "
                              "mose-convert-hf)") from None
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
