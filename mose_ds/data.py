"""Memory-mapped token shards and the deterministic batch order (data stage of DESIGN section 1).

A prepared folder holds `train.bin`, `val.bin` (flat token ids) and `meta.json`. Training
reads non-overlapping windows of `seq_len + 1` tokens in a fresh seeded permutation per
epoch. The position in that order (samples consumed) is the only data state: it is saved
in every checkpoint, so a resumed run reads exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from .config import ConfigError
from .prepared import DTYPES, read_meta

class TokenSplit:
    """One split (`train` or `val`) as a memory map, cut into windows of seq_len + 1 tokens."""

    def __init__(self, folder: str, split: str, seq_len: int, vocab_size: int):
        meta = read_meta(folder)
        path = os.path.join(folder, f"{split}.bin")
        if not os.path.isfile(path):
            raise ConfigError(f"data.path: {path} is missing")
        if meta.get("vocab_size", 0) > vocab_size:
            raise ConfigError(f"{folder}: tokenizer vocabulary {meta['vocab_size']} exceeds "
                              f"model.vocab_size={vocab_size}")
        self.tokens = np.memmap(path, dtype=DTYPES[meta["dtype"]], mode="r")
        self.seq_len = seq_len
        self.num_windows = (len(self.tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise ConfigError(f"{path}: {len(self.tokens)} tokens, fewer than one window of "
                              f"model.seq_len + 1 = {seq_len + 1}")

    def batch(self, window_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, both [B, S] int64."""
        S = self.seq_len
        rows = np.stack([self.tokens[i * S: i * S + S + 1] for i in window_ids]).astype(np.int64)
        data = torch.from_numpy(rows)
        return data[:, :-1], data[:, 1:]


@functools.lru_cache(maxsize=2)
def _epoch_order(num_windows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_windows)


def train_window_ids(split: TokenSplit, seed: int, start: int, count: int) -> np.ndarray:
    """Window ids of global samples [start, start + count): epoch e reads permutation(seed, e)."""
    epochs, offsets = np.divmod(np.arange(start, start + count), split.num_windows)
    return np.array([_epoch_order(split.num_windows, seed, int(e))[o] for e, o in zip(epochs, offsets)],
                    dtype=np.int64)


def micro_batch(split: TokenSplit, seed: int, position: int, micro: int, rank: int,
                world: int, micro_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch `micro` of the global batch starting at sample `position`, for `rank`."""
    start = position + (micro * world + rank) * micro_batch_size
    return split.batch(train_window_ids(split, seed, start, micro_batch_size))


def device_batches(split: TokenSplit, seed: int, position: int, rank: int, world: int, micro_batch_size: int,
                   grad_accum_steps: int, device: torch.device):
    """This rank's training micro-batches from sample `position` on, in order (iteration by
    iteration, `grad_accum_steps` each), as (inputs, targets) on `device`.

    Each batch is read one step ahead and, on CUDA, copied from pinned memory without
    blocking: a copy from pageable memory would hold the host until the device has
    finished the work queued before it, so the host could not run ahead of the device."""
    global_batch = micro_batch_size * grad_accum_steps * world

    def send(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        iteration, micro = divmod(i, grad_accum_steps)
        x, y = micro_batch(split, seed, position + iteration * global_batch, micro, rank, world, micro_batch_size)
        if device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    ahead, i = send(0), 0
    while True:
        current, i = ahead, i + 1
        ahead = send(i)
        yield current


def val_batch_count(split: TokenSplit, num_batches: int, world: int, micro_batch_size: int) -> int:
    """Validation batches per rank: `num_batches`, or fewer if the split is smaller."""
    available = split.num_windows // (world * micro_batch_size)
    if available < 1:
        raise ConfigError(f"validation split has {split.num_windows} windows of model.seq_len + 1 tokens, "
                          f"fewer than one batch of {world * micro_batch_size}")
    return min(num_batches, available)


def val_batches(split: TokenSplit, num_batches: int, rank: int, world: int, micro_batch_size: int):
    """The same fixed validation windows at every evaluation, sharded across ranks."""
    for b in range(val_batch_count(split, num_batches, world, micro_batch_size)):
        start = (b * world + rank) * micro_batch_size
        yield split.batch(np.arange(start, start + micro_batch_size))
