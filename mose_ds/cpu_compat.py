"""Every CPU workaround in one place, applied only when no CUDA device is present.

megatron-core 0.16.1's local layers assume CUDA in two spots, and DeepSpeed JIT-builds a
shared-memory comm op on CPU that takes about a minute. On a GPU nothing here is patched.
Each patch has its own test (tests/test_cpu_compat.py).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import operator

import torch

_APPLIED = False
RNG_STATE_NAME = "model-parallel-rng"


def _cpu_get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
    """megatron's GlobalMemoryBuffer.get_tensor, allocating on the CPU instead of CUDA."""
    numel = functools.reduce(operator.mul, tensor_shape, 1)
    buf = self.buffer.get((name, dtype))
    if buf is None or buf.numel() < numel:
        buf = self.buffer[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(*tensor_shape)


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    class CpuRNGStatesTracker(CudaRNGStatesTracker):
        """megatron's RNG tracker (used around attention dropout) on the CPU generator."""

        def add(self, name, seed):
            gen = torch.Generator()
            gen.manual_seed(seed)
            self.states_[name] = gen.get_state()

        @contextlib.contextmanager
        def fork(self, name=RNG_STATE_NAME):
            outside = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outside)

    return CpuRNGStatesTracker


def apply(seed: int = 1234) -> bool:
    """Patch megatron and DeepSpeed for CPU if CUDA is absent; returns whether it patched."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    from megatron.core import utils as mcore_utils
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_utils.GlobalMemoryBuffer.get_tensor = _cpu_get_tensor
    tracker = _cpu_rng_tracker_class()()
    tracker.add(RNG_STATE_NAME, seed)
    mcore_random._CUDA_RNG_STATE_TRACKER = tracker
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # DeepSpeed's CPU backend builds a shared-memory all-reduce op at first init (~60 s);
    # gloo does the job, so skip the build.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    _APPLIED = True
    return True
