"""Our ExecuTorch kernel library (kernels/): where the host build is, loading it, and what it declares.

A `.pte` exported with the fused kernels keeps `mote::routed_experts.out` (and `mote::ternary_linear.out` where a
ternary linear remains); ExecuTorch runs it only in a process whose operator registry has those kernels. The library
registers them from static initialisers when it is loaded into the process that holds ExecuTorch's runtime (the
wheel's `libexecutorch.so`, which the Python bindings share), so every runner loads it before any method.

setup.sh builds it (cmake, against the pinned wheel) into build/et-kernels/ and rebuilds it when its sources change;
`MOTE_EXECUTORCH_KERNELS` points at another build. On a phone the same sources are linked into the app (README).
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

from mote.export.errors import InputError

# The version of the ops' contract the exporter emits (kernels/src/mote_ternary.h: kKernelsVersion). A `.pte` records
# the version it needs as the constant method VERSION_METHOD; a library of another version is refused at load time.
KERNELS_VERSION = 2
VERSION_METHOD = "get_mote_kernels_version"
LIBRARY_NAME = "libmote_executorch_kernels.so"
QUANTIZED_LIBRARY_NAME = "libexecutorch_kernels_quantized.so"   # in the executorch wheel's lib/
REPO = Path(__file__).resolve().parents[2]
BUILD_DIR = REPO / "build" / "et-kernels"
SOURCES = Path(__file__).resolve().parent / "kernels"

_loaded: dict[str, object] = {}


def selftest_path() -> Path:
    """The kernels' self-test and benchmark executable of the host build (kernels/selftest)."""
    return library_path().parent / "mote_kernels_selftest"


def library_path() -> Path:
    override = os.environ.get("MOTE_EXECUTORCH_KERNELS")
    return Path(override) if override else BUILD_DIR / LIBRARY_NAME


def missing_reason() -> str | None:
    """Why the library cannot be loaded here (None: it can)."""
    path = library_path()
    if not sys.platform.startswith("linux"):
        return f"our ExecuTorch kernel library is built for Linux hosts only (this is {sys.platform})"
    if not path.is_file():
        return (f"{path}: our ExecuTorch kernel library is not built; run ./setup.sh (or cmake as in the README), "
                "or export with --android-kernels portable")
    return None


def load() -> ctypes.CDLL:
    """Load the library into this process once (its kernels join ExecuTorch's registry) and check its version.
    InputError (exit 2, one line) if it is missing, fails to load, or implements another version of the ops."""
    path = library_path()
    if str(path) in _loaded:
        return _loaded[str(path)]
    reason = missing_reason()
    if reason:
        raise InputError(reason)
    # ExecuTorch's Python bindings first: they bring the runtime (libexecutorch.so) the library registers into.
    from executorch.extension.pybindings import portable_lib  # noqa: F401

    try:
        lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise InputError(f"{path}: cannot load our ExecuTorch kernel library: {e}") from None
    lib.mote_kernels_version.restype = ctypes.c_int
    lib.mote_kernels_isa.restype = ctypes.c_char_p
    lib.mote_kernels_supported_isas.restype = ctypes.c_char_p
    lib.mote_kernels_use_isa.argtypes = [ctypes.c_char_p]
    found = lib.mote_kernels_version()
    if found != KERNELS_VERSION:
        raise InputError(f"{path}: kernel library version {found}, this exporter needs {KERNELS_VERSION}; "
                         "rebuild it with ./setup.sh")
    _loaded[str(path)] = lib
    return lib


def load_quantized_kernels() -> ctypes.CDLL:
    """ExecuTorch's quantized kernels library from the wheel (`quantized_decomposed::embedding_byte.out`, ...; the
    `quantized_ops_lib` an app links), loaded once: the Python runtime registers none of them by itself."""
    from executorch.extension.pybindings import portable_lib

    path = Path(portable_lib.__file__).resolve().parents[2] / "lib" / QUANTIZED_LIBRARY_NAME
    if str(path) not in _loaded:
        try:
            _loaded[str(path)] = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise InputError(f"{path}: cannot load ExecuTorch's quantized kernels: {e}") from None
    return _loaded[str(path)]


def isa() -> str:
    """The instruction set the loaded library's kernels run on this CPU ("avx2", "neon-dotprod", "scalar", ...)."""
    return load().mote_kernels_isa().decode()


def supported_isas() -> list[str]:
    """The instruction sets this CPU runs, as the library names them (scalar first, best last)."""
    return load().mote_kernels_supported_isas().decode().split(",")


def use_isa(name: str) -> None:
    """Run the kernels of this process on instruction set `name` (tests and the benchmark compare them)."""
    if not load().mote_kernels_use_isa(name.encode()):
        raise ValueError(f"this CPU does not run the {name} kernels (it runs {', '.join(supported_isas())})")


def require_version(needed: int | None, pte: Path) -> None:
    """A `.pte` that needs kernels (`needed`: its VERSION_METHOD) runs only with the library of that version."""
    if needed is not None and needed != KERNELS_VERSION:
        raise InputError(f"{pte}: needs mote kernel library version {needed}, this build has {KERNELS_VERSION}")
