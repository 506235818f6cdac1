"""Checkpoint files read as data, never as code.

A `.pt` file is a pickle, and unpickling calls whatever functions the file names: reading a
checkpoint someone shared with `torch.load(weights_only=False)` (DeepSpeed's own default)
runs any code it carries. Every checkpoint read of MoSE-DS goes through `load` instead:
torch's weights-only unpickler, which builds tensors, containers and plain values only, plus
the few types in `ALLOWED` that DeepSpeed and we really store (found by loading every file of
fp32 ZeRO-0/1/2 and bf16 ZeRO-1/2 checkpoints with expert parallelism 2, GPT-2 and
DeepSeek-V2). A file naming anything else is refused, before that object is built, with a
one-line `CheckpointError` that names the file and the type.

The allow-list is lent to torch for one load at a time (`torch.serialization.safe_globals`),
so importing MoSE-DS does not widen torch's allow-list for any other caller. (megatron-core,
imported by every MoSE-DS model, does register a few data types process-wide at import:
numpy arrays, BytesIO, argparse and simple namespaces, paths, signals and its own enums and
OptimizerConfig; torch accepts those too, and none of them runs code when it is built.)
"""

from __future__ import annotations

import pickle
import re

import numpy as np
import torch
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address
from numpy._core.multiarray import _reconstruct


class CheckpointError(RuntimeError):
    """A missing, unreadable, unsafe or mismatched checkpoint; the message names it.
    (Defined here, below every reader; `mose_ds.checkpoint` re-exports it.)"""


# The non-tensor types a checkpoint may hold, and who stores each. Extend it here, and only
# with plain data classes: never a function that does work when called (eval, getattr, ...).
ALLOWED = (
    ZeroStageEnum,        # DeepSpeed ZeRO-1/2 optimizer shards: "zero_stage" (an int enum)
    LossScaler,           # DeepSpeed ZeRO-1/2 optimizer shards: "loss_scaler" (static, scale 1)
    fragment_address,     # DeepSpeed ZeRO-1/2 and bf16 shards: "param_slice_mappings" (start, numel)
    # our rng_state_rank*.pt: numpy's Mersenne-Twister key, a uint32 array, which pickles as
    # _reconstruct(ndarray, shape, dtype) plus a dtype of class UInt32DType
    np.ndarray, _reconstruct, np.dtype, np.dtypes.UInt32DType,
)

# torch's weights-only unpickler names what it refused in one of these forms.
_REFUSED = (re.compile(r"GLOBAL (\S+)"),                  # a function or class the file names
            re.compile(r"but got <class '([^']+)'>"))     # an object of a class it may not build


def load(path: str, map_location="cpu"):
    """torch.load of a checkpoint file, refusing any pickled type outside `ALLOWED`.

    The signature is `CheckpointEngine.load`'s, so DeepSpeed's engine reads through it too
    (`mose_ds.engine.create_engine`)."""
    # Lend only what is not registered already: on exit the context manager unregisters all it
    # was given, and megatron-core registers numpy's types for itself at import.
    lent = [t for t in ALLOWED if t not in torch.serialization.get_safe_globals()]
    try:
        with torch.serialization.safe_globals(lent):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:   # truncated or foreign files raise many types
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            raise CheckpointError(refusal(path, str(e))) from None
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def refusal(path: str, message: str) -> str:
    """One line for torch's (multi-line) weights-only refusal `message` of `path`."""
    for pattern in _REFUSED:
        found = pattern.search(message)
        if found:
            return (f"checkpoint {path} carries a pickled object of type {found.group(1)} that is not allowed "
                    "(checkpoints may hold tensors, plain Python values and the types in "
                    "mose_ds.safe_load.ALLOWED); refusing to load it")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    gist = next((line for line in reversed(lines) if not line.startswith("Check the documentation")), message)
    return f"checkpoint {path} carries pickled data the safe loader refuses ({gist}); refusing to load it"
