"""Runs on the device: the android `.pte` through ExecuTorch's C++ runtime, with numpy in and out and no libtorch.

Loaded by its path (targets/on_device.py), so only the standard library and numpy are imported: the device has neither
torch nor the `mote` package, and the executorch wheel's Python bindings need libtorch. The wheel's lib/ is torch-free
and holds the runtime, the kernels and the XNNPACK backend; our `libmote_pte_runner.so` (kernels/src/
mote_pte_runner.cpp) is a C API over its Module, driven here with ctypes.

`open_runner(artifacts_dir, options)`; options:
    executorch_dir  the executorch package folder on the device (its lib/ and version.py)
    kernels         our kernel library (libmote_executorch_kernels.so) built for the device, or None for a `.pte`
                    exported with `--android-kernels portable`
    runner_lib      libmote_pte_runner.so built for the device
    threads         optional: size of ExecuTorch's threadpool (else its default)
The runner mirrors the host PteRunner (targets/executorch/__init__.py): same methods, same KV cache semantics.
"""
import ctypes
import os
import re

import numpy as np

PTE_NAME = "model.pte"
VERSION_METHOD = "get_mote_kernels_version"   # kernel_library.VERSION_METHOD: the library version a .pte needs
# The wheel's libraries in dependency order. The kernels and the backend register themselves when loaded; loading
# them RTLD_GLOBAL first also lets the runner library find them by soname wherever it was built.
WHEEL_LIBS = ("libexecutorch.so", "libexecutorch_threadpool.so", "libexecutorch_kernels_optimized.so",
              "libexecutorch_kernels_quantized.so", "libexecutorch_backend_xnnpack.so")
# ExecuTorch ScalarType codes (runtime/core/portable_type/scalar_type.h) <-> numpy
DTYPES = {0: np.uint8, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.int64, 5: np.float16, 6: np.float32,
          7: np.float64, 11: np.bool_}
CODES = {np.dtype(t): code for code, t in DTYPES.items()}
MAX_DIMS = 8
ERR_LEN = 1024

_libs = {}   # path -> CDLL: each library is loaded once per process (its registrations are process-wide)


def _load(path):
    if path not in _libs:
        try:
            _libs[path] = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise RuntimeError(f"{path}: cannot load: {e}") from None
    return _libs[path]


def _runner_lib(path):
    lib = _load(path)
    if not hasattr(lib, "_mote_typed"):
        p, c = ctypes.c_void_p, ctypes.c_char_p
        lib.mote_pte_open.restype, lib.mote_pte_open.argtypes = p, [c, c, ctypes.c_size_t]
        lib.mote_pte_close.restype, lib.mote_pte_close.argtypes = None, [p]
        lib.mote_pte_reset.argtypes = [p, c, ctypes.c_size_t]
        lib.mote_pte_method_names.argtypes = [p, c, ctypes.c_size_t]
        lib.mote_pte_execute.argtypes = [p, c, ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                                         ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.POINTER(ctypes.c_int64)),
                                         ctypes.POINTER(p), c, ctypes.c_size_t]
        lib.mote_pte_num_outputs.argtypes = [p]
        lib.mote_pte_output.argtypes = [p, ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int),
                                        ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(p)]
        lib.mote_pte_set_threads.argtypes = [ctypes.c_int]
        lib._mote_typed = True
    return lib


def _wheel_version(executorch_dir):
    """The wheel's version without importing the package (its __init__ imports torch)."""
    try:
        with open(os.path.join(executorch_dir, "version.py")) as f:
            found = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", f.read())
        if found:
            return found.group(1)
    except OSError:
        pass
    site = os.path.dirname(os.path.abspath(executorch_dir))
    for name in sorted(os.listdir(site)):
        if name.startswith("executorch-") and name.endswith(".dist-info"):
            return name[len("executorch-"):-len(".dist-info")]
    return None


