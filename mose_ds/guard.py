"""Run one training rank and say so when it dies.

    python -m mose_ds.guard <module> [args ...]     # started by deepspeed.launcher.launch per rank

A rank killed by a signal (the OOM killer, kill -9, a segfault) cannot report itself, and
DeepSpeed's per-node launcher only logs a return code. This parent process runs the rank as a
child, prints one line naming the rank, host and cause, and exits non-zero, which makes the
launcher stop the node's other ranks; ranks on other nodes then fail their next collective
(within `engine.comm_timeout_s`, or sooner through the heartbeat of multi-node jobs).

It passes SIGTERM, SIGINT and SIGUSR1 on to the rank (a stop request, preempt.py), and ends
the rank when its own parent, the node's launcher, disappears (a launcher killed with SIGKILL
cannot stop its ranks, which would otherwise run on, orphaned).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

from .preempt import EXIT_PREEMPTED, LAUNCHER_ENV, ignore_usr1

PARENT_POLL_S = 0.5


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


def alive(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def launchers(env: dict) -> list[int]:
    """The processes whose end ends this rank: its parent (DeepSpeed's per-node launcher) and,
    when it runs on this host, the `mose_ds.launch` process above it."""
    found = [os.getppid()]
    host, _, pid = env.get(LAUNCHER_ENV, "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        found.append(int(pid))
    return found


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m mose_ds.guard <module> [args ...]", file=sys.stderr)
        return 2
    watched = launchers(os.environ)
    # SIGUSR1 ignored until the rank installs its handler (preempt.StopRequest): a stop request
    # that comes while it imports must not kill it
    child = subprocess.Popen([sys.executable, "-u", "-m", *argv], preexec_fn=ignore_usr1)

    stopped = []

    def forward(signum, _frame):     # the launcher stopping this rank stops the child too
        if signum != signal.SIGUSR1:
            stopped.append(signum)
        child.send_signal(signum)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, forward)
    rank, local = os.environ.get("RANK", "?"), os.environ.get("LOCAL_RANK", "?")
    where = f"rank {rank} (local rank {local} on {socket.gethostname()}, pid {child.pid})"
    while True:
        try:
            code = child.wait(timeout=PARENT_POLL_S)
            break
        except subprocess.TimeoutExpired:
            gone = [pid for pid in watched if not alive(pid) or (pid == watched[0] and os.getppid() != pid)]
            if gone and signal.SIGKILL not in stopped:     # the node's launcher was killed
                print(f"error: {where}: the node's launcher (pid {gone[0]}) is gone; ending this rank",
                      file=sys.stderr, flush=True)
                stopped.append(signal.SIGKILL)
                child.kill()
    if code not in (0, EXIT_PREEMPTED) and not stopped:
        print(f"error: {where} {describe_exit(code)}; stopping the job", file=sys.stderr, flush=True)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
