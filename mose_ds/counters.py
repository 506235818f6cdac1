"""What a step costs besides seconds: host synchronisations, aten operations, collective bytes.

These figures mean the same on a CPU and on a GPU, so they are measured on the CPU where the
project is tested and compared on any machine:

* **host syncs**: operations that make the host wait for a CUDA device, counted on tensors
  computed on the device: `item` and friends (`bool`, `int`, `float`), `tolist`, `numpy`,
  a copy to the host, `nonzero`, `bincount`, `unique*`, `masked_select`, boolean indexing and
  `repeat_interleave` without `output_size`. On a CPU every tensor is a host tensor, so the
  counter follows provenance instead: tensors declared as device tensors (`device(...)`), and
  every tensor computed from one (or written by an operation that reads one), are device
  tensors; a copy of one to the host (`.cpu()`) is counted once and gives a host tensor,
  whose further use costs nothing, as on a GPU. `.to(device)` is taken for what code written
  for a GPU means by it, a move to the compute device: free for a device tensor; for a host
  tensor a copy that makes it a device tensor, and a sync unless `non_blocking` (torch waits
  for the stream after a blocking host-to-device copy). `torch.tensor(data, device=...)` is
  such a blocking copy too.
* **aten operations**: operations that launch work on the device (every dispatched operation
  that reads or writes a device tensor, and every factory such as `zeros` or `arange`, except
  views and bare allocations), the CPU stand-in for kernel launches. Work on host tensors
  (a host copy, and what is computed from it) launches nothing.
* **collective bytes**: what each `all_to_all_single` sends (`AllToAllLog`).

On CUDA, `torch.cuda.set_sync_debug_mode` is the device's own sync counter; `cuda_sync_warnings`
counts what it reports.
"""

from __future__ import annotations

import collections
import contextlib
import os
import traceback
import warnings

import torch
import torch.distributed as tdist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten

# Operations that read a device tensor's values on the host, or size their output by them.
_SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.bincount.default,
            aten._unique.default, aten._unique2.default, aten.unique_consecutive.default,
            aten.unique_dim.default, aten.masked_select.default}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
# Operations that launch nothing: allocations and metadata.
_NO_KERNEL = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
              aten.new_empty.default, aten.new_empty_strided.default, aten.detach.default,
              aten.alias.default, aten.lift_fresh.default, aten._local_scalar_dense.default,
              aten._unsafe_view.default}
_HOST_READS = {"tolist", "numpy"}
_FROM_DATA = {"tensor", "as_tensor"}   # with a device: Python or host data copied to it


def _syncs(func, args, kwargs) -> bool:
    if func in _SYNCING:
        return True
    if func in _INDEXING:            # boolean masks become indices through nonzero
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
    if func is aten.repeat_interleave.Tensor or func is aten.repeat_interleave.self_Tensor:
        return kwargs.get("output_size") is None
    return False


def _target_device(args, kwargs) -> tuple[torch.device | None, bool]:
    """The device argument of a `Tensor.to` call (None: a dtype-only conversion) and its
    `non_blocking`."""
    device, _, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **{k: v for k, v in kwargs.items() if k != "copy"})
    return device, non_blocking


class _Provenance(TorchDispatchMode):
    def __init__(self, owner: "HostSyncCounter"):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        owner = self.owner
        if owner.quiet:
            return out
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = any(owner.is_device(t) for t in tensors)
        if on_device:
            if _syncs(func, args, kwargs):
                owner.record(str(func.overloadpacket.__name__))
            written = [a for a, spec in zip(args, func._schema.arguments)
                       if spec.alias_info is not None and spec.alias_info.is_write]
            owner.mark([t for t in tree_leaves((out, written)) if isinstance(t, torch.Tensor)])
        if (on_device or not tensors) and func not in _NO_KERNEL and not func.is_view:
            owner.ops[str(func.overloadpacket.__name__)] += 1     # host-only work launches nothing
        return out


