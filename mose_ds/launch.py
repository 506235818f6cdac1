"""Start a training job on one node, on the nodes of a hostfile, or on a SLURM allocation.

    python -m mose_ds.launch [--nproc N] [--dry-run] -- --config R [key=value ...]       # one node
    python -m mose_ds.launch --hostfile H [--master-addr A] -- --config R ...              # deepspeed + pdsh (ssh)
    python -m mose_ds.launch --hostfile H --node-rank I --no-ssh [--master-addr A] -- --config R ...
                                                                  # on each node I of H by hand: no ssh
    python -m mose_ds.launch --slurm -- --config R ...                                     # inside sbatch/salloc

Every node runs DeepSpeed's per-node launcher (`deepspeed.launcher.launch`), which starts one
process per GPU (or `--nproc` CPU ranks) and kills the node's other ranks when one fails.
Each rank runs under `mose_ds.guard`, which names a rank that died. Ranks started on GPU slots
(a hostfile, a SLURM allocation with GPUs, one rank per GPU of this machine) train with
`engine.device=cuda` unless the arguments or the recipe name a device.

- Hostfile: DeepSpeed's `deepspeed` runner reaches the nodes over pdsh. By itself it exports
  only variables named MLFLOW*, PYTHON*, MV2*, UCX* (NCCL* when this machine's accelerator is
  CUDA) and the lines of one env file. The launcher writes the other variables it forwards
  (FORWARD_PREFIXES), and the lines of a `.deepspeed_env` the user keeps in ~ or here, to
  `runs/launch/deepspeed_env.<time>.<pid>` and names that file in `DS_ENV_FILE`. Values the
  runner cannot pass intact are refused, naming the variable.
- Hostfile with `--no-ssh --node-rank I`: the same command, run on every node with its own I,
  makes one job; DeepSpeed's runner starts node I's ranks on this machine. Nothing is
  forwarded: each node uses its own environment.
- SLURM: the hostfile and master address come from the allocation (`scontrol show hostnames`,
  or `expand_nodelist` without scontrol) and one `srun` task per node starts the per-node
  launcher, which places the ranks (`--cpu-bind=none`); that task ignores SIGUSR1.

`--dry-run` prints, per node, exactly what it runs (with the environment it receives) and
starts nothing. `check_not_bare_srun` stops a trainer that srun started without the launcher.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import yaml

from . import preempt

# Environment variables forwarded to every node.
FORWARD_PREFIXES = ("NCCL_", "UCX_", "FI_", "TORCH_NCCL_", "GLOO_", "PYTHONPATH", "OMP_NUM_THREADS",
                    "CUDA_DEVICE_MAX")
# What a value cannot contain on its way to a node through DeepSpeed's pdsh runner: the runner
# puts values in double quotes without escaping (so " $ ` \ act in the remote shell), a newline
# ends a line of its env file, and pdsh rewrites %h %u %n %% in every argument it sends.
UNSAFE_FOR_PDSH = re.compile(r'["$`\\\n\r]|%[hun%]')
# What DeepSpeed's per-node launcher sets in every rank it starts.
DEEPSPEED_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "CROSS_RANK")
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
    """SLURM's compact node list as host names, in SLURM's order (what `scontrol show
    hostnames` prints). Names are split at commas outside brackets. A bracket group holds
    numbers and ranges, zero-padded to the width of their low bound (`[9-11]`: 9 10 11,
    `[09-11]`: 09 10 11); text after a group is kept (`gpu[1-2]-ib`); several groups expand as
    a product, the first varying slowest (`r[1-2]-n[1-2]`: r1-n1 r1-n2 r2-n1 r2-n2)."""
    def bad(why: str) -> LaunchError:
        return LaunchError(f"SLURM node list {nodelist!r}: {why}")

    names, start, inside = [], 0, False
    for i, c in enumerate(nodelist + ","):
        if c == "[":
            if inside:
                raise bad("'[' inside a bracket group")
            inside = True
        elif c == "]":
            if not inside:
                raise bad("']' without '['")
            inside = False
        elif c == "," and not inside:
            names.append(nodelist[start:i])
            start = i + 1
    if inside:
        raise bad("'[' without ']'")
    hosts = []
    for name in names:
        if not name:
            raise bad("empty host name")
        parts = re.split(r"\[([^\]]*)\]", name)          # text, group, text, group, ..., text
        choices = [[part] if i % 2 == 0 else _group_numbers(part, bad) for i, part in enumerate(parts)]
        hosts += ["".join(combo) for combo in itertools.product(*choices)]
    return hosts


def _group_numbers(group: str, bad) -> list[str]:
    """The numbers of one bracket group (`001-003,010`), as strings padded like SLURM pads them."""
    numbers = []
    for item in group.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not match:
            raise bad(f"cannot read range {item!r}")
        lo, hi = match.group(1), match.group(2) or match.group(1)
        if int(hi) < int(lo):
            raise bad(f"range {item!r} runs backwards")
        numbers += [f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi) + 1)]
    return numbers


def slurm_hostnames(nodelist: str, env: dict) -> list[str]:
    """The node list expanded by `scontrol show hostnames` when scontrol is on PATH (SLURM's
    own reading), else by `expand_nodelist`."""
    scontrol = shutil.which("scontrol", path=env.get("PATH", ""))
    if scontrol is None:
        return expand_nodelist(nodelist)
    done = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True)
    hosts = done.stdout.split()
    if done.returncode or not hosts:
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}, no host"])[-1]
        raise LaunchError(f"SLURM node list {nodelist!r}: scontrol show hostnames failed: {why}")
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
    return [(host, slots) for host in slurm_hostnames(nodelist, env)]


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


def shell_line(cmd: list[str], env: dict, cwd: str, exec_: bool = False) -> str:
    """`cmd` as one shell line that sets `env` and `cwd` first (what a remote node runs);
    `exec_`: the shell becomes `cmd`, so its exit status is the task's own."""
    exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in env.items())
    return f"{exports}cd {shlex.quote(cwd)}; {'exec ' if exec_ else ''}{shlex.join(cmd)}"


