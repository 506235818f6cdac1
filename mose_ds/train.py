"""Training entry point: the two-pass multi-width objective under the DeepSpeed engine.

    deepspeed --num_gpus N -m mose_ds.train --config ds_configs/<recipe>.yaml [key=value ...]
    python -m mose_ds.train --config ds_configs/<recipe>.yaml [key=value ...]   # one process

Each step runs every micro-batch at full width and at one width w sampled uniformly from
the grid A (seeded by the global step, so identical on every rank); the loss is the mean
of the two branch losses, each being LM loss plus that branch's auxiliary routing losses
(paper eq. 6). `mose.enabled: false` trains plain MoE at full width (the baseline).
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings

import torch
from deepspeed import comm as dist

from . import checkpoint, devices, engine as engine_lib, heartbeat, preempt, universal
from .preempt import EXIT_PREEMPTED, Preempted, StopRequest
from .checkpoint import CheckpointError, TrainState
from .config import ConfigError, RunConfig, load_config, save_config
from .data import TokenSplit, device_batches, val_batch_count, val_batches
from .commands.train import parse_args
from .launch import LaunchError, check_not_bare_srun
from .model import lm_loss
from .monitor import Monitor, routing_scalars
from .widths import FULL_WIDTH, UniformPolicy, sample_width


def branch_loss(engine, x_BS, y_BS, policy):
    """One forward at one width policy: (LM + aux loss, LM loss, routing infos)."""
    logits_BSV, routing = engine(x_BS, policy)
    lm = lm_loss(logits_BSV, y_BS)
    aux = sum((r.aux_loss for r in routing), torch.zeros((), device=lm.device))
    return lm + aux, lm, routing


class TrainingHalted(RuntimeError):
    """Training cannot go on (for example a run of non-finite losses); the message says why
    and where the last good state is."""


class RankAgreement:
    """What the ranks agree on at the end of an iteration, in one all-reduce and one read:
    whether any rank saw a non-finite loss (the optimizer skips the update) and whether any
    rank was asked to stop (preempt.py; `stop` then stays set).

    Each micro-step adds its loss's non-finiteness to a device flag (no host read)."""

    def __init__(self, device: torch.device, stop_request: StopRequest | None = None):
        self.bad = torch.zeros(1, dtype=torch.float32, device=device)   # NCCL reduces device tensors
        self.stop_request = stop_request
        self.stop = False

    def add(self, loss: torch.Tensor) -> None:
        self.bad += (~torch.isfinite(loss.detach())).to(torch.float32)

    def decide(self) -> bool:
        """True if any rank saw a non-finite loss since the last decision (collective)."""
        asked = self.stop_request is not None and self.stop_request.requested
        flags = torch.cat([self.bad, self.bad.new_full((1,), float(asked))])    # a fill, no host copy
        dist.all_reduce(flags)
        skip, stop = (value > 0 for value in flags.tolist())
        self.stop = self.stop or stop
        self.bad.zero_()
        return skip


def backward_and_step(engine, loss: torch.Tensor, check: RankAgreement) -> bool | None:
    """One DeepSpeed micro-step; at the accumulation boundary, returns whether the
    iteration's update is skipped (None before it).

    A non-finite loss back-propagates as zero (no NaN reaches the gradients) and marks the
    iteration: at its accumulation boundary the optimizer leaves weights and moments as they
    were, while DeepSpeed's own bookkeeping (reduction, schedule, counters) runs as usual."""
    check.add(loss)
    engine.backward(torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0))
    skipped = None
    if engine.is_gradient_accumulation_boundary():
        skipped = check.decide()
        engine_lib.base_optimizer(engine).skip = skipped
    engine.step()
    return skipped


