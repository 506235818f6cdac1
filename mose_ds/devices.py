"""Where a process runs, decided once from what was asked for, and what it runs on.

Every choice between CPU and CUDA goes through `choose`: an explicit `cpu` / `cuda`
(`engine.device`, a tool's `--device`), else `MOSE_DS_DEVICE`, else CUDA when torch sees a
device. A job that expects GPUs and finds none (a torch wheel built for another CUDA or
architecture) is refused with a one-line error naming torch's CUDA build and the devices
the machine shows, instead of training on CPU ranks without a word. `banner` is the
environment line every run prints and records.
"""

from __future__ import annotations

import glob
import json
import os

import torch

ENV_DEVICE = "MOSE_DS_DEVICE"


class DeviceError(RuntimeError):
    """A device was asked for that this process cannot use; the message says why and what to do."""


def device_files() -> int:
    """NVIDIA GPUs the machine shows (/dev/nvidia0, 1, ...), whether or not torch can use them."""
    return len(glob.glob("/dev/nvidia[0-9]*"))


def _visible() -> str:
    """What the machine shows, whatever torch sees: device files and CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"{device_files()} NVIDIA device file(s) in /dev, "
            f"CUDA_VISIBLE_DEVICES={'unset' if visible is None else repr(visible)}")


def require_cuda(why: str) -> None:
    """Raise DeviceError unless torch can use a CUDA device."""
    if torch.cuda.is_available():
        return
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    raise DeviceError(f"{why} needs CUDA, but torch {torch.__version__} ({build}) sees no CUDA device "
                      f"({_visible()}); install the torch wheel for this machine's driver, or ask for "
                      "the CPU explicitly (engine.device=cpu / --device cpu)")


def available() -> str:
    """The devices this process can ask for, e.g. 'cpu, cuda, cuda:0, cuda:1'."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ", ".join(["cpu"] + (["cuda"] if count else []) + [f"cuda:{i}" for i in range(count)])


def choose(requested: str | torch.device | None = "auto", why: str = "this run") -> torch.device:
    """The device for `requested`: 'cpu', 'cuda', 'cuda:N', or 'auto' / None
    (`MOSE_DS_DEVICE` if set, else CUDA when torch sees a device, else the CPU). 'cuda'
    stays without an index: which GPU is the process's (its LOCAL_RANK, engine.init_distributed).
    Every tool's `--device` and the lm-eval adapter's `device` come here; a device this
    process cannot use is a one-line DeviceError naming it and what is available."""
    if requested in (None, "auto"):
        requested = os.environ.get(ENV_DEVICE) or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise DeviceError(f"device {requested!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        require_cuda(f"{why} (device {requested}; available here: {available()})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {requested!r}: torch sees {torch.cuda.device_count()} CUDA device(s); "
                              f"available: {available()}")
    elif device.type != "cpu":
        raise DeviceError(f"device {requested!r}: expected cpu, cuda or cuda:N")
    return device


def training_device(requested: str, precision: str) -> torch.device:
    """The device of a training run: `engine.device`; under 'auto' a bf16 recipe (a GPU
    recipe) without CUDA is refused rather than run on CPU ranks."""
    if requested == "auto" and precision == "bf16" and not os.environ.get(ENV_DEVICE):
        return choose("cuda", why="a bf16 recipe (engine.precision=bf16)")
    return choose(requested, why="training")


def environment(device: torch.device, **chosen: str) -> dict:
    """Versions and the device a run uses, plus the run's choices (attention backend,
    expert kernel...): the environment banner as a dict."""
    import deepspeed
    from megatron.core import package_info
    info = {"torch": torch.__version__, "cuda": torch.version.cuda or "none", "deepspeed": deepspeed.__version__,
            "megatron_core": package_info.__version__, "device": str(device)}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        nccl = torch.cuda.nccl.version()
        info.update(nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
                    device_name=torch.cuda.get_device_name(device), capability=f"{major}.{minor}",
                    device_count=str(torch.cuda.device_count()))
    else:
        info.update(device_name="CPU", cpu_threads=str(torch.get_num_threads()))
    return {**info, **chosen}


def banner(info: dict) -> str:
    """One line: `key value | key value ...`."""
    return "environment | " + " | ".join(f"{k} {v}" for k, v in info.items())


def record(info: dict, out_dir: str) -> str:
    """Write the banner dict to `out_dir`/environment.json; returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "environment.json")
    with open(path, "w") as f:
        json.dump(info, f, indent=1)
    return path
