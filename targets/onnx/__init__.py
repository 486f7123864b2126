"""`--target onnx`: ONNX + ONNX Runtime, routed experts as 2-bit `com.microsoft.QMoE`, also `.ort` for ORT Mobile.

Artifacts: `vision_encoder.onnx`, `token_embedding.onnx`, `text_decoder.onnx` (KV cache as `past_key_i` /
`past_value_i` inputs and `present_key_i` / `present_value_i` outputs, static length), and the same three as `.ort`.

Large models: a `.onnx` whose initializers come near protobuf's 2 GiB serialization limit keeps them in one external
data file beside it (`text_decoder.onnx` + `text_decoder.onnx.data`, offsets aligned for memory mapping); the
threshold is `OnnxOptions.external_data_threshold` (bytes). The ORT format has no such form (one FlatBuffer, 32-bit
offsets; ORT's converter writes every initializer inline), so a model above `OnnxOptions.ort_size_limit` gets no
`.ort`, and the report says why.

Memory: the model is written from torch.onnx's in-memory IR (whose initializers are the program's tensors, or the
exporter's constant-folded copies of them, e.g. the transposed linear weights), never through
`ONNXProgram.model_proto`. With external data the tensors are streamed to the file one at a time; below the
threshold the file is one serialized ModelProto (a transient copy of that model's weights, < 1.5 GiB).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

from mote.export import progress
from mote.export.memory import release_memory
from mote.export.programs import KVCacheStyle
from mote.export.verify import Tolerance
from mote.targets import (CommonOptions, Lowered, OpTime, RoutedExpertStorage, Target, TargetOptions, cli_flag,
                          op_times, quiet_toolchain)

from .device_runner import OrtPrograms
from .ort_format import write_canonical_ort
from .repack import lower_to_ort_layouts
from .report import ort_facts, ort_session_facts, read_back, render
from .variants import to_fp32_experts, to_portable, with_int8_activations

# How the routed experts are stored and run: QMoE 2-bit (default), standard ops only (--portable), or float32 MoE
# (the benchmark's baseline).
VARIANTS = {"qmoe": None, "portable": to_portable, "fp32": to_fp32_experts}

OPSET = 21

# A ModelProto cannot be serialized past 2 GiB (protobuf's limit). Initializers go to external data once they reach
# 1.5 GiB, leaving room for the graph itself.
PROTOBUF_LIMIT = 2**31 - 1
DEFAULT_EXTERNAL_DATA_THRESHOLD = 3 << 29
# An .ort file is a single FlatBuffer (32-bit offsets, < 2 GiB) and ORT's SaveToOrtFormat writes every initializer
# into it: measured with onnxruntime 1.32, 1.92 GB of initializers convert, 2.28 GB fail ("Failed to save ORT
# format model"). Models whose initializers exceed this get no .ort.
DEFAULT_ORT_SIZE_LIMIT = 2**31 - (128 << 20)
# External-data offsets aligned to 64 KiB (page size and Windows' allocation granularity): ORT memory-maps them.
EXTERNAL_DATA_ALIGNMENT = 1 << 16


def _rename_io(model: ir.Model, mapping: dict[str, str]) -> None:
    """Rename graph inputs/outputs (an IR value is one object: its uses follow)."""
    for v in [*model.graph.inputs, *model.graph.outputs]:
        if v.name in mapping:
            v.name = mapping[v.name]


def _decoder_io_names(model: ir.Model) -> dict[str, str]:
    """The functional decoder's I/O, by position: (embeds, input_pos, k_0.., v_0..) -> (logits, k_0'.., v_0'..)."""
    inputs, outputs = [i.name for i in model.graph.inputs], [o.name for o in model.graph.outputs]
    n_layers = (len(outputs) - 1) // 2
    mapping = {inputs[0]: "embeds", inputs[1]: "input_pos", outputs[0]: "logits"}
    for i in range(n_layers):
        mapping[inputs[2 + i]] = f"past_key_{i}"
        mapping[inputs[2 + n_layers + i]] = f"past_value_{i}"
        mapping[outputs[1 + i]] = f"present_key_{i}"
        mapping[outputs[1 + n_layers + i]] = f"present_value_{i}"
    return mapping


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def save_model(model: ir.Model, path: Path, external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD) -> None:
    """Write `model` as `path`, with its initializers in `<path>.data` when they total `external_data_threshold`
    bytes or more: then tensors are written one at a time from the IR (no serialized copy of the weights), at
    64 KiB-aligned offsets, in initializer order (the same bytes for the same model)."""
    if initializer_bytes(model) >= external_data_threshold:
        ir.save(model, str(path), external_data=f"{path.name}.data", alignment=EXTERNAL_DATA_ALIGNMENT)
    else:
        ir.save(model, str(path))


