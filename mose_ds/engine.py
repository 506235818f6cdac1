"""Where parallelism is applied: process groups, expert groups, optimizer groups, the engine.

The model is single-device code; this module wraps it. Expert-parallel and
expert-data-parallel groups are DeepSpeed's own (created by `MoE.set_deepspeed_parallelism`,
as the engine itself does), expert parameters go into DeepSpeed's MoE optimizer groups,
and the optimizer is torch AdamW with the paper's hyperparameters (appendix A.2). The
DeepSpeed config carries engine concerns only; batch sizes, clipping and the optimizer
come from the run config.
"""

from __future__ import annotations

import atexit
import datetime
import inspect
import os
import socket

import deepspeed
import torch
from deepspeed import comm as dist
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from . import cpu_compat, devices, safe_load
from .config import ConfigError, OptimConfig, RunConfig
from . import model as model_lib
from .model import MoSEGPT, expert_rank  # noqa: F401  (engine.expert_rank: where the training code looks)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORLD_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env() -> dict[str, str]:
    """This process's environment without its process-group variables (`init_distributed`
    sets them for a one-rank world), for a child process that forms its own world."""
    return {k: v for k, v in os.environ.items() if k not in WORLD_VARIABLES}


_DEVICE: torch.device | None = None    # this process's device, decided by its first init_distributed


def init_distributed(timeout_s: int = 600, device: str | torch.device = "auto") -> torch.device:
    """Join the launcher's process group, or make a one-rank world when run without one;
    returns this process's device (`devices.choose(device)`; 'cuda' without an index is
    GPU LOCAL_RANK).

    CPU ranks use gloo and DeepSpeed's CPU accelerator (`cpu_compat`), CUDA ranks NCCL. A
    collective that waits `timeout_s` for a peer (one that died) raises instead of hanging;
    on NCCL that needs async error handling, switched on here unless the user set it.
    megatron's model-parallel state (tensor and pipeline size 1, which its layers read) is
    made without its gloo groups: they would span the whole world over TCP and are unused.
    The first call decides; later calls return its device."""
    global _DEVICE
    if _DEVICE is not None:
        return _DEVICE
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    chosen = devices.choose(device)
    if chosen.type == "cuda":
        if chosen.index is None:
            chosen = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(chosen)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    else:
        cpu_compat.apply()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if chosen.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, timeout=datetime.timedelta(seconds=timeout_s))
        atexit.register(_leave_process_group)
    from megatron.core import parallel_state
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1, create_gloo_process_groups=False)
    _DEVICE = chosen
    return chosen


def _leave_process_group() -> None:
    """At exit, destroy a process group nobody destroyed (an error exit, a tool).

    Gloo worker threads still alive when the interpreter is torn down abort the process
    ("terminate called without an active exception"), turning a clean error exit into SIGABRT.
    A multi-rank NCCL group is left to the launcher: destroying it while a peer waits in a
    collective can hang."""
    import torch.distributed as tdist
    if tdist.is_initialized() and (tdist.get_backend() == "gloo" or tdist.get_world_size() == 1):
        tdist.destroy_process_group()


def device() -> torch.device:
    """The device `init_distributed` chose for this process."""
    if _DEVICE is None:
        raise RuntimeError("engine.device() before engine.init_distributed()")
    return _DEVICE


def check_layout(cfg: RunConfig, world_size: int) -> None:
    ep = cfg.moe.expert_parallel_size
    if world_size % ep:
        raise ConfigError(f"moe.expert_parallel_size={ep} does not divide the world size {world_size}")


def build_model(cfg: RunConfig) -> MoSEGPT:
    """Build, attach DeepSpeed's expert-parallel groups, and initialise (layout-independent)."""
    check_layout(cfg, dist.get_world_size())
    # parameters are allocated where they train, never all on the host first
    return model_lib.build_model(cfg, device(), seed=cfg.train.seed)


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings, not norms; then DeepSpeed's MoE split of expert params
    into groups of at most its size limit, cut only between MoE layers: ZeRO flattens each
    group into one buffer, so a layer's experts lie evenly spaced in one buffer, which the
    grouped kernel reads as stacks without a copy (`grouped.weight_stacks`). DeepSpeed's
    own cut falls wherever the limit does, inside a layer."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    base = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    groups_ = split_params_into_different_moe_groups_for_optimizer(base, max_group_size=None)
    layer_of = {id(p): i for i, layer in enumerate(model.moe_layers()) for p in layer.parameters()}
    return [part for g in groups_
            for part in ([g] if not g.get("moe") else _cut_between_layers(g, layer_of, MOE_GROUP_LIMIT))]


# DeepSpeed's default size limit of an expert parameter group (elements).
MOE_GROUP_LIMIT = inspect.signature(split_params_into_different_moe_groups_for_optimizer).parameters[
    "max_group_size"].default


