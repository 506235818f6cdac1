"""Start a training job on one node, on the nodes of a hostfile, or on a SLURM allocation.

    python -m mose_ds.launch [--nproc N] [--dry-run] -- --config R [key=value ...]       # one node
    python -m mose_ds.launch --hostfile H [--master-addr A] -- --config R ...              # deepspeed + pdsh
    python -m mose_ds.launch --slurm -- --config R ...                                     # inside sbatch

Every node runs DeepSpeed's per-node launcher (`deepspeed.launcher.launch`), which starts one
process per GPU (or `--nproc` CPU ranks) and kills the node's other ranks when one fails.
Each rank runs under `mose_ds.guard`, which names a rank that died. Ranks started on GPU slots
(a hostfile, a SLURM allocation with GPUs, one rank per GPU of this machine) train with
`engine.device=cuda` unless the arguments or the recipe name a device. With a hostfile the
`deepspeed` runner reaches the nodes over pdsh; under SLURM the hostfile and master address are
derived from the allocation and `srun` starts the per-node launcher on each node. `--dry-run`
prints, per node, the exact command and starts nothing.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shlex
import subprocess
import sys

import yaml

from . import devices

# Environment variables forwarded to every node (as DeepSpeed's runner forwards them).
FORWARD_PREFIXES = ("NCCL_", "UCX_", "FI_", "TORCH_NCCL_", "PYTHONPATH", "OMP_NUM_THREADS", "CUDA_DEVICE_MAX")
DEFAULT_PORT = 29500


class LaunchError(ValueError):
    """A bad hostfile, allocation or argument; the message names it."""


def parse_hostfile(path: str) -> list[tuple[str, int]]:
    """[(host, slots)] from DeepSpeed's hostfile format (`host slots=N`, `#` comments)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        raise LaunchError(f"hostfile not found or unreadable: {path}") from None
    hosts = []
    for number, line in enumerate(lines, 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not match or int(match.group(2)) < 1:
            raise LaunchError(f"{path}:{number}: expected 'hostname slots=N' (N >= 1), got {line!r}")
        if match.group(1) in dict(hosts):
            raise LaunchError(f"{path}:{number}: host {match.group(1)} is listed twice")
        hosts.append((match.group(1), int(match.group(2))))
    if not hosts:
        raise LaunchError(f"{path}: no hosts")
    return hosts


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact node list (`gpu[01-03,07],login1`) as host names, in order."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise LaunchError(f"SLURM node list {nodelist!r}: cannot read range {part!r}")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}")
    if not hosts:
        raise LaunchError(f"SLURM node list {nodelist!r} names no host")
    return hosts


def slurm_hosts(env: dict, nproc: int | None) -> list[tuple[str, int]]:
    """[(host, slots)] of the current allocation: every node, GPUs per node from SLURM
    (`SLURM_GPUS_ON_NODE`, `SLURM_GPUS_PER_NODE`) unless `--nproc` says otherwise."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("--slurm: SLURM_JOB_NODELIST is not set (run inside an sbatch/salloc allocation)")
    slots = nproc
    if slots is None:
        gpus = env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE", "")
        match = re.search(r"(\d+)\s*$", gpus)
        if not match:
            raise LaunchError("--slurm: the allocation states no GPUs per node (SLURM_GPUS_ON_NODE); "
                              "request --gpus-per-node or pass --nproc")
        slots = int(match.group(1))
    return [(host, slots) for host in expand_nodelist(nodelist)]


def world_info(hosts: list[tuple[str, int]]) -> str:
    """The base64 {host: [slot ids]} that DeepSpeed's per-node launcher reads."""
    info = {host: list(range(slots)) for host, slots in hosts}
    return base64.urlsafe_b64encode(json.dumps(info).encode()).decode()


def forwarded_env(env: dict) -> dict:
    return {k: v for k, v in sorted(env.items()) if k.startswith(FORWARD_PREFIXES)}


def node_command(hosts, node_rank: int, master_addr: str, master_port: int, train_args: list[str],
                 python: str = sys.executable) -> list[str]:
    """The per-node launcher command for node `node_rank`."""
    return [python, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info(hosts)}",
            f"--node_rank={node_rank}", f"--master_addr={master_addr}", f"--master_port={master_port}",
            "--no_local_rank", "--module", "mose_ds.guard", "mose_ds.train", *train_args]


def shell_line(cmd: list[str], env: dict, cwd: str) -> str:
    """`cmd` as one shell line that sets `env` and `cwd` first (what a remote node runs)."""
    exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in env.items())
    return f"{exports}cd {shlex.quote(cwd)}; {shlex.join(cmd)}"


def local_slots(nproc: int | None) -> int:
    if nproc is not None:
        return nproc
    import torch
    return torch.cuda.device_count() or 1


def recipe_device(train_args: list[str]) -> str | None:
    """`engine.device` as the training arguments or their recipe set it (None: not set, or
    the recipe cannot be read here, which the trainer reports)."""
    for arg in train_args:
        if arg.startswith("engine.device="):
            return arg.split("=", 1)[1]
    i = next(i for i, a in enumerate(train_args) if a == "--config" or a.startswith("--config="))
    path = train_args[i].split("=", 1)[1] if "=" in train_args[i] else (train_args[i + 1:i + 2] or [""])[0]
    try:
        with open(path) as f:
            engine = (yaml.safe_load(f) or {}).get("engine") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return engine.get("device") if isinstance(engine, dict) else None