# ---- what DeepSpeed's pdsh runner passes to each node (deepspeed/launcher/runner.py, multinode_runner.py)

def ds_exported_prefixes() -> tuple[str, ...]:
    """The name prefixes DeepSpeed's runner exports to the nodes by itself: its EXPORT_ENVS and
    those of this machine's accelerator (NCCL on CUDA, none on CPU)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.launcher.runner import EXPORT_ENVS
    return tuple(EXPORT_ENVS + get_accelerator().export_envs())


def ds_excluded(env: dict) -> set[str]:
    """Variables DeepSpeed's runner does not export when a marker variable is set (EXCLUDE_ENVS)."""
    from deepspeed.launcher.runner import EXCLUDE_ENVS
    return {name for marker, names in EXCLUDE_ENVS.items() if marker in env for name in names}


def user_env_files(env: dict) -> list[str]:
    """The env files DeepSpeed's runner reads when `DS_ENV_FILE` does not point it elsewhere:
    `.deepspeed_env` (or the name in `DS_ENV_FILE`) in the home and working directories."""
    name = env.get("DS_ENV_FILE", ".deepspeed_env")
    home = env.get("HOME") or os.path.expanduser("~")
    return list(dict.fromkeys(os.path.abspath(os.path.join(d, name)) for d in (home, os.getcwd())))


def read_env_file(path: str) -> dict:
    """The KEY=VALUE lines of an env file, read as DeepSpeed's runner reads them."""
    values = {}
    with open(path) as f:
        for number, line in enumerate(f.read().splitlines(), 1):
            key, sep, value = line.partition("=")
            if line.strip() and not sep:
                raise LaunchError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
            if sep and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
                raise LaunchError(f"{path}:{number}: {key.strip()!r} is not a variable name (comments are not "
                                  "allowed: DeepSpeed's runner would export the line as it is)")
            if sep:
                values[key.strip()] = value.strip()
    return values


