"""`--target ios`: Core ML, one iOS 18 mlprogram `.mlpackage` per program, routed experts kept as 2-bit codes.

Artifacts: `vision_encoder.mlpackage`, `token_embedding.mlpackage`, `text_decoder.mlpackage`. The decoder keeps its
KV cache in Core ML states (`k_cache_i`, `v_cache_i`: the program's mutable buffers, fp16 as iOS 18 requires, written
in place by `scatter` + `write_state`) and takes a dynamic T in [1, max_seq_len] (`embeds` is a RangeDim input): one
program prefills and decodes. Compute precision is an option: fp16 (the default, what the GPU and the Neural Engine
run) or fp32 (CPU only).

Routed experts: uint8 constants of the packed 2-bit codes (four per byte, exactly the canonical storage), gathered by
the router's choice and decoded by a 256-entry table (convert.py). Apple documents that palettized weights
(`constexpr_lut_to_dense`) stay compressed in memory only where Core ML decompresses them just in time, mostly on the
Neural Engine; elsewhere they are decompressed at load, to fp16 (8x the 2-bit size). Here the uint8 codes are plain
constants the program gathers from (no dense copy of the experts in it), and a decode step gathers only the k chosen
experts' codes.

`--quantize` (int4 and int8): each quantized linear is `linear` over Core ML's `constexpr_blockwise_shift_scale`
(int4 / int8 data in weight.bin, scales in the program's precision, blocks along K), the quantized embedding a gather
of int8 (or nibble-packed int4) rows by token before they are dequantized (convert.py); the report lists them by
dtype with their bytes, read back from the saved programs (report.py).

Verification on Linux: there is no Core ML runtime here, so the saved packages run in `mil_executor.MilExecutor`
(coremltools' own per-op `value_inference` walked over the saved program, fp16 rounding per op, states as arrays);
`MLModel.predict` is used on macOS (runtime_tests).
"""
from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

import numpy as np

from mote.export import progress
from mote.export.programs import KVCacheStyle
from mote.export.verify import Tolerance
from mote.targets import CommonOptions, Lowered, RoutedExpertStorage, Target, TargetOptions, cli_flag, quiet_toolchain
from mote.targets.lowering import routed_expert_weights, use_float_experts

from .report import (load_spec, read_back, render_deviations, render_notes, routed_experts, routed_totals,
                     spec_path, weights_path)

OUTPUTS = {"vision_encoder": "image_embeds", "token_embedding": "embeds", "text_decoder": "logits"}
DESCRIPTIONS = {
    "pixel_values": "image [1, channels, height, width], float32, as the model's image processor prepares it",
    "image_embeds": "image embeddings [1, image tokens, hidden], in the text decoder's embedding space",
    "tokens": "token ids [1, T]",
    "embeds": "embeddings [1, T, hidden]: text token embeddings, image embeddings at the image placeholders",
    "input_pos": "[1] int32: the position of embeds[:, 0]; the KV cache is written at input_pos .. input_pos + T - 1",
    "logits": "next-token logits [1, T, vocab]",
}
# ct.convert writes the day of the conversion into the package; the same input must give the same bytes
UNDATED = "com.github.apple.coremltools.conversion_date"
# ops that only compute RoPE angles (positions x inverse frequencies): kept in fp32 under fp16 compute precision,
# where an angle of 100 rad would be rounded by up to 0.03 rad (fp16 keeps 11 significant bits)
ANGLE_OPS = {"cast", "mul", "add", "concat", "expand_dims", "reshape", "tile", "transpose", "squeeze", "slice_by_index"}


def _feeds_only_rope(op, memo: dict) -> bool:
    """Whether every use of `op`'s outputs ends in sin / cos through ANGLE_OPS only."""
    if op in memo:
        return memo[op]
    if op.op_type in ("sin", "cos"):
        result = True
    elif op.op_type not in ANGLE_OPS:
        result = False
    else:
        children = [child for out in op.outputs for child in out.child_ops]
        result = bool(children) and all(_feeds_only_rope(c, memo) for c in children)
    memo[op] = result
    return result


def compute_precision(name: str):
    import coremltools as ct

    if name == "fp32":
        return ct.precision.FLOAT32
    from .convert import keeps_fp32

    memo: dict = {}
    return ct.transform.FP16ComputePrecision(
        op_selector=lambda op: not (_feeds_only_rope(op, memo) or keeps_fp32(op)))


