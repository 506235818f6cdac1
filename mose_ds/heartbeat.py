"""Noticing a lost node in a multi-node job, and naming it.

When a node dies (power, kernel panic, its launcher killed), the ranks of the other nodes learn
it only from their next collective: NCCL waits for `engine.comm_timeout_s` (ten minutes by
default) and then reports a timeout that names no node; gloo fails at once with a socket error
that names an address and port. Neither says which node went.

Every rank of a multi-node job therefore beats: a counter in the job's rendezvous store (the
TCP store on MASTER_ADDR:MASTER_PORT, held by rank 0), bumped every `interval_s` by a thread
with its own connection. The same thread reads everyone's counters; when a node's counters
have not moved for `timeout_s`, or the store itself (on node 0) cannot be reached, the rank
prints one line naming the node, its host and its ranks, and exits: the node's launcher then
stops the node's other ranks. A training error that surfaces first (gloo) waits for that
verdict (`settle`) before it is raised, so the message names the node in either order.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import threading
import time

import torch.distributed as tdist

EXIT_LOST_NODE = 69                 # EX_UNAVAILABLE
KEY = "mose_ds/heartbeat"

_beat: "Heartbeat | None" = None


class Heartbeat:
    def __init__(self, rank: int, world: int, node: int, timeout_s: float, interval_s: float):
        self.rank, self.world, self.node = rank, world, node
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self.master = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        self.store = tdist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                    timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
        self.store.set(f"{KEY}/where/{rank}", f"{node} {socket.gethostname()}")
        self.store.set(f"{KEY}/beat/{rank}", "0")
        self.seen: dict[int, tuple[bytes, float]] = {}
        self.where: dict[int, tuple[int, str]] = {}     # rank -> (node, host), read once all beat
        self.done = threading.Event()
        self.verdict = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mose-heartbeat", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        beats = [f"{KEY}/beat/{r}" for r in range(self.world)]
        last_loop = last_reached = time.monotonic()
        while not self.done.wait(self.interval_s):
            now = time.monotonic()
            if now - last_loop > self.timeout_s / 2:     # this process was stopped (suspend, SIGSTOP) or
                self.seen = {r: (v, now) for r, (v, _) in self.seen.items()}   # starved: it saw nothing
            last_loop = now
            try:
                self.store.add(f"{KEY}/beat/{self.rank}", 1)
                if not self.store.check(beats):          # peers still starting
                    continue
                if not self.where:
                    for r, where in enumerate(self.store.multi_get([f"{KEY}/where/{r}" for r in range(self.world)])):
                        node, host = where.decode().split(" ", 1)
                        self.where[r] = (int(node), host)
                values = self.store.multi_get(beats)
                last_reached = now
            except Exception as e:                       # the store lives in rank 0's process
                if now - last_reached > self.timeout_s and not self.done.is_set():
                    self._lost(f"node 0 (the rendezvous {self.master}, rank 0) cannot be reached "
                               f"({type(e).__name__})")
                continue
            stale = []
            for r, value in enumerate(values):
                last = self.seen.get(r)
                if last is None or last[0] != value:
                    self.seen[r] = (value, now)
                elif now - last[1] > self.timeout_s:
                    stale.append(r)
            if stale and not self.done.is_set():
                self._lost(self._describe(stale) + f": no heartbeat for {self.timeout_s:g} s")
                return

    def _describe(self, stale: list[int]) -> str:
        """The nodes of the silent ranks, each with its host and all its ranks."""
        lost = sorted({self.where[r] for r in stale})
        return "; ".join(f"node {node} (host {host}, rank(s) {', '.join(str(r) for r in sorted(self.where) if self.where[r] == (node, host))})"
                         for node, host in lost)

    def _lost(self, what: str) -> None:
        self.verdict.set()
        print(f"error: rank {self.rank} on node {self.node}: lost {what}; stopping the job",
              file=sys.stderr, flush=True)
        os._exit(EXIT_LOST_NODE)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def start(timeout_s: float, interval_s: float | None = None) -> None:
    """Start beating if this rank belongs to a job of several nodes (DeepSpeed's launcher sets
    CROSS_SIZE, the node count, and CROSS_RANK, this node's index)."""
    global _beat
    nodes = int(os.environ.get("CROSS_SIZE", "1"))
    if _beat is None and nodes > 1 and tdist.is_initialized():
        _beat = Heartbeat(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("CROSS_RANK", "0")),
                          timeout_s, interval_s or max(1.0, timeout_s / 10))


def stop() -> None:
    """Stop beating before the job's final barrier (rank 0 then takes the store down)."""
    global _beat
    if _beat is not None:
        _beat.stop()
        _beat = None


def settle() -> None:
    """Give the heartbeat the time to name a lost node before an error from a collective is
    raised (the process exits from the heartbeat thread if it finds one). A store that cannot
    be reached is named only after `timeout_s` of failed calls."""
    if _beat is not None:
        _beat.verdict.wait(_beat.timeout_s + 3 * _beat.interval_s)