def env_file_lines(env: dict, ds_prefixes: tuple[str, ...]) -> dict:
    """What our env file carries: the forwarded variables (FORWARD_PREFIXES) that DeepSpeed's
    runner does not export by itself, then the lines of the user's own env files, which our
    `DS_ENV_FILE` would otherwise hide (their lines win, as they do in DeepSpeed)."""
    excluded = ds_excluded(env)
    lines = {k: v for k, v in env.items()
             if k.startswith(FORWARD_PREFIXES) and not k.startswith(ds_prefixes) and k not in excluded}
    for path in user_env_files(env):
        if os.path.isfile(path):
            lines.update(read_env_file(path))
    return lines


def node_exports(env: dict, lines: dict, ds_prefixes: tuple[str, ...], cwd: str) -> dict:
    """{name: value as the remote shell reads it}, in the order of its `export` statements, as
    DeepSpeed's runner builds them: first its own prefixes from its environment (where it puts
    the working directory in front of PYTHONPATH), then the env file's lines; each value is
    stripped and double-quoted unless plain (MultiNodeRunner.add_export). A value that would
    not arrive intact is a LaunchError naming the variable."""
    runner_env = dict(env)
    runner_env["PYTHONPATH"] = f"{cwd}:{env['PYTHONPATH']}" if "PYTHONPATH" in env else cwd
    excluded = ds_excluded(env)
    exports = {k: v for k, v in runner_env.items() if k.startswith(ds_prefixes) and k not in excluded}
    exports.update(lines)
    for key, value in exports.items():
        bad = UNSAFE_FOR_PDSH.search(value)
        if bad:
            raise LaunchError(f"environment variable {key}: its value contains {bad.group()!r}, which DeepSpeed's "
                              "pdsh runner cannot pass to the nodes intact; change or unset it")
    return {k: (f'"{v.strip()}"' if re.search(r"[^\w@%+=:,./-]", v.strip()) else v.strip())
            for k, v in exports.items()}


def pdsh_line(exports: dict, hosts, node_rank: int, master_addr: str, master_port: int,
              train_args: list[str], cwd: str) -> str:
    """What node `node_rank` runs under DeepSpeed's pdsh runner (PDSHRunner.get_cmd, with pdsh's
    `%n` replaced by the node's rank): its exports, `cd`, the per-node launcher; an argument
    with a space goes in double quotes."""
    args = ['"{}"'.format(a.replace('"', '\\"')) if " " in a else a for a in train_args]
    launch = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info(hosts)}",
              f"--node_rank={node_rank}", f"--master_addr={master_addr}", f"--master_port={master_port}",
              "--module", "--no_local_rank", "--enable_each_rank_log=None", "mose_ds.guard", "mose_ds.train", *args]
    return "".join(f"export {k}={v}; " for k, v in exports.items()) + f"cd {cwd}; " + " ".join(launch)


def write_env_file(path: str, lines: dict) -> None:
    """Our env file, new (never over another file) and readable by its owner only."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in lines.items())


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


@dataclass
class Plan:
    """What a launch runs: the job's nodes, and the command this process starts."""
    hosts: list[tuple[str, int]]
    master: str
    nodes: list[str]                 # "[node i: host, n rank(s)] <what node i runs>", for --dry-run
    runner: list[str]                # the command this process runs
    env_file: str | None = None      # DeepSpeed's env file (hostfile over pdsh), with its lines:
    env_lines: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def check_mode(args) -> None:
    if args.node_rank is not None and not args.no_ssh:
        raise LaunchError("--node-rank is only for --no-ssh (pdsh and srun number the nodes themselves)")
    if args.no_ssh and not args.hostfile:
        raise LaunchError("--no-ssh needs --hostfile: the job's nodes, the same file on every node")
    if args.no_ssh and args.node_rank is None:
        raise LaunchError("--no-ssh needs --node-rank I: this node's line in the hostfile, counting from 0")