def export_onnx(ep, path: Path, decoder: bool = False, postprocess=None,
                external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD) -> None:
    from .translate import TRANSLATIONS

    with quiet_toolchain():
        program = torch.onnx.export(ep, args=ep.example_inputs[0], dynamo=True, opset_version=OPSET,
                                    custom_translation_table=TRANSLATIONS, optimize=True, verbose=False)
    # The IR, not `program.model_proto`: that property serializes every weight into a new ModelProto.
    model = program.model
    del program
    if decoder:
        _rename_io(model, _decoder_io_names(model))
    if postprocess is not None:
        # The variants rewrite a ModelProto (one serialized copy of the weights, for --portable / the fp32 baseline)
        proto = postprocess(ir.serde.serialize_model(model))
        del model
        model = ir.serde.deserialize_model(proto)
    model.producer_name, model.producer_version = "mote-export", "0.1.0"
    save_model(model, path, external_data_threshold)
    if postprocess is not None:
        onnx.checker.check_model(str(path))   # by path: works past 2 GiB and with external data


def convert_to_ort(onnx_paths: list[Path], data_paths: list[Path] = ()) -> list[Path]:
    """ORT Mobile format next to each .onnx (com.microsoft ops included); the .ort holds the weights inline.

    The converter's own output is not byte-stable (its kernel-type-string resolver is written in hash-map order,
    which follows heap addresses): each file is rewritten by `write_canonical_ort`, so the same model gives the same
    bytes.
    External data files are linked beside the models (their locations are relative to the .onnx).
    """
    if not onnx_paths:
        return []
    work = onnx_paths[0].parent / ".ort-convert"
    work.mkdir()
    try:
        for p in [*onnx_paths, *data_paths]:
            (work / p.name).symlink_to(p.resolve())
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(work),
               "--optimization_style", "Fixed"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"onnx: .ort conversion failed: {proc.stderr.strip().splitlines()[-1:]}")
        out = []
        for p in onnx_paths:
            target = p.with_suffix(".ort")
            write_canonical_ort(work / f"{p.stem}.ort", target)
            out.append(target)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class OnnxOptions(TargetOptions):
    portable: bool = cli_flag(help="standard ONNX ops only (INT2 DequantizeLinear + MatMul, opset 25): for runtimes "
                                   "without com.microsoft ops; every expert is computed")
    int8_activations: bool = cli_flag(help="--quantize's MatMulNBits at accuracy_level 4: ONNX Runtime quantizes their "
                                           "activations to int8 (faster; a declared deviation)")
    ort: bool = True                     # also write the .ort files (ORT Mobile); the benchmark skips them
    external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD   # bytes of initializers
    ort_size_limit: int = DEFAULT_ORT_SIZE_LIMIT                     # bytes of initializers

    @classmethod
    def for_benchmark(cls):
        return cls(ort=False)   # the benchmark runs the .onnx files: no .ort conversion (seconds per model)


def _postprocess(variant: str, options: OnnxOptions):
    """The ModelProto rewrite of the variant, then `--int8-activations`' accuracy level."""
    steps = [f for f in (VARIANTS[variant], with_int8_activations if options.int8_activations else None) if f]
    if not steps:
        return None
    return lambda model: functools.reduce(lambda m, f: f(m), steps, model)


