"""Target registry. Every backend is one folder with a module-level `TARGET` implementing the contract of
`targets/base.py` (read its docstring for the guide to adding one): adding a target is that folder + one line here.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import logging
import warnings

from .base import (BandwidthBound, CommonOptions, KernelTime, Lowered, OpTime, RoutedExpertStorage,  # noqa: F401
                   Runner, Target, TargetOptions, artifact_bytes, cli_flag, op_times)

# --target name -> module holding TARGET. Imported lazily: a target's toolchain loads only when it is used.
REGISTRY = {
    "android": "mote.targets.executorch",
    "ios": "mote.targets.coreml",
    "onnx": "mote.targets.onnx",
    "tvm": "mote.targets.tvm",
}


@contextlib.contextmanager
def quiet_toolchain():
    """Exporters print progress, warnings and log lines on every call; the CLI shows its own lines instead (and
    captures what C++ code writes to the file descriptors, tools/console.py). Loggers that inherit the root's level
    (the toolchains') are raised to ERROR; ours ("mote") sets its own level and still speaks."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):   # progress bars (coremltools' tqdm)
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def get_target(name: str) -> Target:
    return importlib.import_module(REGISTRY[name]).TARGET