def train_micro_batch(engine, cfg: RunConfig, x_BS, y_BS, width: float | None,
                      check: RankAgreement | None = None) -> tuple[dict, bool | None]:
    """Forward/backward of one micro-batch: full width, plus the sampled width if MoSE.
    Returns {branch: (LM loss, routing stats)}, device values read only when logged, and
    whether the iteration's update is skipped (at its last micro-batch; else None).
    `check` carries finiteness across an iteration's micro-batches (a new one by default)."""
    check = check or RankAgreement(engine.device)
    branches = [("full", FULL_WIDTH)]
    if width is not None:
        branches.append(("width", UniformPolicy(width)))
    if cfg.mose.two_pass == "sequential" and width is not None:
        # Two DeepSpeed micro-steps on the same batch; the engine's 1/gas scaling
        # (gas doubled in engine.deepspeed_config) makes their sum the branch mean.
        results = []
        for _, policy in branches:
            loss, lm, routing = branch_loss(engine, x_BS, y_BS, policy)
            skipped = backward_and_step(engine, loss, check)
            results.append((lm, routing))
    else:
        outs = [branch_loss(engine, x_BS, y_BS, policy) for _, policy in branches]
        skipped = backward_and_step(engine, sum(o[0] for o in outs) / len(outs), check)
        results = [(lm, routing) for _, lm, routing in outs]
    stats = {name: (lm.detach(), [r.stats for r in routing]) for (name, _), (lm, routing) in zip(branches, results)}
    return stats, skipped


def read_losses(entries: list[dict]) -> None:
    """Replace the device losses in history entries by floats, in one host read."""
    slots = [(entry, key) for entry in entries for key, value in entry.items() if isinstance(value, torch.Tensor)]
    if slots:
        for (entry, key), value in zip(slots, torch.stack([e[k].float() for e, k in slots]).tolist()):
            entry[key] = value
    entries.clear()


