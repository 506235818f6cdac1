"""Run one training rank and say so when it dies.

    python -m mose_ds.guard <module> [args ...]     # started by deepspeed.launcher.launch per rank

A rank killed by a signal (the OOM killer, kill -9, a segfault) cannot report itself, and
DeepSpeed's per-node launcher only logs a return code. This parent process runs the rank as a
child, prints one line naming the rank, host and cause, and exits non-zero, which makes the
launcher stop the node's other ranks; ranks on other nodes then fail their next collective
(within `engine.comm_timeout_s`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m mose_ds.guard <module> [args ...]", file=sys.stderr)
        return 2
    child = subprocess.Popen([sys.executable, "-u", "-m", *argv])

    stopped = []

    def forward(signum, _frame):     # the launcher stopping this rank stops the child too
        stopped.append(signum)
        child.send_signal(signum)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    code = child.wait()
    if code != 0 and not stopped:
        rank, local = os.environ.get("RANK", "?"), os.environ.get("LOCAL_RANK", "?")
        print(f"error: rank {rank} (local rank {local} on {socket.gethostname()}, pid {child.pid}) "
              f"{describe_exit(code)}; stopping the job", file=sys.stderr, flush=True)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