@dataclasses.dataclass(frozen=True)
class CoreMLOptions(TargetOptions):
    compute_precision: str = cli_flag("fp16", choices=("fp16", "fp32"),
                                      help="what the programs compute in: fp16 (default; GPU and Neural Engine) or "
                                           "fp32 (CPU only); the KV cache states are fp16 either way (iOS 18)")


def model_metadata(model_dir: Path | None) -> dict:
    """author / license / version strings of the model directory's config.json (optional keys), for Xcode's view."""
    if model_dir is None or not (Path(model_dir) / "config.json").is_file():
        return {}
    data = json.loads((Path(model_dir) / "config.json").read_text())
    return {k: data[k] for k in ("author", "license", "version") if isinstance(data.get(k), str)}


def _shared_expert_kind(model) -> str:
    """"full-precision", or the bit widths `--quantize` gave the model's shared experts (e.g. "int4-quantized")."""
    from mote.export.model import QuantizedLinear

    bits = sorted({m.bits for name, shared in model.named_modules() if name.endswith("mlp.shared_expert")
                   for m in shared.modules() if isinstance(m, QuantizedLinear)})
    return "/".join(f"int{b}" for b in bits) + "-quantized" if bits else "full-precision"


def _describe(mlmodel, name: str, model, max_seq_len: int, precision: str, metadata: dict,
              quantization=None) -> None:
    """Metadata where Xcode shows it: the model's description, author, license, version, and each input, output
    and state's description."""
    from mote.tools.cli import tool_version

    cfg = model.config
    spec = mlmodel._spec
    moe = cfg.moe
    what = {"vision_encoder": "vision tower and projector", "token_embedding": "token embedding table",
            "text_decoder": f"{cfg.num_hidden_layers}-layer decoder, MoE layers {list(moe.moe_layers)} with "
                            f"{moe.num_experts} ternary routed experts (top-{moe.top_k}) and a shared expert "
                            f"({_shared_expert_kind(model)}), KV cache of {max_seq_len} positions in states"}[name]
    mlmodel.short_description = f"MoTE {name}: {what}; compute precision {precision}"
    mlmodel.author = metadata.get("author", "")
    mlmodel.license = metadata.get("license", "")
    mlmodel.version = metadata.get("version", "")
    meta = mlmodel.user_defined_metadata
    if UNDATED in meta:
        del meta[UNDATED]
    meta["mote.program"] = name
    meta["mote.exporter"] = f"mote-export {tool_version()}"
    meta["mote.max_seq_len"] = str(max_seq_len)
    meta["mote.compute_precision"] = precision
    if quantization is not None:
        meta["mote.quantize"] = quantization.canonical
    for feature in spec.description.input:
        mlmodel.input_description[feature.name] = DESCRIPTIONS[feature.name]
    for feature in spec.description.output:
        mlmodel.output_description[feature.name] = DESCRIPTIONS[feature.name]
    for state in spec.description.state:    # coremltools has no setter for a state's description: the spec's field
        kind, layer = state.name.split("_cache_")
        state.shortDescription = (f"layer {layer} {'keys' if kind == 'k' else 'values'} [1, kv heads, max_seq_len, "
                                  "head dim], fp16, updated in place at input_pos .. input_pos + T - 1")


def canonical_spec(package: Path) -> None:
    """model.mlmodel serialized deterministically: coremltools writes it with plain SerializeToString, and protobuf
    writes map fields (an op's inputs and attributes, the metadata) in a hash order seeded per process."""
    spec_path(package).write_bytes(load_spec(package).SerializeToString(deterministic=True))


def canonical_manifest(package: Path) -> None:
    """The package's Manifest.json with identifiers derived from each item's path instead of random UUIDs."""
    path = package / "Manifest.json"
    manifest = json.loads(path.read_text())
    renamed = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, "mote-export/" + item["path"]))
               for old, item in manifest["itemInfoEntries"].items()}
    manifest["itemInfoEntries"] = {renamed[k]: v for k, v in sorted(manifest["itemInfoEntries"].items(),
                                                                     key=lambda kv: kv[1]["path"])}
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")


