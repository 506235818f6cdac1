"""A GPU host, as far as device choice can tell: torch reports CUDA devices it does not have.

On the PYTHONPATH of every process of a test run under `MOSE_DS_FAKE_CUDA=1` (tests/conftest.py
puts it there), so the suite takes the GPU-host branch of each device choice: DeepSpeed's
accelerator detection, `devices.choose('auto')`, the launcher's slot count. Anything that
then really touches CUDA from a CPU model or a CPU rank fails, as it would on a real GPU
host with a device mismatch.
"""

import os

if os.environ.get("MOSE_DS_FAKE_CUDA") == "1":
    import torch

    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 2
