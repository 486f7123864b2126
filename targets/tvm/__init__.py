"""`--target tvm`: TVM Relax, one shared library per program and architecture, our own TensorIR kernels.

Artifacts, per program (`vision_encoder`, `token_embedding`, `text_decoder`):
- `<program>.aarch64.so`: the phone build (`--tvm-arch`: armv8.2-a+dotprod by default, or armv8-a), linked with
  `aarch64-linux-gnu-gcc` (a glibc build); with `TVM_NDK_CC` set (an Android NDK clang), also
  `<program>.android-arm64.so`;
- `<program>.x86_64.so`: the host build, which the export verifies in `tvm.relax.VirtualMachine`;
- `<program>.safetensors`: the weights, once for every architecture: the libraries hold code only, and `main` takes
  the weights as trailing arguments in the order `manifest.json` lists them;
- `manifest.json`: how to call each program: its inputs (shapes, dtypes, the symbolic T and its bounds), the weight
  order, outputs, and the KV cache (`k_caches_i` / `v_caches_i` [1, kv heads, max_seq_len, head dim] float32,
  updated in place by the call; the decoder also returns them, as outputs 1..).

The decoder takes a dynamic T in [1, max_seq_len] (one symbolic variable): one program prefills and decodes. The
`mote::` ops become calls of our TensorIR kernels (`kernels.py`, see `convert.py`): the routed experts' 2-bit codes
stay 2-bit in the params and the kernel reads only the chosen experts' codes; every linear runs our GEMV / GEMM.
With `--quantize`, the quantized linears and the embedding stay int8, or int4 packed two per byte, in the params,
and our kernels dequantize them in their inner loop (weight-only, fp32 activations: the reference's semantics).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from mote.export import progress
from mote.export.memory import release_memory
from mote.export.programs import KVCacheStyle
from mote.export.verify import Tolerance
from mote.targets import CommonOptions, Lowered, RoutedExpertStorage, Target, TargetOptions, cli_flag, quiet_toolchain
from mote.targets.lowering import routed_expert_weights, use_float_experts

from .build import AARCH64, DEFAULT_AARCH64, HOST, Arch, check_compiler
from .report import (MANIFEST, library_path, params_path, read_back, render_deviations, render_notes,
                     routed_expert_bytes)

# TVM sizes its thread pool once per process, at its first use, to TVM_NUM_THREADS (default: half the logical CPUs,
# 1 on this 2-CPU machine); `runtime.config_threadpool` can then only choose fewer. Every CPU, so that a runner can
# be given 1 .. cpu_count threads (device_runner.configure_threads); a user's own setting is kept.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))


@dataclasses.dataclass(frozen=True)
class TvmOptions(TargetOptions):
    tvm_arch: str = cli_flag(DEFAULT_AARCH64, choices=tuple(AARCH64),
                             help="the aarch64 libraries' instruction set: armv8.2-a+dotprod (default; every Arm core "
                                  "since Cortex-A55/A75, the ternary kernels use sdot) or armv8-a (older cores)")
    phone_builds: bool = True   # the aarch64 (and Android) libraries; the benchmark runs the host build only

    @classmethod
    def for_benchmark(cls):
        return cls(phone_builds=False)


def android_arch(base: Arch) -> Arch | None:
    """The Android build, when TVM_NDK_CC names an NDK clang (e.g. .../aarch64-linux-android28-clang)."""
    compiler = os.environ.get("TVM_NDK_CC")
    if not compiler:
        return None
    return dataclasses.replace(base, name="android-arm64", triple="aarch64-linux-android", compiler=compiler,
                               description=base.description.replace("linux", "android (NDK)"))


def arches_for(options: TvmOptions) -> list[Arch]:
    """The builds, the host's (verified here) first. Raises InputError when a compiler is missing."""
    arches = [HOST]
    if options.phone_builds:
        phone = AARCH64[options.tvm_arch]
        arches += [phone] + [a for a in [android_arch(phone)] if a is not None]
    for arch in arches:
        check_compiler(arch)
    return arches


def lower_program(ep, name: str, arches: list[Arch], out_dir: Path) -> dict:
    """One program -> its params file and one library per architecture; returns its manifest entry."""
    from .build import build_library, import_program, lift_weights, signature, write_params
    from .convert import to_kernel_layouts

    to_kernel_layouts(ep)
    entry = None
    for arch in arches:
        with quiet_toolchain():
            mod, names = import_program(ep, arch.target())
            mod, weights = lift_weights(mod, names)
            if entry is None:
                entry = signature(mod, name, [w for w, _ in weights], params_path(out_dir, name).name)
                write_params(params_path(out_dir, name), weights)
            elif [w for w, _ in weights] != entry["weights"]:
                raise RuntimeError(f"tvm: {name}: the {arch.name} build orders its weights differently")
            del weights
            build_library(mod, arch, library_path(out_dir, name, arch.name))
        del mod
        release_memory()
    return entry


class TvmTarget(Target):
    name = "tvm"
    kv_style = KVCacheStyle.IO
    tolerance = Tolerance(min_sqnr_db=60.0)   # fp32 programs, integer-exact ternary kernels (DESIGN.md section 6)
    Options = TvmOptions
    fp32_experts_supported = True
    quantized_bits = (4, 8)    # kernels.quantized_linear / quantized_embedding
    device_runner = Path(__file__).with_name("device_runner.py")   # the aarch64 libraries in aarch64 TVM

    def preflight(self, options: TvmOptions, verify: bool = True) -> None:
        arches_for(options)

    def lower(self, programs, model, common: CommonOptions, options: TvmOptions = TvmOptions()) -> Lowered:
        arches = arches_for(options)
        weights = routed_expert_weights(programs["text_decoder"])
        if common.fp32_experts:
            use_float_experts(programs["text_decoder"])
        manifest = {"format": "mote-tvm/1", "max_seq_len": common.max_seq_len,
                    "architectures": {a.name: {"triple": a.triple, "llvm_target": dict(a.attrs),
                                               "description": a.description} for a in arches},
                    "programs": {}}
        for i, (name, ep) in enumerate(programs.items()):
            progress.tick(f"{name}: Relax import and {len(arches)} builds", i, len(programs))
            manifest["programs"][name] = lower_program(ep, name, arches, common.out_dir)
        (common.out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        facts = read_back(common.out_dir)
        artifacts = [common.out_dir / MANIFEST] + [common.out_dir / f for f in facts["files"]]
        return Lowered(artifacts=artifacts, routed_expert_weights=weights,
                       routed_expert_bytes=facts["routed_experts"]["bytes"], deviations=render_deviations(facts),
                       notes=render_notes(facts, weights), facts=facts)

    def runner(self, out_dir: Path, max_seq_len: int, threads: int | None = None):
        from .runner import VmRunner, check_host
        check_host()

        return VmRunner(Path(out_dir), max_seq_len, threads=threads)

    def routed_expert_storage(self, out_dir: Path) -> RoutedExpertStorage:
        found = routed_expert_bytes(Path(out_dir))
        return RoutedExpertStorage(bytes=found["bytes"], tensors=found["tensors"], where=found["where"])

    def runtime_versions(self) -> dict[str, str]:
        from importlib.metadata import version

        return {"apache-tvm": version("apache-tvm"),
                "runtime": f"tvm.relax.VirtualMachine ({HOST.name} build)"}


TARGET = TvmTarget()