def plan(args, env: dict) -> Plan:
    check_mode(args)
    cwd = os.getcwd()
    import torch

    from . import devices       # torch: imported once there is a launch to plan, not for --help
    slurm_gpus = bool(env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE"))
    # one rank per GPU: GPUs torch sees, or GPUs the machine shows that torch cannot use
    local_gpus = args.nproc is None and (torch.cuda.device_count() > 0 or devices.device_files() > 0)
    if args.hostfile or (slurm_gpus if args.slurm else local_gpus):      # ranks on GPU slots
        args.train_args = on_gpus(args.train_args)
    port, train = args.master_port, ["--no_local_rank", "--module", "mose_ds.guard", "mose_ds.train", *args.train_args]
    if args.hostfile and args.no_ssh:
        hosts = parse_hostfile(args.hostfile)
        rank = args.node_rank
        if not 0 <= rank < len(hosts):
            raise LaunchError(f"--node-rank {rank}: {args.hostfile} lists {len(hosts)} node(s), ranks 0..{len(hosts) - 1}")
        master = args.master_addr or hosts[0][0]
        (host, slots), cmd = hosts[rank], node_command(hosts, rank, master, port, args.train_args)
        # DeepSpeed's runner: with --no_ssh it runs the per-node launcher here, for node --node_rank
        runner = ["deepspeed", f"--hostfile={args.hostfile}", "--no_ssh", f"--node_rank={rank}",
                  f"--master_addr={master}", f"--master_port={port}", *train]
        notes = [(f"--no-ssh: this is node {rank} ({host}) of {len(hosts)}; run the same command on every node "
                  f"with its own --node-rank; every node must reach {master}:{port}"),
                 "--no-ssh: nothing is forwarded: the ranks of each node see that node's own environment"]
        return Plan(hosts, master, [f"[node {rank}: {host}, {slots} rank(s)] {shlex.join(cmd)}"], runner, notes=notes)
    if args.hostfile:
        hosts = parse_hostfile(args.hostfile)
        master = args.master_addr or hosts[0][0]
        prefixes = ds_exported_prefixes()
        lines = env_file_lines(env, prefixes)
        exports = node_exports(env, lines, prefixes, cwd)
        path = os.path.join(cwd, "runs", "launch", f"deepspeed_env.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}")
        nodes = [f"[node {i}: {host}, {slots} rank(s)] {pdsh_line(exports, hosts, i, master, port, args.train_args, cwd)}"
                 for i, (host, slots) in enumerate(hosts)]
        # --force_multi: a one-host hostfile too goes over pdsh to that host (not run here)
        runner = ["env", f"DS_ENV_FILE={path}", "deepspeed", f"--hostfile={args.hostfile}", "--force_multi",
                  f"--master_addr={master}", f"--master_port={port}", *train]
        notes = [(f"DeepSpeed's runner exports {', '.join(p + '*' for p in prefixes)} by itself; "
                  f"the env file adds {', '.join(lines) or 'nothing'}")]
        return Plan(hosts, master, nodes, runner, path, lines, notes)
    if args.slurm:
        hosts = slurm_hosts(env, args.nproc)
        master = args.master_addr or hosts[0][0]
        # The node's shell, and DeepSpeed's launcher below it, ignore the SIGUSR1 that SLURM sends
        # to every process of the step; the ranks install their own handler.
        # `exec`: the srun task is the launcher itself, so a node's exit status reaches srun
        # unchanged (a shell that srun's --kill-on-bad-exit kills first would turn 75 into 143).
        on_node = ['trap "" USR1; ' + shell_line(node_command(hosts, i, master, port, args.train_args),
                                                 forwarded_env(env), cwd, exec_=True) for i in range(len(hosts))]
        nodes = [f"[node {i}: {host}, {slots} rank(s)] {line}" for i, ((host, slots), line) in enumerate(zip(hosts, on_node))]
        # srun starts one task per node; each picks its own rank by SLURM_NODEID. Since SLURM
        # 22.05 srun does not inherit sbatch's --cpus-per-task; DeepSpeed's launcher places the ranks.
        cpus = [f"--cpus-per-task={env['SLURM_CPUS_PER_TASK']}"] if env.get("SLURM_CPUS_PER_TASK") else []
        runner = ["srun", f"--nodes={len(hosts)}", "--ntasks-per-node=1", *cpus, "--cpu-bind=none",
                  "--kill-on-bad-exit=1", "bash", "-c", on_node[0].replace("--node_rank=0", "--node_rank=$SLURM_NODEID")]
        return Plan(hosts, master, nodes, runner)
    hosts = [("localhost", local_slots(args.nproc))]
    master = args.master_addr or "127.0.0.1"
    cmd = node_command(hosts, 0, master, port, args.train_args)
    return Plan(hosts, master, [f"[node 0: localhost, {hosts[0][1]} rank(s)] {shell_line(cmd, forwarded_env(env), cwd)}"], cmd)


def check_not_bare_srun(env: dict) -> None:
    """Refuse a trainer that is one of several tasks of an srun step but was not started by
    DeepSpeed's per-node launcher (which sets RANK, LOCAL_RANK, WORLD_SIZE and CROSS_RANK in
    every rank): each such task would make a one-rank world of its own, and all of them would
    write the same checkpoint folder. A one-task step is one legitimate rank, and so is a batch
    script itself (it shows SLURM_PROCID=0 and the allocation's SLURM_NTASKS, but no step id)."""
    if all(name in env for name in DEEPSPEED_RANK_VARIABLES):
        return
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
    procid = env.get("SLURM_PROCID", "0")
    if (in_step and tasks.isdigit() and int(tasks) > 1) or procid != "0":
        raise LaunchError(f"this process is task {procid} of {tasks} that srun started without the launcher: "
                          "each task would train alone and all would write the same checkpoints; start the job "
                          "with `sbatch launchers/slurm/train.sbatch <recipe>`, or inside an allocation with "
                          "`bash launchers/train.sh --slurm -- --config <recipe>`")


def write_hostfile(hosts: list[tuple[str, int]], path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.writelines(f"{host} slots={slots}\n" for host, slots in hosts)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, each option with its default."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mose-launch", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--hostfile", help="multi-node: DeepSpeed hostfile ('host slots=N' per line)")
    where.add_argument("--slurm", action="store_true", help="inside a SLURM allocation (sbatch/salloc)")
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks per node (default: the node's GPUs, or 1 CPU rank without GPU)")
    p.add_argument("--node-rank", type=int, default=None,
                   help="--no-ssh: this node's line in the hostfile, counting from 0")
    p.add_argument("--no-ssh", action="store_true",
                   help="with --hostfile: start only this node's ranks (DeepSpeed's --no_ssh); run the same "
                        "command on every node with its own --node-rank; nothing is forwarded between nodes")
    p.add_argument("--master-addr", default=None,
                   help="rendezvous host (default: the first node of the hostfile or allocation); every node "
                        "must be able to reach it at --master-port")
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
    relay = preempt.Relay()          # before anything slow: a stop request is kept, not fatal
    args = parse_args(argv)
    env = dict(os.environ if env is None else env)
    try:
        job = plan(args, env)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    world = sum(slots for _, slots in job.hosts)
    print(f"launch: {len(job.hosts)} node(s), {world} rank(s), master {job.master}:{args.master_port}", flush=True)
    if args.slurm:
        path = args.hostfile_out or f"hostfile.{env.get('SLURM_JOB_ID', 'slurm')}"
        write_hostfile(job.hosts, path)
        print(f"launch: hostfile derived from the allocation -> {path}", flush=True)
    for note in job.notes:
        print(f"launch: {note}", flush=True)
    if job.env_file and args.dry_run:
        print(f"launch: env file for DeepSpeed's runner (DS_ENV_FILE), not written on a dry run: {job.env_file}")
    elif job.env_file:
        write_env_file(job.env_file, job.env_lines)
        print(f"launch: env file for DeepSpeed's runner (DS_ENV_FILE) -> {job.env_file}", flush=True)
    if args.dry_run:
        print("\n".join(job.nodes))
        if args.hostfile or args.slurm:
            print(f"[started by] {shlex.join(job.runner)}")
        return 0
    local = not (args.slurm or args.hostfile) or args.no_ssh       # this node's ranks run below this process
    return relay.run(job.runner, local)        # SIGUSR1/SIGTERM here: the ranks checkpoint and stop


if __name__ == "__main__":
    sys.exit(main())