@torch.no_grad()
def evaluate(engine, cfg: RunConfig, split: TokenSplit) -> dict[float, float]:
    """Validation perplexity at each `mose.eval_widths` (uniform width), averaged over ranks."""
    engine.eval()
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for width in cfg.mose.eval_widths:
        total = torch.zeros(2, dtype=torch.float64, device=engine.device)   # NCCL reduces device tensors
        for x, y in val_batches(split, cfg.train.eval_batches, rank, world, cfg.train.micro_batch_size):
            logits, _ = engine(x.to(engine.device), UniformPolicy(width))
            total[0] += lm_loss(logits, y.to(engine.device)).double()
            total[1] += 1
        dist.all_reduce(total)
        out[width] = math.exp(total[0].item() / total[1].item())
    engine.train()
    return out


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def train(cfg: RunConfig, quiet: bool = False, stop: StopRequest | None = None) -> dict:
    """Run (or resume) training to `train.max_iters`; returns losses and the last validation.
    `stop`: the request that, once any rank sees it, ends the run early with a checkpoint
    (raising Preempted); the command line installs its signal handlers."""
    wanted = devices.training_device(cfg.engine.device, cfg.engine.precision)
    device = engine_lib.init_distributed(cfg.engine.comm_timeout_s, wanted)
    if device.type != wanted.type:
        raise devices.DeviceError(f"engine.device: this process already runs on {device.type}, not {wanted.type}")
    rank, world = dist.get_rank(), dist.get_world_size()
    say = (lambda *a: None) if quiet or rank else (lambda *a: print(*a, flush=True))
    warn = (lambda *a: None) if rank else (lambda *a: print(*a, file=sys.stderr, flush=True))
    engine_lib.check_layout(cfg, world)
    geometry = cfg.train.geometry(world)
    # Everything that can be refused is checked before anything is written.
    train_split = TokenSplit(cfg.data.path, "train", cfg.model.seq_len, cfg.model.vocab_size)
    val_split = TokenSplit(cfg.data.path, "val", cfg.model.seq_len, cfg.model.vocab_size)
    val_batch_count(val_split, cfg.train.eval_batches, world, cfg.train.micro_batch_size)
    resume = checkpoint.find_resume(cfg, report=warn)
    relayout = bool(resume) and universal.is_universal(resume)
    if resume:
        checkpoint.check_architecture(cfg, resume)
        if not relayout:
            checkpoint.check_layout(resume, world, cfg.moe.expert_parallel_size)
    elif cfg.checkpoint.init_from:
        checkpoint.check_architecture(cfg, cfg.checkpoint.init_from)

    heartbeat.start(cfg.engine.heartbeat_timeout_s)       # multi-node: a lost node is named
    torch.manual_seed(cfg.train.seed + rank)
    model = engine_lib.build_model(cfg)
    if not resume and cfg.checkpoint.init_from:
        count = checkpoint.load_weights(model, cfg.checkpoint.init_from, engine_lib.expert_rank(model))
        say(f"initialised {count} tensors from {cfg.checkpoint.init_from} (a new run: iteration 0, fresh optimizer)")
    engine = engine_lib.create_engine(cfg, model)
    if relayout:
        state = resume_universal(engine, cfg, resume, say, warn)
    else:
        state = checkpoint.load(engine, resume) if resume else TrainState()
    if resume:
        say(f"resumed from {resume} at iteration {state.iteration}"
            + (" (checkpoint.init_from is not read when resuming)" if cfg.checkpoint.init_from else ""))
    info = run_environment(engine, cfg)
    say(devices.banner(info))
    if rank == 0:
        save_config(cfg, os.path.join(cfg.logging.out_dir, "config.yaml"))
        devices.record(info, cfg.logging.out_dir)
    monitor = Monitor(cfg.logging.out_dir, cfg.logging.tensorboard and rank == 0, cfg.mose.eval_widths)

    t, mb, ga, global_batch = cfg.train, geometry.micro, geometry.accum, geometry.global_batch
    tokens_per_iter = global_batch * cfg.model.seq_len
    grid = cfg.mose.grid
    history, val, rate = [], {}, None
    say(f"training {cfg.model.name}: {t.max_iters} iterations of {global_batch} x {cfg.model.seq_len} tokens "
        f"on {world} rank(s), mode={'MoSE two-pass' if cfg.mose.enabled else 'MoE full width'}, "
        f"ZeRO-{cfg.engine.zero_stage}, {cfg.engine.precision}, EP={cfg.moe.expert_parallel_size}")
    say(f"batch: {geometry} sequences of {cfg.model.seq_len} tokens")
    val_start = {}
    if not resume and cfg.checkpoint.init_from:    # where continual pre-training starts from
        val_start = evaluate(engine, cfg, val_split)
        monitor.validation(val_start, 0)
        say("val ppl at start | " + " | ".join(f"w={w:.2f}: {p:.2f}" for w, p in val_start.items()))
    start = last = time.time()
    first_iter = last_iter = state.iteration
    end = min(t.max_iters, t.stop_at) if t.stop_at else t.max_iters
    skipped_in_a_row = skipped_total = 0
    stop = stop or StopRequest()
    check, unread = RankAgreement(engine.device, stop), []     # losses stay on the device until logged
    saved = None                                             # the iteration last checkpointed
    batches = device_batches(train_split, t.seed, state.data_position, rank, world, mb, ga, engine.device)
    while state.iteration < end:
        stop.iteration = state.iteration + 1
        width = sample_width(grid, state.iteration, t.seed) if cfg.mose.enabled else None
        lr = engine.get_lr()[0]
        sums = {"loss_full": 0.0, "loss_width": 0.0}
        for _ in range(ga):
            x, y = next(batches)
            result, skipping = train_micro_batch(engine, cfg, x, y, width, check)
            for name, (loss, _) in result.items():
                sums[f"loss_{name}"] = sums[f"loss_{name}"] + loss / ga
        state.iteration += 1
        state.data_position += global_batch
        history.append({"iteration": state.iteration, "width": width, "skipped": skipping, **sums})
        unread.append(history[-1])
        skipped_in_a_row = skipped_in_a_row + 1 if skipping else 0
        skipped_total += skipping
        if skipping:
            monitor.scalars({"train/skipped_iterations": skipped_total}, state.iteration)
            warn(f"warning: iteration {state.iteration}: non-finite loss, update skipped "
                 f"({skipped_in_a_row} in a row, {skipped_total} in this job)")
            if skipped_in_a_row >= t.max_nonfinite_in_a_row:
                monitor.close()
                raise TrainingHalted(halt_message(engine, cfg, state, skipped_in_a_row))

        if state.iteration % t.log_interval == 0 or state.iteration == end:
            read_losses(unread)
            sums = {k: history[-1][k] for k in sums}
            now = time.time()
            rate = tokens_per_iter * (state.iteration - last_iter) / max(now - last, 1e-9)
            last, last_iter = now, state.iteration
            done = state.iteration - first_iter
            eta = (now - start) / done * (end - state.iteration)
            gnorm = engine.get_global_grad_norm()
            scalars = {"train/loss_full": sums["loss_full"], "train/lr": lr, "train/tokens_per_s": rate}
            if gnorm is not None:   # DeepSpeed reports it under ZeRO-1/2 and bf16, not ZeRO-0 fp32
                scalars["train/grad_norm"] = float(gnorm)
            text = f"loss {sums['loss_full']:.4f} (w=1.00)"
            if width is not None:
                scalars.update({"train/loss_width": sums["loss_width"], "train/width": width})
                text += f" {sums['loss_width']:.4f} (w={width:.2f})"
            for name, (_, stats) in result.items():
                scalars.update(routing_scalars(name, stats))
            monitor.scalars(scalars, state.iteration)
            norm = f"gnorm {float(gnorm):.3f} | " if gnorm is not None else ""
            say(f"iter {state.iteration}/{t.max_iters} | {text} | lr {lr:.2e} | {norm}"
                f"{rate:,.0f} tok/s | eta {_fmt_time(eta)}")

        if state.iteration % t.eval_interval == 0 or state.iteration == t.max_iters:
            val = evaluate(engine, cfg, val_split)
            monitor.validation(val, state.iteration)
            say("val ppl | " + " | ".join(f"w={w:.2f}: {p:.2f}" for w, p in val.items()))
            last, last_iter = time.time(), state.iteration   # tokens/s counts training only

        if state.iteration % cfg.checkpoint.interval == 0 or (
                state.iteration == end and (cfg.checkpoint.save_final or end < t.max_iters)):
            folder = checkpoint.save(engine, cfg, state)
            say(f"checkpoint -> {folder}")
            last, last_iter, saved = time.time(), state.iteration, folder

        if check.stop and state.iteration < end:
            monitor.close()
            raise Preempted(state.iteration, stop_checkpoint(engine, cfg, state, stop, saved), stop.name)

    if not val and state.iteration == t.max_iters:   # resumed a finished run: report where it stands
        val = evaluate(engine, cfg, val_split)
    monitor.close()
    summary = {"history": history, "val": val, "val_start": val_start, "state": state, "engine": engine,
               "tokens_per_s": rate}    # over the last logging interval
    if rank == 0 and not quiet:
        print_summary(cfg, val, monitor.path, val_start)
    return summary


