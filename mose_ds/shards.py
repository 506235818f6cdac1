"""Streaming safetensors I/O: read one tensor at a time, write a file tensor by tensor.

The safetensors layout is an 8-byte little-endian header length, a JSON header
({name: {dtype, shape, data_offsets}}), then the raw bytes. Reading by offset (no memory
map) and writing the header first and then each tensor's bytes keeps the resident memory
of a conversion at about one tensor, whatever the size of the shards. Damaged files
(truncated data, a bad header) raise `ShardError` naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from dataclasses import dataclass

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}


class ShardError(ValueError):
    """A missing, truncated or malformed safetensors file; the message names it."""


@dataclass(frozen=True)
class TensorEntry:
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int          # absolute byte offset in the file
    end: int


def read_header(path: str) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file, checked against the file's size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ShardError(f"{path}: truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ShardError(f"{path}: truncated or not safetensors (header of {n} bytes in a "
                                 f"{size}-byte file)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise ShardError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ShardError(f"{path}: not a safetensors file (unreadable header)") from None
    base, entries = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in DTYPES:
            raise ShardError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        start, end = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            numel *= d
        if end - start != numel * DTYPES[info["dtype"]].itemsize:
            raise ShardError(f"{path}: tensor {name} has {end - start} bytes for shape {info['shape']}")
        if base + end > size:
            raise ShardError(f"{path}: truncated (tensor {name} ends at byte {base + end}, "
                             f"the file has {size})")
        entries[name] = TensorEntry(path, info["dtype"], tuple(info["shape"]), base + start, base + end)
    return entries


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """One tensor, read from its byte range (only its bytes enter memory)."""
    data = bytearray(entry.end - entry.start)
    with open(entry.file, "rb") as f:
        f.seek(entry.start)
        got = f.readinto(data)              # straight into the tensor's buffer: one copy in memory
    if got != len(data):
        raise ShardError(f"{entry.file}: truncated while reading")
    if not data:
        return torch.empty(entry.shape, dtype=DTYPES[entry.dtype])
    return torch.frombuffer(data, dtype=DTYPES[entry.dtype]).reshape(entry.shape)


def write_file(path: str, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], produce,
               metadata: dict | None = None) -> None:
    """Write a safetensors file whose tensors (`specs`: name, dtype, shape, in order) are made
    one at a time by `produce(name)`; each is checked against its spec and written at once."""
    header, offset = {}, 0
    for name, dtype, shape in specs:
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                               # 8-byte aligned data, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in specs:
            tensor = produce(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ShardError(f"{path}: tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                                 f"planned {dtype} {tuple(shape)}")
            if tensor.numel():
                f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())   # no extra copy


@contextlib.contextmanager
def staged_folder(out: str, overwrite: bool = False):
    """Write a folder under `<out>.partial` and move it to `out` only when the block succeeds.

    A refused, failed or interrupted write removes the partial folder, so nothing half-written
    is ever left under the name a user (or a loader) would take for a finished folder."""
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(partial, out)
