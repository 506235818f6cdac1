"""The CPU workarounds of a CPU rank, applied to CPU ranks only, whatever else the machine has.

The model itself needs none: its attention is torch's fused kernel (attention.py), not
megatron's `DotProductAttention`, whose score buffer and RNG tracker live on
`torch.cuda.current_device()`. What remains is DeepSpeed's, for a process that trains on
the CPU (`engine.init_distributed` with a CPU device), on a CPU-only machine or on a GPU
host alike:

- DeepSpeed picks its accelerator once, from whether CUDA is visible: on a GPU host a CPU
  rank would get the CUDA accelerator, and the engine would move the model to a GPU. The
  CPU accelerator is set explicitly.
- DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce op at first init (about a
  minute); gloo does the job, so the build is skipped.

Each has its test (tests/test_cpu_compat.py).
"""

from __future__ import annotations

import importlib


def apply() -> None:
    """Make this process's DeepSpeed a CPU one (idempotent)."""
    from deepspeed.accelerator import get_accelerator, set_accelerator
    if get_accelerator().device_name() != "cpu":
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator
        set_accelerator(CPU_Accelerator())
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
