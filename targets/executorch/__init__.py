"""`--target android`: one ExecuTorch `.pte` with LLaVA-style methods, routed experts kept as 2-bit codes.

Methods: `vision_encoder`, `token_embedding`, `text_decoder` (KV cache in mutable buffers, dynamic T), plus the
constant methods ExecuTorch's LLM runners read (`get_max_seq_len`, `get_max_context_len`, `use_kv_cache`,
`enable_dynamic_shape`, `get_bos_id`, `get_eos_ids`, `get_vocab_size`, `get_n_layers`, `use_sdpa_with_kv_cache`).

Lowering (decompose.py): everything XNNPACK supports (attention, shared expert, router, projector, vision tower
linears) is delegated to XNNPACK in fp32. The routed experts run in our own kernel library (kernels/, loaded by
every runner: kernel_library.py) as one `mote::routed_experts.out` call per block on the 2-bit codes; with
`--android-kernels portable` they are portable ATen ops that gather only the selected experts' packed bytes instead.

`--quantize` (quantized.py): each quantized linear becomes one call of our kernel library's weight-only linear on
the low-bit weights (fp32 activations: the reference's numerics); with `--int8-activations` one of XNNPACK's
dynamically quantized fully-connected operators instead (qd8-f32-qb4w for int4 groups, qd8-f32-qc8w for int8 per
channel: int8 per-token activations, a declared deviation verified at 35 dB). The quantized embedding is ExecuTorch's
embedding_byte / embedding_4bit kernel (its quantized kernels library, which every runner loads).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import subprocess
import tempfile
from pathlib import Path

from mote.export import progress
from mote.export.programs import KVCacheStyle
from mote.export.verify import Tolerance
from mote.targets import (BandwidthBound, CommonOptions, KernelTime, Lowered, OpTime, RoutedExpertStorage, Target,
                          TargetOptions, cli_flag, op_times, quiet_toolchain)
from mote.targets.lowering import routed_expert_weights, use_float_experts

from . import kernel_library
from .decompose import DECOMPOSITIONS
from .partitioning import linear_partitioning
from .quantized import lower_quantized_ops
from .report import pte_routed_expert_storage, read_back, render_deviations, render_notes, routed_constants

PTE_NAME = "model.pte"


def constant_methods(model, max_seq_len: int, special_ids=None, kernels: str = "fused") -> dict:
    """The constant methods ExecuTorch's LLM runners read. `special_ids` (export.tokenizer.SpecialIds, resolved from
    the model directory; None: the model config's ids): a bos / eos nobody knows is left out, and the runner then
    takes its tokenizer's. A `.pte` that calls our kernel library records the library version it needs."""
    from mote.export.tokenizer import config_special_ids

    cfg = model.config
    special = special_ids if special_ids is not None else config_special_ids(cfg)
    methods = {
        "get_max_seq_len": max_seq_len,
        "get_max_context_len": max_seq_len,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": True,
        "get_vocab_size": cfg.vocab_size,
        "get_n_layers": cfg.num_hidden_layers,
    }
    if special.bos is not None:
        methods["get_bos_id"] = special.bos
    if special.eos:
        methods["get_eos_ids"] = list(special.eos)
    if kernels == "fused":
        methods[kernel_library.VERSION_METHOD] = kernel_library.KERNELS_VERSION
    return methods


