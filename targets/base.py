"""The target contract: what every backend implements, and what the CLI, the runtime tests and `mote-bench` rely on.

A target receives the three ExportedPrograms after the pass pipeline (the MoTE blocks are `mote::` ops, see
`passes/ops.py`), lowers them into artifacts in `common.out_dir`, and runs those artifacts in its real runtime.

Adding a target (the guide):

1. One folder `targets/<backend>/` whose `__init__.py` defines `TARGET`, an instance of a `Target` subclass:
   - `name` (the `--target` value), `kv_style` (how its programs carry the KV cache: `KVCacheStyle.STATE` for
     mutable buffers, `IO` for explicit inputs/outputs), `tolerance` (its numerics bar, DESIGN.md section 6);
   - `Options`: a frozen dataclass subclassing `TargetOptions`. A field declared with `cli_flag(help=...)` becomes a
     flag of `mote-export --target <name>` (and of no other target); the other fields are for programs (the
     benchmark, tests) and keep their defaults on the command line; `for_benchmark()` gives the options
     `mote-bench` lowers with (default: the defaults);
   - `preflight(options, verify)`: optional, what the lowering (and with `verify`, running the artifact) needs from
     the machine (a cross compiler, a kernel library), checked before the model is read: InputError (exit 2) naming
     what to install;
   - `lower(programs, model, common, options) -> Lowered`: write the artifacts, and read back from what was written
     every fact the report states (`Lowered.facts` is JSON-able data, `notes` / `deviations` are worded from it);
   - `runner(out_dir, max_seq_len, threads=None) -> Runner`: the saved artifacts in the target's runtime (see
     `Runner`), computing with `threads` CPU threads when given (the benchmark's 1 and 2; None: the runtime's default);
   - `routed_expert_storage(out_dir) -> RoutedExpertStorage`: the bytes the artifact spends on routed experts, read
     from the saved files alone (the runtime tests check it against the report);
   - `op_profile(out_dir, max_seq_len, threads, drive) -> list[OpTime] | None`: optional, where the runtime has a
     profiler (`mote-bench --profile` prints its top operators); the default says it has none;
   - `kernel_benchmark(threads, quick)`: optional, where the target ships kernels of its own: each timed alone,
     ternary against fp32 and against the memory-bandwidth bound (`mote-bench` prints them);
   - `fp32_experts_supported`: whether `CommonOptions.fp32_experts` (the benchmark's baseline: the same model with
     float32 routed experts, same runtime) can be lowered;
   - `quantized_bits`: the weight bit widths of `--quantize` (`mote.quantized_linear` / `mote.quantized_embedding`)
     its lowering takes to the runtime's own low-bit kernels; a spec needing others is refused (exit 2), never
     left in fp32;
   - `check_quantization(spec, options)`: optional, why a `--quantize` spec cannot be lowered with these options
     (checked with the command line; exit 2), else None;
   - `timing_caveat`: None where `runner` is the deployment runtime itself; else what its timings measure instead
     (`mote-bench` prints it with the latencies);
   - `device_runner`: where the target has a runtime for phones' CPUs, its `device_runner.py`: the saved artifact in
     that runtime with numpy in and out, importing nothing else (it runs on the device, see targets/on_device.py;
     `mote-export --smoke-test arm64` and runtime_tests/test_arm64_smoke.py run it under qemu). None: no such runtime.
2. One line in `REGISTRY` (`targets/__init__.py`).

Heavy toolchains are imported inside functions, so that importing a target to read its options stays cheap.
Lowering helpers that more than one backend needs live once in `targets/lowering.py`.
Everything else comes for free: the CLI's flags and checks, `runtime_tests/test_targets.py` (one suite,
parametrized over the registry) and `mote-bench --target <name>`.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Callable, ClassVar, Protocol

from mote.export.programs import KVCacheStyle
from mote.export.verify import Tolerance


@dataclasses.dataclass(frozen=True)
class CommonOptions:
    """What every target's lowering is told, whatever the backend."""

    model_dir: Path | None     # the input model directory (None for a model built in memory: tests, benchmarks)
    out_dir: Path              # where `lower` writes (the CLI's staging folder; moved into place once verified)
    max_seq_len: int           # static KV-cache length
    # --quantize (export.quantization.QuantSpec) for the full-precision parts; None: fp32. The programs already hold
    # mote.quantized_linear / mote.quantized_embedding ops where it quantized.
    quantization: object | None = None
    verify: bool = True        # the artifact will be checked in its runtime after lowering
    # The model directory's special token ids (export.tokenizer.SpecialIds); runners that embed them (ExecuTorch's
    # constant methods) take them from here. None: the model config's.
    special_ids: object | None = None
    # The benchmark's baseline: the same model with float32 routed experts (never a deployment artifact).
    fp32_experts: bool = False