def to_mlpackage(ep, path: Path, name: str, model, max_seq_len: int, precision: str, metadata: dict,
                 quantization=None) -> None:
    """One post-pass ExportedProgram -> an iOS 18 mlprogram package at `path`."""
    import coremltools as ct

    from .convert import register_converters

    register_converters()
    with quiet_toolchain():     # torch's own deprecation warnings too (run_decompositions copies the program)
        # An empty decomposition table: ATen's default would turn index_copy into an index_put the converter refuses
        decomposed = ep.run_decompositions({})
        mlmodel = ct.convert(decomposed, minimum_deployment_target=ct.target.iOS18, convert_to="mlprogram",
                             compute_precision=compute_precision(precision), skip_model_load=True,
                             outputs=[ct.TensorType(name=OUTPUTS[name])])
    del decomposed
    _describe(mlmodel, name, model, max_seq_len, precision, metadata, quantization)
    mlmodel.save(str(path))
    canonical_spec(path)
    canonical_manifest(path)


class CoreMLTarget(Target):
    name = "ios"
    kv_style = KVCacheStyle.STATE
    tolerance = Tolerance(min_sqnr_db=35.0)   # fp16 programs and fp16 states (DESIGN.md section 6)
    Options = CoreMLOptions
    fp32_experts_supported = True
    quantized_bits = (4, 8)       # constexpr_blockwise_shift_scale weights; int8 / nibble-packed int4 embedding rows
    timing_caveat = ("the MIL executor's time (numpy on this machine's CPU, walking the saved program op by op), "
                     "not Core ML's speed on a device")

    def lower(self, programs, model, common: CommonOptions, options: CoreMLOptions = CoreMLOptions()) -> Lowered:
        weights = routed_expert_weights(programs["text_decoder"])
        if common.fp32_experts:
            use_float_experts(programs["text_decoder"])
        metadata = model_metadata(common.model_dir)
        packages = {}
        for i, (name, ep) in enumerate(programs.items()):
            progress.tick(f"{name}: Core ML conversion", i, len(programs))
            packages[name] = common.out_dir / f"{name}.mlpackage"
            to_mlpackage(ep, packages[name], name, model, common.max_seq_len, options.compute_precision, metadata,
                         common.quantization)
        facts = read_back(packages)
        facts["compute_precision"] = options.compute_precision
        return Lowered(artifacts=list(packages.values()), routed_expert_weights=weights,
                       routed_expert_bytes=facts["routed_experts"]["bytes"], deviations=render_deviations(facts),
                       notes=render_notes(facts, weights), facts=facts)

    def runner(self, out_dir: Path, max_seq_len: int, threads: int | None = None) -> "ExecutorRunner":
        return ExecutorRunner(Path(out_dir), max_seq_len)

    def routed_expert_storage(self, out_dir: Path) -> RoutedExpertStorage:
        found = {p: routed_experts(p) for p in sorted(Path(out_dir).glob("*.mlpackage"))}
        total = routed_totals(found.values())
        holding = [weights_path(p).relative_to(out_dir) for p, r in found.items() if r["tensors"]]
        return RoutedExpertStorage(bytes=total["bytes"], tensors=total["tensors"],
                                   where=", ".join(map(str, holding)))

    def runtime_versions(self) -> dict[str, str]:
        from importlib.metadata import version

        return {"coremltools": version("coremltools"), "runtime": "mil_executor (coremltools value_inference)"}


class ExecutorRunner:
    """The saved packages run by the MIL executor (no Core ML runtime on Linux); the KV cache is the decoder's
    states, kept by the executor between calls."""

    def __init__(self, out_dir: Path, max_seq_len: int):
        self.out_dir, self.max_seq_len = out_dir, max_seq_len
        self.executors = {}

    def _executor(self, name):
        from .mil_executor import MilExecutor

        if name not in self.executors:
            with quiet_toolchain():      # coremltools' milproto loader prints progress bars
                self.executors[name] = MilExecutor(self.out_dir / f"{name}.mlpackage")
        return self.executors[name]

    def reset(self):
        if "text_decoder" in self.executors:
            self.executors["text_decoder"].reset()

    def _run(self, name, **inputs):
        import torch

        out = self._executor(name).predict({k: np.asarray(v) for k, v in inputs.items()})
        return torch.from_numpy(np.asarray(out[OUTPUTS[name]], dtype=np.float32))

    def vision_encoder(self, pixel_values):
        return self._run("vision_encoder", pixel_values=pixel_values.numpy().astype(np.float32))

    def token_embedding(self, tokens):
        return self._run("token_embedding", tokens=tokens.numpy().astype(np.int32))

    def text_decoder(self, embeds, input_pos):
        return self._run("text_decoder", embeds=embeds.numpy().astype(np.float32),
                         input_pos=input_pos.numpy().astype(np.int32))


TARGET = CoreMLTarget()
