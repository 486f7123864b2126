"""The three programs' libraries of one architecture in `tvm.relax.VirtualMachine`, numpy in and out: what runs on a
device (targets/on_device.py loads this file by its path there, so it imports only the standard library, numpy and
tvm), and the core of the host's `VmRunner` (runner.py).

Each program's library (`<program>.<arch>.so`) is loaded with its params file (the weights, passed as `main`'s
trailing arguments, the same file for every architecture); the decoder's KV cache lives here as TVM tensors that the
call updates in place.
"""
from __future__ import annotations

import json
import os

import numpy as np

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "U8": np.uint8, "I8": np.int8, "I32": np.int32,
                      "I64": np.int64}


def read_arrays(path, names):
    """The tensors `names` of a safetensors file as numpy arrays, one at a time, each read with a plain file read:
    unlike a memory map, nothing of the file stays resident once the caller has copied or dropped an array.
    (The header is read here rather than with export.tensor_file.read_header: the device has no `mote` package.)"""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    for name in names:
        info = header[name]
        begin, end = info["data_offsets"]
        dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
        yield np.fromfile(path, dtype=dtype, count=(end - begin) // dtype.itemsize,
                          offset=8 + size + begin).reshape(info["shape"])


def load_params(path, names):
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


def configure_threads(threads):
    """TVM's thread pool is process-wide: `threads` workers from now on (None: leave it as it is).
    config_threadpool(1, n): the "big" cores, all of them on a machine without a big.LITTLE split."""
    import tvm

    if threads is not None:
        tvm.get_global_func("runtime.config_threadpool")(1, threads)


class Program:
    """One library + its weights."""

    def __init__(self, out_dir, name, entry, arch):
        import tvm
        from tvm import relax

        library = os.path.join(str(out_dir), f"{name}.{arch}.so")
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(library), tvm.cpu())
        self.weights = load_params(os.path.join(str(out_dir), entry["params_file"]), entry["weights"])
        self.entry = entry

    def __call__(self, *inputs):
        return self.vm["main"](*inputs, *self.weights)


class VmPrograms:
    def __init__(self, out_dir, arch, max_seq_len=None, threads=None):
        configure_threads(threads)
        with open(os.path.join(str(out_dir), "manifest.json")) as f:
            self.manifest = json.load(f)
        if max_seq_len is not None and max_seq_len > self.manifest["max_seq_len"]:
            raise ValueError(f"tvm: a runner for {max_seq_len} positions on a KV cache of "
                             f"{self.manifest['max_seq_len']}")
        self.arch = arch
        self.programs = {name: Program(out_dir, name, entry, arch)
                         for name, entry in self.manifest["programs"].items()}
        self.max_seq_len = max_seq_len or self.manifest["max_seq_len"]
        decoder = self.programs["text_decoder"].entry
        self.cache_specs = [i for i in decoder["inputs"] if i["name"] in decoder["kv_cache"]["inputs"]]
        self.reset()

    def reset(self):
        import tvm

        self.caches = [tvm.runtime.tensor(np.zeros(s["shape"], dtype=s["dtype"])) for s in self.cache_specs]

    @staticmethod
    def _tensor(array, dtype):
        import tvm

        return tvm.runtime.tensor(np.ascontiguousarray(array, dtype=dtype))

    def vision_encoder(self, pixel_values):
        return self.programs["vision_encoder"](self._tensor(pixel_values, np.float32))[0].numpy()

    def token_embedding(self, tokens):
        return self.programs["token_embedding"](self._tensor(tokens, np.int64))[0].numpy()

    def text_decoder(self, embeds, input_pos):
        end = int(np.asarray(input_pos).reshape(-1)[0]) + embeds.shape[1]
        if end > self.max_seq_len:   # the cache-row kernel does not check its positions
            raise ValueError(f"tvm: positions up to {end - 1} do not fit the KV cache of {self.max_seq_len}")
        out = self.programs["text_decoder"](self._tensor(embeds, np.float32), self._tensor(input_pos, np.int64),
                                            *self.caches)
        # outputs 1.. are the caches, updated in place (the same tensors as self.caches)
        self.caches = [out[1 + i] for i in range(len(self.caches))]
        return out[0].numpy()

    def runtime(self):
        import tvm

        build = self.manifest["architectures"][self.arch]
        return {"runtime": "tvm", "version": tvm.__version__, "library_arch": self.arch,
                "library_target": build.get("description")}


def open_runner(artifact_dir, options):
    return VmPrograms(artifact_dir, options.get("tvm_arch", "aarch64"), threads=options.get("threads"))