def _cut_between_layers(group: dict, layer_of: dict[int, int], limit: int) -> list[dict]:
    """`group` as consecutive groups of at most `limit` elements, each holding whole MoE
    layers (a layer larger than `limit` on its own, alone in its group)."""
    per_layer: dict = {}
    for p in group["params"]:                                   # in order, layer by layer
        per_layer.setdefault(layer_of.get(id(p)), []).append(p)
    parts, size = [[]], 0
    for params in per_layer.values():
        numel = sum(p.numel() for p in params)
        if parts[-1] and size + numel > limit:
            parts.append([])
            size = 0
        parts[-1] += params
        size += numel
    return [{**group, "params": ps} for ps in parts if ps]


def lr_at(iteration: int, optim: OptimConfig, max_iters: int) -> float:
    """Linear warmup over `warmup_iters`, then linear decay to `min_lr` at `max_iters`."""
    if iteration < optim.warmup_iters:
        return optim.lr * (iteration + 1) / (optim.warmup_iters + 1)
    span = max(1, max_iters - optim.warmup_iters)
    progress = min(1.0, (iteration - optim.warmup_iters) / span)
    return optim.lr + progress * (optim.min_lr - optim.lr)


def micro_steps_per_batch(cfg: RunConfig) -> int:
    """DeepSpeed micro-steps per micro-batch: two when the width branches back-propagate
    separately (`mose.two_pass: sequential`), so the engine's 1/gas scaling averages them."""
    return 2 if cfg.mose.enabled and cfg.mose.two_pass == "sequential" else 1


def accumulation(cfg: RunConfig) -> int:
    """Micro-batches per optimizer step on this job's ranks (`train.geometry`)."""
    return cfg.train.geometry(dist.get_world_size() if dist.is_initialized() else 1).accum


def deepspeed_config(cfg: RunConfig) -> dict:
    e = cfg.engine
    zero = {"stage": e.zero_stage, "overlap_comm": e.overlap_comm,
            "reduce_bucket_size": e.reduce_bucket_size, "allgather_bucket_size": e.allgather_bucket_size}
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accumulation(cfg) * micro_steps_per_batch(cfg),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": e.precision == "bf16"},
        # accumulate micro-batch gradients in fp32 even when the model runs in bf16, and
        # reduce them across ranks in fp32 too (DeepSpeed's default is the model dtype)
        "data_types": {"grad_accum_dtype": "fp32"},
        "communication_data_type": e.grad_comm_dtype,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        **e.extra,
    }


class SkippableAdamW(torch.optim.AdamW):
    """torch AdamW whose next `step` calls do nothing while `skip` is set.

    The training loop sets it for an iteration with a non-finite loss: under every ZeRO stage
    DeepSpeed then runs its usual boundary (gradient reduction, lr schedule, counters) while
    weights and Adam moments stay exactly as they were."""

    skip = False

    @torch.no_grad()
    def step(self, closure=None):
        if self.skip:
            return None
        return super().step(closure)


def base_optimizer(engine) -> SkippableAdamW:
    """Our AdamW inside whatever DeepSpeed wrapped it in (ZeRO, bf16 or none)."""
    opt = engine.optimizer
    while not isinstance(opt, SkippableAdamW):
        opt = opt.optimizer
    return opt


def create_engine(cfg: RunConfig, model: MoSEGPT):
    """DeepSpeed engine with torch AdamW (its fused kernel on CUDA: one launch per group
    instead of a dozen per tensor) and the warmup/linear-decay schedule, reading checkpoints
    through `safe_load`."""
    o = cfg.optim
    fused = next(model.parameters()).device.type == "cuda"
    optimizer = SkippableAdamW(optimizer_groups(model, o.weight_decay), lr=o.lr,
                               betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_at(it, o, cfg.train.max_iters) / o.lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           config=deepspeed_config(cfg))
    read_checkpoints_safely(engine)
    return engine


def read_checkpoints_safely(engine) -> None:
    """Make `engine.load_checkpoint` read every file through `safe_load` (data, never code).

    DeepSpeed reads each file of a ZeRO-0/1/2 checkpoint through its engine's checkpoint
    engine (`checkpoint_engine.load`, torch.load with weights_only=False): the model states,
    the expert files (`load_moe_state_dict` is handed the same checkpoint engine), the
    optimizer states of a run without ZeRO and the ZeRO / bf16 optimizer shards. It calls
    torch.load directly only when loading its own universal checkpoints and under ZeRO-3;
    the config refuses ZeRO-3, and DeepSpeed's universal loading is refused here (ours is
    mose_ds.universal, safetensors)."""
    if engine.load_universal_checkpoint():
        raise ConfigError("engine.extra.checkpoint.load_universal: DeepSpeed's universal loader unpickles "
                          "files unsafely; resume from a mose-convert-checkpoint folder instead")
    engine.checkpoint_engine.load = safe_load.load