def cli_flag(default=False, *, help: str, choices=None):
    """A `TargetOptions` field that is also a command-line flag (`--field-name`) of its target only."""
    return dataclasses.field(default=default, metadata={"cli_help": help, "cli_choices": choices})


@dataclasses.dataclass(frozen=True)
class TargetOptions:
    """Base of each target's options dataclass (see the module docstring)."""

    @classmethod
    def cli_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if "cli_help" in f.metadata]

    @classmethod
    def flag(cls, field: dataclasses.Field) -> str:
        return "--" + field.name.replace("_", "-")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, target: str) -> None:
        fields = cls.cli_fields()
        if not fields:
            return
        group = parser.add_argument_group(f"--target {target} options")
        hints = typing.get_type_hints(cls)
        for f in fields:
            if hints[f.name] is bool:
                group.add_argument(cls.flag(f), dest=f.name, action="store_true", help=f.metadata["cli_help"])
            else:
                group.add_argument(cls.flag(f), dest=f.name, type=hints[f.name], default=f.default,
                                   choices=f.metadata["cli_choices"], help=f.metadata["cli_help"])

    @classmethod
    def for_benchmark(cls):
        """The options `mote-bench` lowers with: the defaults, unless a target skips what the benchmark does not run."""
        return cls()

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        return cls(**{f.name: getattr(args, f.name) for f in cls.cli_fields()})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


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


@dataclasses.dataclass(frozen=True)
class RoutedExpertStorage:
    """The routed experts as stored in a saved artifact, read from its files alone."""

    bytes: int                  # codes and scales
    tensors: int                # how many stored tensors hold them
    where: str                  # which file / program holds them


@dataclasses.dataclass(frozen=True)
class OpTime:
    """One kind of operator in a runtime profiler's record: its total time and how many times it ran."""

    kind: str        # the runtime's own name (an ORT op type, an ExecuTorch kernel, an XNNPACK operator)
    ms: float
    calls: int


@dataclasses.dataclass(frozen=True)
class KernelTime:
    """A target's own kernel timed alone (outside its runtime): the ternary kernel and, where one exists, the fp32
    kernel it replaces, on the same shape and routing."""

    isa: str         # the instruction set the kernel ran on ("avx2", "neon-dotprod", ...)
    threads: int
    op: str          # what was timed, with its shape
    tokens: int
    ternary_ms: float
    fp32_ms: float | None


@dataclasses.dataclass(frozen=True)
class BandwidthBound:
    """The ternary routed-experts kernel at decode on a working set far larger than the caches, against the time the
    bytes it must read take at the measured read bandwidth."""

    isa: str
    threads: int
    shape: str
    bytes_per_call: int
    ms_per_call: float
    read_gb_s: float         # measured on this machine, same thread count
    time_over_bound: float   # ms_per_call / (bytes_per_call / read bandwidth)