def stop_checkpoint(engine, cfg: RunConfig, state: TrainState, stop: StopRequest, saved: str | None) -> str:
    """The checkpoint of the iteration the ranks stopped after, written (unless the iteration
    just wrote it) and verified; a signal meanwhile does not interrupt it. Collective."""
    stop.saving = True
    folder = saved if saved and saved.endswith(checkpoint.tag_for(state.iteration)) \
        else checkpoint.save(engine, cfg, state)
    found = checkpoint.verify(folder)
    if found:
        raise CheckpointError(f"the stop checkpoint {folder} does not verify: {found[0]}")
    return folder


def run_environment(engine, cfg: RunConfig) -> dict:
    """The environment banner of a run: versions, device, and the kernels this model takes."""
    from .attention import backend_name
    device, m = engine.device, cfg.model
    dtype = torch.bfloat16 if cfg.engine.precision == "bf16" else torch.float32
    head_dim = m.hf["qk_nope_head_dim"] + m.hf["qk_rope_head_dim"] if m.family == "deepseek_v2" \
        else m.hidden_size // m.num_heads
    chosen = {"attention": backend_name(device, dtype, m.num_heads, head_dim, m.seq_len)}
    layers = engine.module.moe_layers()
    if layers:
        probe = torch.empty(0, m.hidden_size, device=device, dtype=dtype)
        chosen["expert_kernel"] = type(layers[0].expert_kernel(probe, relaxed=False)).__name__
    return devices.environment(device, **chosen, precision=cfg.engine.precision,
                               grad_comm_dtype=cfg.engine.grad_comm_dtype, world=str(dist.get_world_size()))


def resume_universal(engine, cfg: RunConfig, folder: str, say, warn) -> TrainState:
    """Continue from a layout-free checkpoint (mose-convert-checkpoint) in this job's
    layout, and save it at once as this layout's own checkpoint."""
    state, carried = universal.load(engine, folder, engine_lib.expert_rank(engine.module))
    if not carried:
        warn(f"WARNING: {folder} carries no optimizer state (its run did not use ZeRO): Adam moments "
             "restart from zero at this iteration; expect a few hundred iterations of re-warming")
    # Per-rank random streams cannot be mapped onto another world size: reseed them.
    torch.manual_seed(cfg.train.seed + dist.get_rank() + 1_000_003 * state.iteration)
    folder = checkpoint.save(engine, cfg, state)
    say(f"re-laid out {os.path.basename(folder)} for {dist.get_world_size()} rank(s), "
        f"EP={cfg.moe.expert_parallel_size}: {folder}")
    return state


