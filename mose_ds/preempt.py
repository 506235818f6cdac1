"""Stopping a training job on request (preemption, a time limit) with a checkpoint first.

A cluster announces the end of a job with a signal: SLURM sends SIGUSR1 ahead of a time limit
(`--signal`), and SIGTERM when it preempts. A rank that receives SIGUSR1 or SIGTERM only notes
the request; the ranks agree on it at the end of the iteration, inside the all-reduce they
already make to agree on skipped updates (train.py), so one signalled rank is enough and all
ranks stop after the same iteration. They then write a checkpoint, verify it, and exit with
`EXIT_PREEMPTED`, which the SLURM script turns into a requeue. A signal that arrives while
that checkpoint is being written is noted and ignored: the save runs to its end.

The launcher side (`relay`): the process a user or a batch script signals is the launcher,
not the ranks; it passes the request on to the ranks it started (their `mose_ds.guard`
parents forward it), and DeepSpeed's per-node launcher, which would die of SIGUSR1 and kills
its ranks 30 s after a SIGTERM, is started with SIGUSR1 ignored and never sent the signal.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

EXIT_PREEMPTED = 75          # EX_TEMPFAIL: stopped on request after a checkpoint; run it again to resume
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """Every rank stopped on request after `iteration`, with a verified checkpoint in `folder`."""

    def __init__(self, iteration: int, folder: str, signal_name: str):
        super().__init__(f"stopped on request ({signal_name}) after iteration {iteration}; verified "
                         f"checkpoint {folder}; run the same command again to resume "
                         f"(exit status {EXIT_PREEMPTED})")


class StopRequest:
    """This rank's view of a stop request: set by a signal handler, read once per iteration."""

    def __init__(self, say=print):
        self.signum: int | None = None
        self.saving = False
        self.iteration = 0          # the iteration in progress (set by the training loop)
        self._say = say

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a peer rank's request"

    def install(self) -> "StopRequest":
        for signum in SIGNALS:
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.saving:
            self._say(f"note: {name} while the stop checkpoint is being written; the save continues")
        elif self.signum is None:
            self.signum = signum
            self._say(f"note: rank {os.environ.get('RANK', '0')} received {name} during iteration "
                      f"{self.iteration}: every rank stops after this iteration (or the next, if the ranks "
                      "already agreed on this one) and writes a checkpoint")


def ignore_usr1() -> None:
    """preexec_fn of DeepSpeed's per-node launcher: SIGUSR1 ignored (inherited by everything it
    starts until a process installs its own handler, as our ranks and guards do)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def ranks_of(pid: int) -> list:
    """The rank guards (`mose_ds.guard`) among the descendants of `pid`."""
    import psutil
    found = []
    for proc in psutil.Process(pid).children(recursive=True):
        try:
            if "mose_ds.guard" in proc.cmdline():
                found.append(proc)
        except psutil.Error:
            continue
    return found


LAUNCHER_ENV = "MOSE_DS_LAUNCHER"     # host:pid of the launcher whose ranks run on this host


def relay(cmd: list[str], local: bool) -> int:
    """Run `cmd` (a launcher) to its end; SIGUSR1 or SIGTERM to this process becomes SIGUSR1
    to the ranks below it (and to `srun`, which forwards it to its tasks). Returns its status.
    `local`: the ranks run on this host, below this process; their guards then end them if this
    process is killed (LAUNCHER_ENV), as they do when their direct parent goes."""
    env = dict(os.environ)
    if local:
        env[LAUNCHER_ENV] = f"{socket.gethostname()}:{os.getpid()}"
    child = subprocess.Popen(cmd, env=env, preexec_fn=ignore_usr1)

    def forward(signum, _frame):
        targets = ranks_of(child.pid)
        for proc in targets:
            proc.send_signal(signal.SIGUSR1)
        if os.path.basename(cmd[0]) == "srun":
            child.send_signal(signal.SIGUSR1)
        elif not targets:
            print(f"launch: {signal.Signals(signum).name} received but no rank of this job runs under this "
                  "launcher (remote nodes): signal one rank instead (pkill -USR1 -f mose_ds.train on a node)",
                  file=sys.stderr, flush=True)
            return
        print(f"launch: {signal.Signals(signum).name} received: asked the ranks to checkpoint and stop",
              file=sys.stderr, flush=True)

    for signum in SIGNALS:
        signal.signal(signum, forward)
    return child.wait()