def op_times(samples) -> list[OpTime]:
    """(kind, ms) samples, one per operator run, summed by kind; the most expensive first."""
    total: dict[str, list] = {}
    for kind, ms in samples:
        entry = total.setdefault(kind, [0.0, 0])
        entry[0] += ms
        entry[1] += 1
    return sorted((OpTime(k, ms, n) for k, (ms, n) in total.items()), key=lambda t: (-t.ms, t.kind))


def artifact_bytes(path: Path) -> int:
    """An artifact's size: a file's, or the sum of a directory's files (a Core ML `.mlpackage` is a folder)."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


class Runner(Protocol):
    """The three programs as the deployed artifact exposes them; the KV cache lives inside the runner
    (export/generate.py drives any runner the same way as the PyTorch reference's `EagerRunner`)."""

    max_seq_len: int   # the KV cache's length (what generation may not exceed)

    def reset(self) -> None: ...   # an empty KV cache (as a fresh runner's), for a new sequence from position 0
    def vision_encoder(self, pixel_values): ...
    def token_embedding(self, tokens): ...
    def text_decoder(self, embeds, input_pos): ...


class Target:
    name: ClassVar[str]
    kv_style: ClassVar[KVCacheStyle]
    tolerance: Tolerance
    Options: ClassVar[type[TargetOptions]] = TargetOptions
    fp32_experts_supported: ClassVar[bool] = False
    quantized_bits: ClassVar[tuple[int, ...]] = ()
    timing_caveat: ClassVar[str | None] = None
    device_runner: ClassVar[Path | None] = None

    def check_quantization(self, spec, options: TargetOptions) -> str | None:
        """Why `--quantize` `spec` (export.quantization.QuantSpec) cannot be lowered with `options`, or None;
        checked with the command line, before any weight is read. The default accepts what `quantized_bits` allows."""
        return None

    def preflight(self, options: TargetOptions, verify: bool = True) -> None:
        """Check what lowering with `options` (and, with `verify`, running the artifact) needs from this machine
        (compilers, SDKs, kernel libraries) before any work is done; raise InputError (exit 2) naming what to install.
        The default needs nothing."""

    def lower(self, programs: dict, model, common: CommonOptions, options: TargetOptions) -> Lowered:
        raise NotImplementedError  # pragma: no cover - interface

    def tolerance_for(self, lowered: Lowered) -> Tolerance:
        """The numerics bar this lowering is verified at (DESIGN.md section 6): `tolerance`, unless what was lowered
        departs from it, e.g. a kernel the artifact uses quantizes activations (a deviation named in `lowered`):
        then at most the 35 dB of a declared deviation."""
        return self.tolerance

    def runner(self, out_dir: Path, max_seq_len: int, threads: int | None = None) -> Runner:
        """`threads`: CPU threads the runtime computes with (None: its default). A runtime whose threadpool is
        process-wide (ExecuTorch) sets it here for every runner loaded from then on."""
        raise NotImplementedError  # pragma: no cover - interface

    def routed_expert_storage(self, out_dir: Path) -> RoutedExpertStorage:
        raise NotImplementedError  # pragma: no cover - interface

    def op_profile(self, out_dir: Path, max_seq_len: int, threads: int | None,
                   drive: Callable[[Runner], None]) -> list[OpTime] | None:
        """The operators the runtime's own profiler recorded while `drive(runner)` ran a freshly loaded runner, by
        kind (`op_times`); nesting records (a whole method, a delegate call) are left out, so the kinds' times add up
        to at most the profiled time. None: the runtime has no profiler (the default)."""
        return None

    def kernel_benchmark(self, threads: tuple[int, ...], quick: bool) -> tuple[list[KernelTime],
                                                                              list[BandwidthBound]] | None:
        """The target's own low-bit kernels timed alone (`mote-bench` prints them after the whole-decoder tables),
        for each thread count; `quick`: the smoke test's tiny setting. None: the target has no kernels of its own
        (the default)."""
        return None

    def runtime_versions(self) -> dict[str, str]:
        """{package: version} of the toolchain and runtime this target uses (for report.json)."""
        return {}
