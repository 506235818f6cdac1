"""Stopping a training job on request (preemption, a time limit) with a checkpoint first.

A cluster announces the end of a job with a signal: SLURM sends SIGUSR1 ahead of a time limit
(`--signal`), and SIGTERM when it preempts. A rank that receives SIGUSR1 or SIGTERM only notes
the request; the ranks agree on it at the end of the iteration, inside the all-reduce they
already make to agree on skipped updates (train.py), so one signalled rank is enough and all
ranks stop after the same iteration. They then write a checkpoint, verify it, and exit with
`EXIT_PREEMPTED`, which the SLURM script turns into a requeue. A signal that arrives while
that checkpoint is being written is noted and ignored: the save runs to its end.

The launcher side (`Relay`): the process a user or a batch script signals is the launcher,
not the ranks; it passes the request on to the ranks it started (their `mose_ds.guard`
parents forward it) or to srun, and DeepSpeed's per-node launcher, which would die of SIGUSR1
and kills its ranks 30 s after a SIGTERM, is started with SIGUSR1 ignored and never sent the
signal.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

EXIT_PREEMPTED = 75          # EX_TEMPFAIL: stopped on request after a checkpoint; run it again to resume
# A file rank 0 writes (the checkpoint's path) once the stop checkpoint verified: the batch script
# requeues on it as well as on status 75, which srun may replace by a signal status when it ends
# the step's other tasks.
STOP_MARKER_ENV = "MOSE_DS_STOP_MARKER"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """Every rank stopped on request after `iteration`, with a verified checkpoint in `folder`."""

    def __init__(self, iteration: int, folder: str, signal_name: str):
        self.folder = folder
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
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a peer rank's request"

    def install(self) -> "StopRequest":
        self._previous = {signum: signal.signal(signum, self._handle) for signum in SIGNALS}
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.saving:
            self._say(f"note: {name} while the stop checkpoint is being written; the save continues")
        elif self.signum is None:
            self.signum = signum
            self._say(f"note: rank {os.environ.get('RANK', '0')} received {name} during iteration "
                      f"{self.iteration}: every rank stops after this iteration (or the next, if the ranks "
                      "already agreed on this one) and writes a checkpoint")


def mark_stopped(folder: str, env=os.environ) -> None:
    """Write the stop marker (STOP_MARKER_ENV), if the job asked for one."""
    path = env.get(STOP_MARKER_ENV)
    if path:
        with open(f"{path}.tmp", "w") as f:
            f.write(folder + "\n")
        os.replace(f"{path}.tmp", path)


def ignore_usr1() -> None:
    """preexec_fn of DeepSpeed's per-node launcher: SIGUSR1 ignored (inherited by everything it
    starts until a process installs its own handler, as our ranks and guards do)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


GUARD = ["-u", "-m", "mose_ds.guard"]       # how DeepSpeed's per-node launcher starts a rank's guard
RANK_PATTERN = "-u -m mose_ds[.]train "      # `pkill -f` pattern of the rank processes themselves


def ranks_of(pid: int) -> list:
    """The rank guards among the descendants of `pid` (not pdsh or DeepSpeed's launcher, whose
    arguments name the guard module too)."""
    import psutil
    found = []
    for proc in psutil.Process(pid).children(recursive=True):
        try:
            if proc.cmdline()[1:4] == GUARD:
                found.append(proc)
        except psutil.Error:
            continue
    return found


LAUNCHER_ENV = "MOSE_DS_LAUNCHER"     # host:pid of the launcher whose ranks run on this host


class Relay:
    """The launcher's side of a stop request. Created first thing, so a signal that comes while
    the launch is prepared (importing torch takes seconds) is kept, not fatal; `run` starts the
    launcher command and passes every request on to the ranks below it (to `srun`, which
    forwards it to its tasks), waiting for ranks that are still starting."""

    POLL_S = 0.5

    def __init__(self):
        self.pending: list[int] = []
        for signum in SIGNALS:
            signal.signal(signum, lambda signum, _frame: self.pending.append(signum))

    def run(self, cmd: list[str], local: bool) -> int:
        """Run `cmd` to its end; returns its status. `local`: this node's ranks run below this
        process, and their guards end them if this process is killed (LAUNCHER_ENV)."""
        env = dict(os.environ)
        if local:
            env[LAUNCHER_ENV] = f"{socket.gethostname()}:{os.getpid()}"
        child = subprocess.Popen(cmd, env=env, preexec_fn=ignore_usr1)
        srun = os.path.basename(cmd[0]) == "srun"
        while True:
            try:
                return child.wait(timeout=self.POLL_S)
            except subprocess.TimeoutExpired:
                pass
            if not self.pending:
                continue
            targets = ranks_of(child.pid)
            name = signal.Signals(self.pending[0]).name
            if srun:
                child.send_signal(signal.SIGUSR1)
            elif not targets and local:
                continue                                  # ranks still starting: deliver once they run
            elif not targets:
                print(f"launch: {name} received, but this job's ranks run on other nodes (over pdsh): signal one "
                      f"rank instead, e.g. pkill -USR1 -f -- '{RANK_PATTERN}' on one node", file=sys.stderr, flush=True)
            for proc in targets:
                proc.send_signal(signal.SIGUSR1)
            if srun or targets:
                print(f"launch: {name} received: asked the ranks to checkpoint and stop", file=sys.stderr, flush=True)
            self.pending.clear()