class OnnxTarget(Target):
    name = "onnx"
    kv_style = KVCacheStyle.IO
    tolerance = Tolerance(min_sqnr_db=35.0)   # declared kernel deviation (QMoE activation quantization)
    Options = OnnxOptions
    fp32_experts_supported = True
    quantized_bits = (4, 8)   # MatMulNBits / GatherBlockQuantized (repack.py); DequantizeLinear under --portable
    device_runner = Path(__file__).with_name("device_runner.py")   # ORT Mobile's .ort in the aarch64 onnxruntime

    def lower(self, programs, model, common: CommonOptions, options: OnnxOptions = OnnxOptions()) -> Lowered:
        if common.fp32_experts and options.portable:
            raise ValueError("onnx: the fp32-expert baseline has no --portable form")
        variant = "fp32" if common.fp32_experts else "portable" if options.portable else "qmoe"
        out_dir = common.out_dir
        weights, paths = 0, []
        steps = len(programs) + int(options.ort)
        for i, (name, ep) in enumerate(programs.items()):
            progress.tick(f"{name}.onnx", i, steps)
            release_memory()
            weights += lower_to_ort_layouts(ep)
            path = out_dir / f"{name}.onnx"
            export_onnx(ep, path, decoder=name == "text_decoder", postprocess=_postprocess(variant, options),
                        external_data_threshold=options.external_data_threshold)
            paths.append(path)
        release_memory()
        # Every statement of the report is read back from the written files.
        facts = read_back(paths)
        if variant == "portable":   # ORT's optimizer fuses DequantizeLinear + MatMul: what the runner will run
            for p in paths:
                if facts["files"][p.name]["quantized_dequantize"] or facts["files"][p.name]["int2_dequantize"]:
                    facts["files"][p.name]["ort_session"] = ort_session_facts(p)

        def data_files(models):
            return [out_dir / loc for p in models for loc in facts["files"][p.name]["external_data"]["files"]]

        ort_paths = []
        if options.ort:
            limit = options.ort_size_limit
            fits = [p for p in paths if facts["files"][p.name]["initializer_bytes"] <= limit]
            progress.tick("ORT format (.ort)", len(programs), steps)
            ort_paths = convert_to_ort(fits, data_files(fits))
            facts["ort"] = ort_facts(paths, limit, facts["files"])
        deviations, notes = render(facts, weights)
        return Lowered(artifacts=paths + data_files(paths) + ort_paths, routed_expert_weights=weights,
                       routed_expert_bytes=facts["routed_experts"]["bytes"], deviations=deviations, notes=notes,
                       facts=facts)

    def runner(self, out_dir: Path, max_seq_len: int, threads: int | None = None,
               suffix: str = ".onnx") -> "OrtRunner":
        """`suffix=".ort"` runs the ORT-format files instead of the .onnx ones."""
        return OrtRunner(out_dir, max_seq_len, suffix=suffix, threads=threads)

    def op_profile(self, out_dir: Path, max_seq_len: int, threads: int | None, drive) -> list[OpTime]:
        """ORT's profiler (SessionOptions.enable_profiling): a `<node>_kernel_time` record per node run, by op type."""
        with tempfile.TemporaryDirectory(prefix="mote-ort-profile-") as tmp:
            runner = OrtRunner(out_dir, max_seq_len, threads=threads, profile_prefix=str(Path(tmp) / "ort"))
            drive(runner)
            traces = {name: Path(s.end_profiling()) for name, s in runner.sessions.items()}
            trace = json.loads(traces["text_decoder"].read_text())
        return op_times((e["args"]["op_name"], e["dur"] / 1000) for e in trace
                        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"))

    def routed_expert_storage(self, out_dir: Path) -> RoutedExpertStorage:
        path = Path(out_dir) / "text_decoder.onnx"
        routed = read_back([path])["routed_experts"]
        return RoutedExpertStorage(bytes=routed["bytes"], tensors=routed["tensors"],
                                   where=f"{path.name}: initializers of its routed-expert nodes")

    def runtime_versions(self) -> dict[str, str]:
        from importlib.metadata import version

        return {p: version(p) for p in ("onnx", "onnxruntime", "onnxscript", "onnx-ir")}


class OrtRunner(OrtPrograms):
    """The three programs in onnxruntime (device_runner.OrtPrograms) with the host Runner's torch tensors."""

    def __init__(self, out_dir: Path, max_seq_len: int, suffix: str = ".onnx", threads: int | None = None,
                 profile_prefix: str | None = None):
        release_memory()   # the sessions' initializers are new mappings: drop what the export left behind first
        self.profile_prefix = profile_prefix
        super().__init__(out_dir, max_seq_len, suffix=suffix, threads=threads)

    def session_options(self, name, threads):
        # Defaults kept: with external data ORT maps the file and only the prepacked weights take anonymous memory
        # (measured on a 4-layer 0.5B-shaped model: 0.85 GB after init vs 1.55 GB from an inline .onnx);
        # session.disable_prepacking saves that copy but changes the numerics (other MLAS kernels) and runs slower;
        # session.use_env_allocators / no CPU arena / device allocator for initializers changed nothing.
        so = super().session_options(name, threads)
        so.enable_profiling = self.profile_prefix is not None   # the trace is written at end_profiling()
        if self.profile_prefix is not None:
            so.profile_file_prefix = f"{self.profile_prefix}_{name}"
        return so

    def vision_encoder(self, pixel_values):
        return torch.from_numpy(super().vision_encoder(pixel_values.numpy()))

    def token_embedding(self, tokens):
        return torch.from_numpy(super().token_embedding(tokens.numpy()))

    def text_decoder(self, embeds, input_pos):
        return torch.from_numpy(super().text_decoder(embeds.numpy(), input_pos.numpy()))


TARGET = OnnxTarget()
