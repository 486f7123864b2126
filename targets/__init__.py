"""Target registry. Every backend is one folder with a module-level `TARGET` implementing `Target`.

A target only sees ExportedPrograms whose MoTE parts are already `mote::` ops (the pass pipeline ran); it lowers
them, writes its artifacts and gives back a runner over its real runtime for the numerics check.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import logging
import warnings
from pathlib import Path

from mote.export.programs import KVCacheStyle
from mote.export.verify import Tolerance

# --target name -> module holding TARGET. Imported lazily: a target's toolchain loads only when it is used.
REGISTRY = {
    "android": "mote.targets.executorch",
    "onnx": "mote.targets.onnx",
}


@dataclasses.dataclass
class Lowered:
    """What `Target.lower` wrote: artifact paths and facts for report.json."""

    artifacts: list[Path]
    routed_expert_weights: int            # number of routed-expert weights (trits) in the model
    routed_expert_bytes: int              # bytes the artifact spends on them, scales included
    deviations: list[str] = dataclasses.field(default_factory=list)   # kernels that depart from the reference
    notes: list[str] = dataclasses.field(default_factory=list)
    # What deviations and notes are worded from, read back from the artifact / the lowered program (JSON-able).
    facts: dict = dataclasses.field(default_factory=dict)

    @property
    def routed_expert_bits_per_weight(self) -> float:
        return self.routed_expert_bytes * 8 / max(self.routed_expert_weights, 1)


class Target:
    name: str
    kv_style: KVCacheStyle
    tolerance: Tolerance

    def lower(self, programs, model, out_dir: Path, options: dict) -> Lowered:  # pragma: no cover - interface
        raise NotImplementedError

    def runner(self, out_dir: Path, model, max_seq_len: int, options: dict):  # pragma: no cover - interface
        """A runner (see export.generate) executing the saved artifacts in the target's runtime."""
        raise NotImplementedError


@contextlib.contextmanager
def quiet_toolchain():
    """Exporters print progress, warnings and log lines on every call; the CLI shows its own lines instead."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def get_target(name: str) -> Target:
    return importlib.import_module(REGISTRY[name]).TARGET