def halt_message(engine, cfg: RunConfig, state: TrainState, in_a_row: int) -> str:
    """Save the last good state when the weights are still finite (skipped iterations leave
    them untouched) and say where it is; collective."""
    first = state.iteration - in_a_row + 1
    why = (f"training stopped at iteration {state.iteration}: the loss was not finite in {in_a_row} iterations "
           f"in a row ({first}..{state.iteration}, train.max_nonfinite_in_a_row={cfg.train.max_nonfinite_in_a_row})")
    bad = torch.zeros(1, device=engine.device)
    for param in engine.module.parameters():
        bad += (~torch.isfinite(param.detach())).any().float()
    dist.all_reduce(bad)
    if bad.item() == 0:
        folder = checkpoint.save(engine, cfg, state)
        return (f"{why}; the weights are those after iteration {first - 1} and were saved to {folder} "
                f"(resuming continues with iteration {state.iteration + 1}, past these batches)")
    good = checkpoint.newest_good(cfg.checkpoint_dir, report=lambda *a: None)
    return f"{why}; the weights are not finite; last good checkpoint: {good or 'none yet'}"


def print_summary(cfg: RunConfig, val: dict[float, float], tb_path: str,
                  val_start: dict[float, float] | None = None) -> None:
    if not val:
        print("\nno validation yet (stopped before the first eval_interval)")
    elif val_start:     # continual pre-training: where each width started and where it is now
        print("\n  width | val loss at start | val loss |  change\n  ------+-------------------+----------+--------")
        for w, p in val.items():
            before, after = math.log(val_start[w]), math.log(p)
            print(f"  {w:5.2f} | {before:17.4f} | {after:8.4f} | {100 * (after / before - 1):+6.2f}%")
    else:
        print("\n  width | val ppl\n  ------+--------")
        for w, p in val.items():
            print(f"  {w:5.2f} | {p:8.2f}")
    print(f"\nTensorBoard logs: {os.path.abspath(tb_path)}   (tensorboard --logdir {tb_path})")
    print(f"Checkpoints:      {os.path.abspath(cfg.checkpoint_dir)}")
    print(f"Resolved config:  {os.path.abspath(os.path.join(cfg.logging.out_dir, 'config.yaml'))}")


def quiet_libraries() -> None:
    """Silence import-time and per-layer chatter from megatron and DeepSpeed."""
    import logging
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("megatron", "megatron.core", "megatron.core.transformer.transformer_layer"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from deepspeed.utils import logger as ds_logger
    ds_logger.setLevel(logging.WARNING)


def stop_request() -> StopRequest:
    return StopRequest(say=lambda *a: print(*a, file=sys.stderr, flush=True)).install()


def main(argv=None) -> int:
    """The command line, called in a process that goes on: its signal handlers are put back."""
    stop = stop_request()
    try:
        return run(argv, stop)
    finally:
        stop.uninstall()


def run(argv, stop: StopRequest) -> int:
    args = parse_args(argv)
    quiet_libraries()
    try:
        check_not_bare_srun(os.environ)      # srun without the launcher: one world per task
        cfg = load_config(args.config, args.overrides)
        train(cfg, stop=stop)
    except (ConfigError, CheckpointError, devices.DeviceError, LaunchError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        heartbeat.stop()
        return 2   # no barrier: another rank may be inside a collective
    except Preempted as e:        # every rank agreed to stop and the checkpoint verified
        if dist.get_rank() == 0:
            print(f"stopped: {e}", file=sys.stderr, flush=True)
            preempt.mark_stopped(e.folder)
        heartbeat.stop()
        dist.barrier()
        dist.destroy_process_group()
        return EXIT_PREEMPTED
    except TrainingHalted as e:   # every rank agreed to stop: leave the process group cleanly
        if dist.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        heartbeat.stop()
        dist.barrier()
        dist.destroy_process_group()
        return 3
    except RuntimeError:          # a collective that failed because a node went: name the node
        heartbeat.settle()
        raise
    if dist.is_initialized():
        heartbeat.stop()
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":      # the handlers stay to the end: a late signal must not kill the exit
    sys.exit(run(None, stop_request()))