def to_pte(programs: dict, model, max_seq_len: int, float_experts: bool = False, special_ids=None,
           fast_partitioning: bool = True, kernels: str = "fused", int8_activations: bool = False):
    """ExportedPrograms (after the pass pipeline) -> ExecuTorch program manager.

    `float_experts` builds the benchmark's fp32 baseline: the same routing over float32 expert weights (fused: our
    library's fp32 kernel; portable: the same gather structure).
    `fast_partitioning=False` runs ExecuTorch's delegation exactly as shipped (see partitioning.py; tests compare).
    `kernels`: "fused" (our kernel library runs the routed experts) or "portable" (ATen ops only), see decompose.py.
    `int8_activations`: --quantize's linears as XNNPACK's dynamically quantized operators (else our weight-only kernel).
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    if float_experts:
        for ep in programs.values():
            use_float_experts(ep)
    n = len(programs)
    steps = 2 * n + 2   # decompose and partition each program, emit, write (ExecuTorchTarget.lower)
    with quiet_toolchain(), (linear_partitioning() if fast_partitioning else contextlib.nullcontext()):
        decomposed = {}
        for i, (name, ep) in enumerate(programs.items()):
            progress.tick(f"{name}: mote:: ops to ATen", i, steps)
            decomposed[name] = ep.run_decompositions(DECOMPOSITIONS[kernels])
            lower_quantized_ops(decomposed[name], name, int8_activations)
        edge = to_edge_transform_and_lower(
            decomposed, partitioner=[_reporting(XnnpackPartitioner(), n, steps)],
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
            constant_methods=constant_methods(model, max_seq_len, special_ids, kernels))
        progress.tick("emitting the ExecuTorch program", 2 * n, steps)
        return edge, edge.to_executorch(ExecutorchBackendConfig(
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass()))


def _reporting(partitioner, n: int, steps: int):
    """`partitioner`, ticking progress as ExecuTorch calls it on each method (it is not told the method's name)."""
    partition, calls = partitioner.partition, iter(range(n))

    def reporting_partition(exported_program):
        i = next(calls, n - 1)
        progress.tick(f"XNNPACK partitioning, method {i + 1}/{n}", n + i, steps)
        return partition(exported_program)

    partitioner.partition = reporting_partition
    return partitioner


def delegation_summary(edge) -> dict:
    """Per method: how many XNNPACK delegate calls and which ops stay on ExecuTorch's portable kernels."""
    out = {}
    for name in edge.methods:
        gm = edge.exported_program(name).graph_module
        delegates, portable = 0, {}
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            target = str(getattr(node.target, "__name__", node.target))
            if "call_delegate" in target:
                delegates += 1
            elif not target.startswith(("getitem", "sym_size", "_assert")):
                key = target.split(".")[0] if target.startswith("aten") else target
                portable[key] = portable.get(key, 0) + 1
        out[name] = {"xnnpack_delegates": delegates, "portable_ops": dict(sorted(portable.items()))}
    return out


def require_delegated(delegation: dict) -> None:
    """The rewritten quantized linears (torchao's *_affine ops) must all be inside XNNPACK's delegates: ExecuTorch has
    no portable kernels for torchao's ops, and a float linear left behind would not be low-bit."""
    left = {f"{m}: {op} x{n}" for m, d in delegation.items() for op, n in d["portable_ops"].items()
            if "_affine" in op or op.split(".")[0] in ("linear", "addmm", "mm")}
    if left:
        raise RuntimeError(f"android: XNNPACK did not take every quantized linear ({', '.join(sorted(left))} left "
                           "outside its delegates)")


def forget_lowered_graphs() -> None:
    """Drop the references ExecuTorch 1.5.1 keeps to the last lowering's graphs at module level: the
    `is_same_node` lru_cache of exir.backend.utils (keyed by fx Nodes) and each partitioner's `WhyNoPartition`
    logger (its last Node). Through the nodes' graphs they keep every ExportedProgram of the lowering alive, and
    with them all of the model's weights (2 GB at the Qwen2.5-0.5B shape) while the artifact is verified."""
    import sys

    from executorch.exir.backend import utils as backend_utils

    backend_utils.is_same_node.cache_clear()
    for name, module in list(sys.modules.items()):
        if name.startswith("executorch.") and module is not None:
            for value in list(vars(module).values()):
                if isinstance(value, backend_utils.WhyNoPartition):
                    value.node = None


@dataclasses.dataclass(frozen=True)
class ExecuTorchOptions(TargetOptions):
    android_kernels: str = cli_flag(
        "fused", choices=tuple(DECOMPOSITIONS),
        help="fused (default): the routed experts run in our ExecuTorch kernel library, which the app links (README); "
             "portable: ATen ops only, for runtimes that cannot link custom kernels (several times slower)")
    int8_activations: bool = cli_flag(
        help="--quantize's linears as XNNPACK's qd8 operators, which quantize their input to int8 per token (faster "
             "on 2+ threads; a declared deviation verified at 35 dB) instead of our weight-only kernel; needed with "
             "--android-kernels portable")
    # ExecuTorch's delegation exactly as shipped when False (slow at real sizes; tests compare the two).
    fast_partitioning: bool = True


class ExecuTorchTarget(Target):
    name = "android"
    kv_style = KVCacheStyle.STATE
    tolerance = Tolerance(min_sqnr_db=60.0)   # exact reference semantics in fp32
    Options = ExecuTorchOptions
    fp32_experts_supported = True
    quantized_bits = (4, 8)
    # the .pte in the aarch64 wheel's runtime with our kernels cross-built for aarch64 (no torch on the device)
    device_runner = Path(__file__).with_name("device_runner.py")

    def check_quantization(self, spec, options: ExecuTorchOptions) -> str | None:
        if options.android_kernels == "portable" and not options.int8_activations:
            return ("--android-kernels portable runs quantized linears only as XNNPACK's int8-activation operators: "
                    "add --int8-activations, or use the (default) fused kernels")
        return None

    def preflight(self, options: ExecuTorchOptions = ExecuTorchOptions(), verify: bool = True) -> None:
        if options.android_kernels == "fused" and verify:
            kernel_library.load()     # verification runs the .pte: the library must load here (exit 2 if not)

    def lower(self, programs, model, common: CommonOptions, options: ExecuTorchOptions = ExecuTorchOptions()) -> Lowered:
        weights = routed_expert_weights(programs["text_decoder"])
        edge, et = to_pte(programs, model, common.max_seq_len, common.fp32_experts, common.special_ids,
                          options.fast_partitioning, options.android_kernels, options.int8_activations)
        path = common.out_dir / PTE_NAME
        progress.tick(f"writing {PTE_NAME}", 2 * len(programs) + 1, 2 * len(programs) + 2)
        # Streamed piece by piece: `et.buffer` would first join the whole program (2.8 GB at the 0.5B shape) in memory.
        # Constants stay in the .pte's own segments (ExecuTorch's default): one file that the runtime maps from
        # disk, which is what our runner, mote-run and ExecuTorch's LLM runners load; no separate .ptd to ship.
        with open(path, "wb") as f:
            et.write_to_file(f)
        # Every statement of the report is read back from the written .pte and the program it was emitted from.
        facts = read_back(path, et, routed_constants(programs["text_decoder"]))
        facts["delegation"] = delegation_summary(edge)
        del edge, et
        forget_lowered_graphs()
        require_delegated(facts["delegation"])
        return Lowered(artifacts=[path], routed_expert_weights=weights,
                       routed_expert_bytes=facts["routed_experts"]["bytes"], deviations=render_deviations(facts),
                       notes=render_notes(facts, weights), facts=facts)

    def tolerance_for(self, lowered: Lowered) -> Tolerance:
        """XNNPACK's dynamically quantized linears (int8 per-token activations, `--quantize`) are a declared
        deviation (DESIGN.md section 6): 35 dB and identical greedy tokens; else the fp32 bar."""
        if any(kind.startswith("qd8-") for kind in lowered.facts.get("quantized_linears", {})):
            return Tolerance(min_sqnr_db=35.0)
        return self.tolerance

    def runner(self, out_dir: Path, max_seq_len: int, threads: int | None = None) -> "PteRunner":
        return PteRunner(Path(out_dir) / PTE_NAME, max_seq_len, threads)

    def op_profile(self, out_dir: Path, max_seq_len: int, threads: int | None, drive) -> list[OpTime]:
        """ExecuTorch's ETDump (the wheel's runtime records every kernel call, and XNNPACK's operators inside its
        delegate calls), read with the devtools' Inspector; XNNPACK's per-instance suffixes (" #3") are dropped."""
        from executorch.devtools import Inspector

        with tempfile.TemporaryDirectory(prefix="mote-etdump-") as tmp:
            runner = PteRunner(Path(out_dir) / PTE_NAME, max_seq_len, threads, etdump=True)
            drive(runner)
            etdump = Path(tmp) / "run.etdp"
            runner.program.write_etdump_result_to_file(str(etdump), str(Path(tmp) / "debug.bin"))
            with quiet_toolchain():
                inspector = Inspector(etdump_path=str(etdump))
        # Inspector times are in ms; each event holds one duration per run of its instruction
        return op_times((re.sub(r" #\d+$", "", e.name), ms) for block in inspector.event_blocks
                        if block.name == "Execute" for e in block.events
                        if e.name not in ETDUMP_NESTING and e.perf_data is not None for ms in e.perf_data.raw)

    def routed_expert_storage(self, out_dir: Path) -> RoutedExpertStorage:
        return pte_routed_expert_storage(Path(out_dir) / PTE_NAME)

    def kernel_benchmark(self, threads, quick):
        """Our kernel library's own benchmark (kernels/selftest, `--bench`): on every instruction set this CPU runs,
        the routed experts of a top-1 block (ternary vs the same experts in fp32, our fp32 kernel) and one ternary
        linear, at d=1024 and expert width 1536 (`quick`: 128 and 256); then the routed experts at decode over far
        more expert bytes than the caches hold, against the measured read bandwidth."""
        times, bounds = [], []
        for n in threads:
            argv = [str(kernel_library.selftest_path()), "--bench", "--threads", str(n)]
            argv += ["--quick"] if quick else []
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{argv[0]} --bench failed: {done.stderr.strip()[-500:]}")
            run = json.loads(done.stdout)
            for isa, ops in run["isa"].items():
                for tokens_key, ms in ops["routed_experts_ms"].items():
                    times.append(KernelTime(isa, n, f"routed_experts ({run['shape']})", int(tokens_key[1:]), ms,
                                            ops["routed_experts_float_ms"][tokens_key]))
                for tokens_key, ms in ops["ternary_linear_ms"].items():
                    times.append(KernelTime(isa, n, f"ternary_linear {run['linear_shape']}", int(tokens_key[1:]), ms,
                                            None))
            for isa, b in run["dram_bound"].items():
                bounds.append(BandwidthBound(isa, n, b["shape"], b["bytes_per_call"], b["ms_per_call"],
                                             run["read_bandwidth_gbps"], b["time_over_bound"]))
        return times, bounds

    def runtime_versions(self) -> dict[str, str]:
        from importlib.metadata import version

        return {"executorch": version("executorch")}


def set_threads(threads: int) -> None:
    """Size ExecuTorch's threadpool (XNNPACK's and the portable kernels' parallel_for). It is process-wide and
    resizing replaces it ("unsafe" in ExecuTorch's name: methods loaded before may hold the old one), so it is only
    rebuilt when the count changes, and runners loaded before a change should not run after it."""
    from executorch.extension.pybindings import portable_lib

    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(threads)


# ETDump records that enclose others: summing them with their contents would count time twice
ETDUMP_NESTING = {"Method::execute", "OPERATOR_CALL", "DELEGATE_CALL"}


class PteRunner:
    """The `.pte`'s methods in ExecuTorch's runtime; the KV cache is the method's own mutable buffers."""

    def __init__(self, path: Path, max_seq_len: int, threads: int | None = None, etdump: bool = False):
        if threads is not None:
            set_threads(threads)
        self.path, self.max_seq_len, self.etdump = Path(path), max_seq_len, etdump
        self.program, self.methods, self.cache_written = None, {}, True
        self.reset()

    def _method(self, name):
        if name not in self.methods:
            self.methods[name] = self.program.load_method(name)
        return self.methods[name]

    def reset(self):
        """An empty KV cache. ExecuTorch's Program caches the methods it loads, and with them their memory (the KV
        cache is the decoder's mutable buffers): a method loaded again still holds the previous sequence. A newly
        loaded Program starts from zeroed memory, so reset loads one, only when the decoder ran since the last."""
        from executorch.runtime import Runtime

        if self.cache_written:
            self.methods = {}
            self.program = None       # the old program's memory goes before the new one is claimed
            self.program = Runtime.get().load_program(str(self.path), enable_etdump=self.etdump)
            self.cache_written = False
            # ExecuTorch's own quantized kernels (embedding_byte / embedding_4bit of --quantize), as its LLM runners
            # link them: the wheel's runtime does not register them until their library is loaded
            kernel_library.load_quantized_kernels()
            if kernel_library.VERSION_METHOD in self.program.method_names:
                # before any method that calls the kernels is loaded: "Missing operator" otherwise
                kernel_library.load()
                kernel_library.require_version(self.constant(kernel_library.VERSION_METHOD), self.path)

    def vision_encoder(self, pixel_values):
        return self._method("vision_encoder").execute([pixel_values])[0]

    def token_embedding(self, tokens):
        return self._method("token_embedding").execute([tokens])[0]

    def text_decoder(self, embeds, input_pos):
        self.cache_written = True
        return self._method("text_decoder").execute([embeds.contiguous(), input_pos])[0]

    def constant(self, name):
        return self._method(name).execute([])[0]


TARGET = ExecuTorchTarget()
