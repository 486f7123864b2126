"""A safetensors file written tensor by tensor (the header first, from the names, dtypes and shapes), so that no
serialized copy of all the weights is ever held in memory. Readers are the `safetensors` library's own."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8", torch.int8: "I8",
          torch.int32: "I32", torch.int64: "I64"}


def write_safetensors(path: Path, specs: list[tuple[str, torch.dtype, tuple]], make: Callable[[str], torch.Tensor],
                      metadata: dict[str, str] | None = None) -> int:
    """Write the tensors `specs` = [(name, dtype, shape)], in that order, each as `make(name)` produces it (checked
    against its spec). Returns the bytes of tensor data written."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = torch.empty((), dtype=dtype).element_size() * math.prod(shape)
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, dtype, shape in specs:
            t = make(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{path.name}: {name} is {t.dtype} {tuple(t.shape)}, its header says {dtype} {shape}")
            f.write(t.contiguous().view(torch.uint8).numpy().data)
    return offset


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file (names -> dtype, shape, data_offsets; `__metadata__`)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size))