def on_gpus(train_args: list[str]) -> list[str]:
    """The training arguments of ranks started on GPU slots: `engine.device=cuda` added
    unless the arguments or the recipe name one (cpu or cuda), so a node whose torch cannot use its
    GPUs refuses to start, naming why, instead of training on CPU ranks."""
    return train_args if recipe_device(train_args) in ("cpu", "cuda") else [*train_args, "engine.device=cuda"]


def plan(args, env: dict) -> tuple[list[tuple[str, int]], str, list[list[str]], list[str] | None]:
    """(hosts, master address, per-node commands, the one command this process runs)."""
    cwd = os.getcwd()
    import torch
    slurm_gpus = bool(env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE"))
    # one rank per GPU: GPUs torch sees, or GPUs the machine shows that torch cannot use
    local_gpus = args.nproc is None and (torch.cuda.device_count() > 0 or devices.device_files() > 0)
    if args.hostfile or (slurm_gpus if args.slurm else local_gpus):      # ranks on GPU slots
        args.train_args = on_gpus(args.train_args)
    if args.hostfile:
        hosts = parse_hostfile(args.hostfile)
        master = args.master_addr or hosts[0][0]
        nodes = [node_command(hosts, i, master, args.master_port, args.train_args) for i in range(len(hosts))]
        runner = ["deepspeed", f"--hostfile={args.hostfile}", f"--master_addr={master}",
                  f"--master_port={args.master_port}", "--no_local_rank", "--module", "mose_ds.guard",
                  "mose_ds.train", *args.train_args]
        return hosts, master, nodes, runner
    if args.slurm:
        hosts = slurm_hosts(env, args.nproc)
        master = args.master_addr or hosts[0][0]
        nodes = [node_command(hosts, i, master, args.master_port, args.train_args) for i in range(len(hosts))]
        # srun starts one task per node; each picks its own line by SLURM_NODEID.
        per_node = shell_line(node_command(hosts, 0, master, args.master_port, args.train_args),
                              forwarded_env(env), cwd).replace("--node_rank=0", "--node_rank=$SLURM_NODEID")
        runner = ["srun", f"--nodes={len(hosts)}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                  "bash", "-c", per_node]
        return hosts, master, nodes, runner
    hosts = [("localhost", local_slots(args.nproc))]
    master = args.master_addr or "127.0.0.1"
    nodes = [node_command(hosts, 0, master, args.master_port, args.train_args)]
    return hosts, master, nodes, nodes[0]


def write_hostfile(hosts: list[tuple[str, int]], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.writelines(f"{host} slots={slots}\n" for host, slots in hosts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="launchers/train.sh", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--hostfile", help="multi-node: DeepSpeed hostfile ('host slots=N' per line)")
    where.add_argument("--slurm", action="store_true", help="inside a SLURM allocation (sbatch/salloc)")
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks per node (default: the node's GPUs, or 1 CPU rank without GPU)")
    p.add_argument("--master-addr", default=None, help="rendezvous host (default: the first node)")
    p.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", DEFAULT_PORT)))
    p.add_argument("--hostfile-out", default=None,
                   help="--slurm: where to write the derived hostfile (default: hostfile.<job id>)")
    p.add_argument("--dry-run", action="store_true", help="print each node's command; start nothing")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then mose_ds.train arguments")
    args = p.parse_args(argv)
    if args.train_args[:1] == ["--"]:
        args.train_args = args.train_args[1:]
    if "--config" not in args.train_args and not any(a.startswith("--config=") for a in args.train_args):
        p.error("give the training arguments after --, e.g. -- --config ds_configs/tiny_cpu.yaml")
    if args.nproc is not None and args.nproc < 1:
        p.error(f"--nproc={args.nproc} must be >= 1")
    return args


def main(argv=None, env=None) -> int:
    args = parse_args(argv)
    env = dict(os.environ if env is None else env)
    try:
        hosts, master, nodes, runner = plan(args, env)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    world = sum(slots for _, slots in hosts)
    print(f"launch: {len(hosts)} node(s), {world} rank(s), master {master}:{args.master_port}", flush=True)
    if args.slurm:
        path = args.hostfile_out or f"hostfile.{env.get('SLURM_JOB_ID', 'slurm')}"
        write_hostfile(hosts, path)
        print(f"launch: hostfile derived from the allocation -> {path}", flush=True)
    if args.dry_run:
        forwarded = forwarded_env(env)
        for i, ((host, slots), cmd) in enumerate(zip(hosts, nodes)):
            print(f"[node {i}: {host}, {slots} rank(s)] {shell_line(cmd, forwarded, os.getcwd())}")
        if runner is not nodes[0]:
            print(f"[started by] {shlex.join(runner)}")
        return 0
    return subprocess.call(runner)


if __name__ == "__main__":
    sys.exit(main())