class _Transfers(TorchFunctionMode):
    """Host reads (`tolist`, `numpy`) and transfers (`to`, `cpu`) seen at the Python level."""

    def __init__(self, owner: "HostSyncCounter"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        owner = self.owner
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        out = func(*args, **kwargs)
        if name in _FROM_DATA and kwargs.get("device") is not None:
            owner.record(f"{name} (host to device)")                 # Python data copied onto the device
            return owner.device_copy(out, same=False)
        if source is None or name not in _HOST_READS | {"cpu", "to"}:
            return out
        if owner.is_device(source) and name in _HOST_READS | {"cpu"}:
            owner.record(f"{name} (device to host)")
            if isinstance(out, torch.Tensor):
                out = owner.host_copy(out, same=out is source)
        elif name == "to" and not owner.is_device(source):
            device, non_blocking = _target_device(args, kwargs)
            if device is not None:
                if not non_blocking:                                    # the host waits for the stream
                    owner.record("to (host to device, blocking)")
                out = owner.device_copy(out, same=out is source)
        return out


class HostSyncCounter:
    """Counts host syncs and kernel-launching aten operations inside `with counter:`.

        counter = HostSyncCounter()
        counter.device(x, *layer.parameters())
        with counter:
            out = layer(x); out.sum().backward()
        counter.syncs, counter.ops_total

    `where` gives, per sync, the innermost frame of the project (or of DeepSpeed) that caused it.
    """

    def __init__(self):
        self.marked = WeakIdKeyDictionary()
        self.syncs = 0
        self.by_kind: collections.Counter = collections.Counter()
        self.where: collections.Counter = collections.Counter()
        self.ops: collections.Counter = collections.Counter()
        self.quiet = False
        self._stack = None

    def device(self, *tensors) -> None:
        """Declare tensors (inputs, parameters, gradients) as living on the device."""
        self.mark([t for t in tree_leaves(tensors) if isinstance(t, torch.Tensor)])

    def mark(self, tensors) -> None:
        for t in tensors:
            self.marked[t] = True

    def is_device(self, t: torch.Tensor) -> bool:
        return t in self.marked or (t.grad_fn is None and t._base is not None and t._base in self.marked)

    def host_copy(self, t: torch.Tensor, same: bool) -> torch.Tensor:
        """The host tensor a copy to the host gives (a CPU tensor's `.cpu()` is itself)."""
        copy = self._clone(t) if same else t
        self.marked.pop(copy, None)
        return copy

    def device_copy(self, t: torch.Tensor, same: bool) -> torch.Tensor:
        copy = self._clone(t) if same else t
        self.marked[copy] = True
        return copy

    def _clone(self, t: torch.Tensor) -> torch.Tensor:
        """A copy that stands for the transfer: neither counted nor marked."""
        self.quiet = True
        try:
            return t.clone()
        finally:
            self.quiet = False

    def record(self, kind: str) -> None:
        self.syncs += 1
        self.by_kind[kind] += 1
        self.where[_culprit()] += 1

    @property
    def ops_total(self) -> int:
        return sum(self.ops.values())

    def reset(self) -> None:
        self.syncs, self.by_kind, self.where, self.ops = 0, collections.Counter(), collections.Counter(), collections.Counter()

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(_Transfers(self))
        self._stack.enter_context(_Provenance(self))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        self._stack = None
        return False


_ROOTS = (os.path.dirname(os.path.abspath(__file__)), os.sep + "deepspeed" + os.sep)


def _culprit() -> str:
    """file:line of the innermost frame in this package or in DeepSpeed ('other' if none)."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if frame.filename.startswith(_ROOTS[0]) and not frame.filename.endswith("counters.py") \
                or _ROOTS[1] in frame.filename:
            path = frame.filename
            short = os.path.basename(path) if path.startswith(_ROOTS[0]) else "deepspeed/" + path.split(_ROOTS[1])[-1]
            return f"{short}:{frame.lineno}"
    return "other"


class AllToAllLog:
    """Bytes each `all_to_all_single` call sends from this rank, in call order, while active.

    Wraps `torch.distributed.all_to_all_single`, which DeepSpeed's communication layer calls."""

    def __init__(self):
        self.sent: list[int] = []
        self._original = None

    def __enter__(self):
        self._original = original = tdist.all_to_all_single

        def logged(output, input, *args, **kwargs):
            self.sent.append(input.numel() * input.element_size())
            return original(output, input, *args, **kwargs)
        tdist.all_to_all_single = logged
        return self

    def __exit__(self, *exc):
        tdist.all_to_all_single = self._original
        return False


@contextlib.contextmanager
def cuda_sync_warnings():
    """Count the synchronisations CUDA's sync debug mode reports (a list that fills up)."""
    seen: list[str] = []
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
            seen.extend(str(w.message) for w in caught if "synchroniz" in str(w.message).lower())
    finally:
        torch.cuda.set_sync_debug_mode(previous)