class Program:
    """One `.pte` in ExecuTorch's runtime through libmote_pte_runner.so: numpy arrays in, numpy copies out."""

    def __init__(self, lib, path):
        self.lib, self.path = lib, path
        err = ctypes.create_string_buffer(ERR_LEN)
        self.handle = lib.mote_pte_open(path.encode(), err, ERR_LEN)
        if not self.handle:
            raise RuntimeError(err.value.decode())
        size = lib.mote_pte_method_names(self.handle, None, 0)
        names = ctypes.create_string_buffer(max(size, 1))
        lib.mote_pte_method_names(self.handle, names, len(names))
        self.method_names = set(filter(None, names.value.decode().split(",")))

    def reset(self):
        """A new Module over the same file: methods load again into zeroed memory (an empty KV cache)."""
        err = ctypes.create_string_buffer(ERR_LEN)
        if not self.lib.mote_pte_reset(self.handle, err, ERR_LEN):
            raise RuntimeError(err.value.decode())

    def execute(self, method, inputs):
        arrays = [np.ascontiguousarray(a) for a in inputs]   # kept alive here: the runtime reads them in place
        n = len(arrays)
        for a in arrays:
            if a.dtype not in CODES or a.ndim > MAX_DIMS:
                raise ValueError(f"{method}: unsupported input {a.dtype} of {a.ndim} dimensions")
        dtypes = (ctypes.c_int * n)(*[CODES[a.dtype] for a in arrays])
        ndims = (ctypes.c_int * n)(*[a.ndim for a in arrays])
        shapes = [(ctypes.c_int64 * max(a.ndim, 1))(*a.shape) for a in arrays]
        sizes = (ctypes.POINTER(ctypes.c_int64) * n)(*[ctypes.cast(s, ctypes.POINTER(ctypes.c_int64))
                                                       for s in shapes])
        data = (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays])
        err = ctypes.create_string_buffer(ERR_LEN)
        if not self.lib.mote_pte_execute(self.handle, method.encode(), n, dtypes, ndims, sizes, data, err, ERR_LEN):
            raise RuntimeError(err.value.decode())
        return [self._output(i) for i in range(self.lib.mote_pte_num_outputs(self.handle))]

    def _output(self, i):
        dtype, ndim, ptr = ctypes.c_int(), ctypes.c_int(), ctypes.c_void_p()
        shape = (ctypes.c_int64 * MAX_DIMS)()
        if not self.lib.mote_pte_output(self.handle, i, ctypes.byref(dtype), ctypes.byref(ndim), shape,
                                        ctypes.byref(ptr)):
            raise RuntimeError(f"{self.path}: output {i} is neither a tensor nor a scalar")
        if dtype.value not in DTYPES:
            raise RuntimeError(f"{self.path}: output {i} has ExecuTorch dtype {dtype.value}, not read here")
        dims = tuple(shape[:ndim.value])
        t = np.dtype(DTYPES[dtype.value])
        count = int(np.prod(dims, dtype=np.int64))
        if count == 0:
            return np.zeros(dims, t)
        # a copy: the output lives in the method's memory, which the next call overwrites
        buf = (ctypes.c_char * (count * t.itemsize)).from_address(ptr.value)
        return np.frombuffer(buf, dtype=t, count=count).reshape(dims).copy()

    def constant(self, name):
        return self.execute(name, [])[0].item()

    def close(self):
        if self.handle:
            self.lib.mote_pte_close(self.handle)
            self.handle = None

    __del__ = close


class PteRunner:
    """The host PteRunner's protocol in numpy; the KV cache is the decoder method's own mutable buffers."""

    def __init__(self, path, lib, kernels=None, kernels_lib=None, executorch_dir=None):
        self.path, self.kernels, self.kernels_lib, self.executorch_dir = path, kernels, kernels_lib, executorch_dir
        self.program = Program(lib, path)
        self.cache_written = False
        if VERSION_METHOD in self.program.method_names:
            needed = self.program.constant(VERSION_METHOD)
            if kernels_lib is None:
                raise RuntimeError(f"{path}: needs our kernel library (version {needed}): pass options['kernels'], "
                                   "or export with --android-kernels portable")
            found = kernels_lib.mote_kernels_version()
            if found != needed:
                raise RuntimeError(f"{path}: needs mote kernel library version {needed}, {kernels} is version {found}")
        self.max_seq_len = (self.program.constant("get_max_seq_len")
                            if "get_max_seq_len" in self.program.method_names else None)

    def reset(self):
        """An empty KV cache: as on the host, the program is loaded again only when the decoder ran since the last."""
        if self.cache_written:
            self.program.reset()
            self.cache_written = False

    def vision_encoder(self, pixel_values):
        return self.program.execute("vision_encoder", [np.asarray(pixel_values, dtype=np.float32)])[0]

    def token_embedding(self, tokens):
        return self.program.execute("token_embedding", [np.asarray(tokens, dtype=np.int64)])[0]

    def text_decoder(self, embeds, input_pos):
        self.cache_written = True
        return self.program.execute("text_decoder", [np.asarray(embeds, dtype=np.float32),
                                                     np.asarray(input_pos, dtype=np.int64)])[0]

    def constant(self, name):
        return self.program.constant(name)

    def runtime(self):
        out = {"runtime": "executorch", "version": _wheel_version(self.executorch_dir),
               "threads": self.program.lib.mote_pte_set_threads(0)}
        if self.kernels_lib is not None:
            out["kernels_isa"] = self.kernels_lib.mote_kernels_isa().decode()
            out["kernels_version"] = self.kernels_lib.mote_kernels_version()
        return out


def open_runner(artifacts_dir, options):
    executorch_dir = options["executorch_dir"]
    for name in WHEEL_LIBS:
        _load(os.path.join(executorch_dir, "lib", name))
    kernels_lib = None
    if options.get("kernels"):
        # before the runner opens the .pte: a method calling mote:: ops fails to load ("Missing operator") without it
        kernels_lib = _load(options["kernels"])
        kernels_lib.mote_kernels_version.restype = ctypes.c_int
        kernels_lib.mote_kernels_isa.restype = ctypes.c_char_p
    lib = _runner_lib(options["runner_lib"])
    if options.get("threads"):
        lib.mote_pte_set_threads(int(options["threads"]))   # before any method holds the pool
    return PteRunner(os.path.join(artifacts_dir, PTE_NAME), lib, options.get("kernels"), kernels_lib, executorch_dir)
