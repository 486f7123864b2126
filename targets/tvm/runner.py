"""The host build of the three programs in `tvm.relax.VirtualMachine` (what the export verifies with).

Each program's library is loaded with its params file (the weights, passed as `main`'s trailing arguments); the
decoder's KV cache lives here as TVM tensors that the call updates in place.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mote.export.tensor_file import read_arrays

from .build import HOST
from .report import library_path, load_manifest


def configure_threads(threads: int | None) -> None:
    """TVM's thread pool is process-wide: `threads` workers from now on (None: leave it as it is; its size is set
    in targets/tvm/__init__.py). config_threadpool(1, n): the "big" cores, all of them on a machine without a
    big.LITTLE split."""
    import tvm

    if threads is not None:
        tvm.get_global_func("runtime.config_threadpool")(1, threads)


def load_params(path: Path, names: list[str]) -> list:
    """The weights `names` of a params file as TVM tensors, read tensor by tensor with plain file reads (a memory
    map would keep every page it touched resident beside TVM's copy: twice the weights at once). TVM takes an array
    without a copy only when it is 64-byte aligned (DLPack); otherwise it copies it, one tensor at a time."""
    import tvm

    out = []
    for array in read_arrays(path, names):
        try:
            out.append(tvm.runtime.from_dlpack(array))
        except (RuntimeError, BufferError):     # not 64-byte aligned: TVM takes a copy
            out.append(tvm.runtime.tensor(array))
    return out


class Program:
    """One library + its weights."""

    def __init__(self, out_dir: Path, name: str, entry: dict):
        import tvm
        from tvm import relax

        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(library_path(out_dir, name, HOST.name))),
                                       tvm.cpu())
        self.weights = load_params(Path(out_dir) / entry["params_file"], entry["weights"])
        self.entry = entry

    def __call__(self, *inputs):
        return self.vm["main"](*inputs, *self.weights)


def check_host() -> None:
    """The host build is x86-64-v3 (AVX2): on another machine it cannot load or would stop on an illegal
    instruction, so say so in one line (exit 2)."""
    import platform

    from mote.export.errors import InputError

    cpuinfo = Path("/proc/cpuinfo")
    avx2 = " avx2" in cpuinfo.read_text() if cpuinfo.exists() else False
    if platform.machine() != "x86_64" or not avx2:
        raise InputError(f"tvm: the library this machine runs is the {HOST.description} build; this is a "
                         f"{platform.machine()} machine{'' if avx2 else ' without AVX2'}: export with --no-verify "
                         "here, or on an x86-64 machine with AVX2")


class VmRunner:
    def __init__(self, out_dir: Path, max_seq_len: int, threads: int | None = None):
        configure_threads(threads)
        manifest = load_manifest(out_dir)
        if max_seq_len > manifest["max_seq_len"]:
            raise ValueError(f"tvm: a runner for {max_seq_len} positions on a KV cache of {manifest['max_seq_len']}")
        self.programs = {name: Program(out_dir, name, entry) for name, entry in manifest["programs"].items()}
        self.max_seq_len = max_seq_len
        decoder = self.programs["text_decoder"].entry
        self.cache_specs = [i for i in decoder["inputs"] if i["name"] in decoder["kv_cache"]["inputs"]]
        self.reset()

    def reset(self):
        import tvm

        self.caches = [tvm.runtime.tensor(np.zeros(s["shape"], dtype=s["dtype"])) for s in self.cache_specs]

    @staticmethod
    def _tensor(t, dtype):
        import tvm

        return tvm.runtime.tensor(np.ascontiguousarray(t.numpy(), dtype=dtype))

    @staticmethod
    def _torch(out):
        import torch

        return torch.from_numpy(out.numpy())

    def vision_encoder(self, pixel_values):
        return self._torch(self.programs["vision_encoder"](self._tensor(pixel_values, np.float32))[0])

    def token_embedding(self, tokens):
        return self._torch(self.programs["token_embedding"](self._tensor(tokens, np.int64))[0])

    def text_decoder(self, embeds, input_pos):
        end = int(input_pos.reshape(-1)[0]) + embeds.shape[1]
        if end > self.max_seq_len:   # the cache-row kernel does not check its positions
            raise ValueError(f"tvm: positions up to {end - 1} do not fit the KV cache of {self.max_seq_len}")
        out = self.programs["text_decoder"](self._tensor(embeds, np.float32), self._tensor(input_pos, np.int64),
                                            *self.caches)
        # outputs 1.. are the caches, updated in place (the same tensors as self.caches)
        self.caches = [out[1 + i] for i in range(len(self.caches))]
        return self._torch(out[0])
