"""What report.json says about the Core ML artifacts, read back from the saved `.mlpackage` files alone.

    facts = read_back(packages)     per program: inputs (with their shape ranges), outputs, states, the op counts,
                                    the precision the ops compute in, the routed-expert weights (from the weight
                                    blobs) and how the program reads them, the `--quantize` weights by dtype
    notes = render_notes(facts)     sentences worded from those facts only
    deviations = render_deviations(facts)   where the programs compute in lower precision than the reference

The routed experts are the constants that the `__routed_` gathers of our `mote::moe_ffn` converter read
(convert.py); their size is the blob's own header in `weights/weight.bin` (Core ML's blob storage: a 64-byte
metadata record per blob, sentinel 0xDEADBEEF, dtype, size in bytes, data offset), or the immediate value's size for
constants small enough to live in the program itself.

`--quantize` weights (`quantized_weights`): the program's `constexpr_blockwise_shift_scale` ops by the dtype of
their data (int4 / int8), with the blob bytes of data and scales and the block size along K; and the quantized
embedding tables, the constants the `__qembed_` gathers read.
"""
from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path

from .convert import QEMBED_TAG, ROUTED_TAG

BLOB_SENTINEL = 0xDEADBEEF
BLOCKWISE = "constexpr_blockwise_shift_scale"
# MIL proto data types -> bits per element (coremltools.proto.MIL_pb2.DataType)
_BITS = {1: 8, 10: 16, 11: 32, 12: 64, 13: 16, 21: 8, 22: 16, 23: 32, 24: 64, 25: 4, 31: 8, 32: 16, 33: 32,
         34: 64, 35: 4, 36: 2, 37: 1, 38: 6, 39: 3, 40: 8, 41: 8}


def dtype_name(code: int) -> str:
    from coremltools.proto import MIL_pb2

    return MIL_pb2.DataType.Name(code).lower()


def spec_path(package: Path) -> Path:
    return Path(package) / "Data" / "com.apple.CoreML" / "model.mlmodel"


def weights_path(package: Path) -> Path:
    return Path(package) / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"


def load_spec(package: Path):
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path(package).read_bytes())
    return spec


def _operations(spec):
    fn = spec.mlProgram.functions["main"]
    return list(fn.block_specializations[fn.opset].operations)


def _dims(value_type) -> list:
    return [d.constant.size if d.HasField("constant") else "?" for d in value_type.tensorType.dimensions]


class _Blobs:
    """Sizes of the weight blobs, read from the blob headers of weight.bin (without reading the weights)."""

    def __init__(self, path: Path):
        self.path = path

    def size(self, offset: int) -> int:
        with open(self.path, "rb") as f:
            f.seek(offset)
            sentinel, _, size, _ = struct.unpack("<IIQQ", f.read(24))
        if sentinel != BLOB_SENTINEL:
            raise ValueError(f"{self.path}: no weight blob at offset {offset}")
        return size


def _numel(value) -> int:
    numel = 1
    for d in _dims(value.type):
        numel *= d
    return numel


def _value_bytes(value, blobs: _Blobs) -> int:
    """A MIL value's stored bytes: its blob's (weight.bin) or its immediate value's."""
    if value.HasField("blobFileValue"):
        return blobs.size(value.blobFileValue.offset)
    return (_numel(value) * _BITS[value.type.tensorType.dataType] + 7) // 8


def _const_bytes(op, blobs: _Blobs) -> int:
    return _value_bytes(op.attributes["val"], blobs)


def _chosen_by_router(op, by_output, depth: int = 12) -> bool:
    """Whether the gather's indices come from the router: an `argsort` of the experts' chosen flags upstream (our
    converter's ids), rather than constants (a gather that reads every expert)."""
    frontier = [a.name for a in op.inputs["indices"].arguments]
    for _ in range(depth):
        ops = [by_output[n] for n in frontier if n in by_output]
        if any(o.type == "argsort" for o in ops):
            return True
        frontier = [a.name for o in ops if o.type != "const" for arg in o.inputs.values() for a in arg.arguments]
    return False


def routed_experts(package: Path, ops=None) -> dict:
    """The routed-expert constants a program reads, with their bytes from the weight blobs, and how it reads them
    (`ops`: the program's operations when the caller has read its spec already)."""
    ops = _operations(load_spec(package)) if ops is None else ops
    by_output = {out.name: op for op in ops for out in op.outputs}
    blobs = _Blobs(weights_path(package))
    tensors, reads = {}, Counter()
    top_k = [int(by_output[op.inputs["k"].arguments[0].name].attributes["val"].immediateValue.tensor.ints.values[0])
             for op in ops if op.type == "topk"]
    for op in ops:
        if op.type != "gather" or not op.outputs or ROUTED_TAG not in op.outputs[0].name:
            continue
        source = by_output.get(op.inputs["x"].arguments[0].name)
        if source is None or source.type != "const":
            continue
        value = source.attributes["val"]
        tensors[source.outputs[0].name] = {"name": source.outputs[0].name,
                                           "dtype": dtype_name(value.type.tensorType.dataType),
                                           "shape": _dims(value.type), "bytes": _const_bytes(source, blobs),
                                           "in_blob_file": value.HasField("blobFileValue")}
        reads["chosen_by_router" if _chosen_by_router(op, by_output) else "every_expert"] += 1
    listed = sorted(tensors.values(), key=lambda t: t["name"])
    return {"tensors": listed, "bytes": sum(t["bytes"] for t in listed), "gathers": dict(sorted(reads.items())),
            "top_k": sorted(set(top_k))}


def _operand(arg, by_output):
    """The MIL value an op's input holds: bound inline (a constexpr's operands) or a const op's `val`."""
    a = arg.arguments[0]
    if a.WhichOneof("binding") == "value":
        return a.value
    source = by_output.get(a.name)
    return source.attributes["val"] if source is not None and source.type == "const" else None


def _blockwise(op, by_output, blobs: _Blobs, readers: dict) -> tuple[str, dict]:
    """One constexpr_blockwise_shift_scale: (dtype of its data, what it stores)."""
    data, scale = _operand(op.inputs["data"], by_output), _operand(op.inputs["scale"], by_output)
    data_dims, scale_dims = _dims(data.type), _dims(scale.type)
    return dtype_name(data.type.tensorType.dataType), {
        "weights": _numel(data), "data_bytes": _value_bytes(data, blobs),
        "scale_dtype": dtype_name(scale.type.tensorType.dataType), "scale_bytes": _value_bytes(scale, blobs),
        "block": data_dims[-1] // scale_dims[-1], "along_k": data_dims[-1], "offset": "offset" in op.inputs,
        "read_by": readers.get(op.outputs[0].name, Counter())}


def _indexing_inputs(op, by_output, depth: int = 8) -> list[str]:
    """The function inputs a gather's indices are computed from (casts, index wrapping) within `depth` ops."""
    frontier, found = [a.name for a in op.inputs["indices"].arguments], set()
    for _ in range(depth):
        found.update(n for n in frontier if n not in by_output)
        frontier = [a.name for n in frontier if n in by_output and by_output[n].type != "const"
                    for arg in by_output[n].inputs.values() for a in arg.arguments if a.name]
    return sorted(found)


def quantized_weights(ops, blobs: _Blobs) -> dict:
    """The program's `--quantize` weights as stored: its constexpr_blockwise_shift_scale ops by data dtype (count,
    weights, bytes of data and scales, block sizes along K, the ops that read them) and the quantized embedding
    tables (the constants its `__qembed_` gathers read)."""
    by_output = {out.name: op for op in ops for out in op.outputs}
    readers: dict[str, Counter] = {}
    for op in ops:
        for arg in op.inputs.values():
            for a in arg.arguments:
                if a.WhichOneof("binding") == "name":
                    readers.setdefault(a.name, Counter())[op.type] += 1
    by_dtype: dict[str, dict] = {}
    for op in ops:
        if op.type != BLOCKWISE:
            continue
        dtype, one = _blockwise(op, by_output, blobs, readers)
        entry = by_dtype.setdefault(dtype, {"ops": 0, "weights": 0, "data_bytes": 0, "scale_bytes": 0,
                                                  "scale_dtypes": set(), "blocks": set(), "with_offset": 0,
                                                  "read_by": Counter()})
        entry["ops"] += 1
        entry["weights"] += one["weights"]
        entry["data_bytes"] += one["data_bytes"]
        entry["scale_bytes"] += one["scale_bytes"]
        entry["scale_dtypes"].add(one["scale_dtype"])
        entry["blocks"].add("channel" if one["block"] == one["along_k"] else one["block"])
        entry["with_offset"] += one["offset"]
        entry["read_by"].update(one["read_by"])
    for entry in by_dtype.values():
        entry["scale_dtypes"] = sorted(entry["scale_dtypes"])
        entry["blocks"] = sorted(entry["blocks"], key=str)
        entry["read_by"] = dict(sorted(entry["read_by"].items()))
    tables = []
    for op in ops:
        if op.type != "gather" or not op.outputs or QEMBED_TAG not in op.outputs[0].name:
            continue
        value = _operand(op.inputs["x"], by_output)
        if value is not None:
            tables.append({"name": op.outputs[0].name, "dtype": dtype_name(value.type.tensorType.dataType),
                           "shape": _dims(value.type), "bytes": _value_bytes(value, blobs),
                           "indexed_by": _indexing_inputs(op, by_output)})
    return {BLOCKWISE: dict(sorted(by_dtype.items())),
            "embedding_tables": sorted(tables, key=lambda t: t["name"])}


def quantized_bytes(quantized: dict) -> int:
    """Bytes of one program's `--quantize` weights (data and scales) as `quantized_weights` found them."""
    return (sum(e["data_bytes"] + e["scale_bytes"] for e in quantized[BLOCKWISE].values())
            + sum(t["bytes"] for t in quantized["embedding_tables"]))


def _feature(f) -> dict:
    kind = f.type.WhichOneof("Type")
    array = f.type.stateType.arrayType if kind == "stateType" else f.type.multiArrayType
    out = {"name": f.name, "dtype": array.ArrayDataType.Name(array.dataType).lower(), "shape": list(array.shape)}
    ranges = array.shapeRange.sizeRanges
    if ranges:
        out["range"] = [[r.lowerBound, r.upperBound] for r in ranges]
    if f.shortDescription:
        out["description"] = f.shortDescription
    return out


def _precision(ops) -> dict:
    """How many ops produce fp16 and fp32 tensors (what the program computes in)."""
    count = Counter()
    for op in ops:
        if op.type == "const":
            continue
        for out in op.outputs:
            if out.type.HasField("tensorType"):
                code = out.type.tensorType.dataType
                if code in (10, 11):
                    count[dtype_name(code)] += 1
    return dict(sorted(count.items()))


def read_program(package: Path) -> dict:
    spec = load_spec(package)
    ops = _operations(spec)
    d = spec.description
    return {
        "file": Path(package).name,
        "specification_version": spec.specificationVersion,
        "inputs": [_feature(f) for f in d.input],
        "outputs": [_feature(f) for f in d.output],
        "states": [_feature(f) for f in d.state],
        "ops": dict(sorted(Counter(op.type for op in ops if op.type != "const").items())),
        "op_outputs_by_dtype": _precision(ops),
        "metadata": {"author": d.metadata.author, "license": d.metadata.license, "version": d.metadata.versionString,
                     "short_description": d.metadata.shortDescription},
        "routed_experts": routed_experts(package, ops),
        "quantized": quantized_weights(ops, _Blobs(weights_path(package))),
    }


def routed_totals(per_program) -> dict:
    """Bytes and constants of the routed experts over `routed_experts` results of several programs."""
    per_program = list(per_program)
    return {"bytes": sum(r["bytes"] for r in per_program), "tensors": sum(len(r["tensors"]) for r in per_program)}


def read_back(packages: dict[str, Path]) -> dict:
    programs = {name: read_program(path) for name, path in packages.items()}
    return {"programs": programs, "routed_experts": routed_totals(p["routed_experts"] for p in programs.values()),
            "quantized_bytes": sum(quantized_bytes(p["quantized"]) for p in programs.values())}


def render_deviations(facts: dict) -> list[str]:
    """Precision below the fp32 reference, read from the programs' op output dtypes and state dtypes."""
    out = []
    counts = [p["op_outputs_by_dtype"] for p in facts["programs"].values()]
    fp16, total = sum(c.get("float16", 0) for c in counts), sum(sum(c.values()) for c in counts)
    states = [s for p in facts["programs"].values() for s in p["states"]]
    stored16 = [s for s in states if s["dtype"] == "float16"]
    if fp16:
        out.append(f"fp16 compute: {fp16} of the {total} float ops of the programs produce fp16 tensors (Core ML's "
                   "fp16 compute precision; DESIGN.md section 6's fp16 bar applies)")
    if stored16:
        out.append(f"the KV cache is held in {len(stored16)} fp16 states (iOS 18 states are fp16 only)")
    half = sum(e["ops"] for p in facts["programs"].values() for e in p["quantized"][BLOCKWISE].values()
               if "float16" in e["scale_dtypes"])
    if half:
        out.append(f"{half} quantized weights (constexpr_blockwise_shift_scale) store their scales as fp16 (the "
                   "reference's are fp32)")
    return out


def _blockwise_note(name: str, by_dtype: dict) -> str:
    parts = []
    for dtype, e in by_dtype.items():
        blocks = "/".join("per output channel" if b == "channel" else f"blocks of {b} along K" for b in e["blocks"])
        bits = (e["data_bytes"] + e["scale_bytes"]) * 8 / max(e["weights"], 1)
        parts.append(f"{e['ops']} {dtype} ({e['weights']} weights in {e['data_bytes']} bytes + {e['scale_bytes']} "
                     f"bytes of {'/'.join(e['scale_dtypes'])} scales, {blocks}: {bits:.2f} bits per weight)")
    readers = Counter()
    for e in by_dtype.values():
        readers.update(e["read_by"])
    read = ", ".join(f"{n} {kind}" for kind, n in sorted(readers.items()))
    return f"{name}: {sum(e['ops'] for e in by_dtype.values())} {BLOCKWISE} weights: {'; '.join(parts)}; read by {read}"


def _table_note(name: str, tables: list[dict]) -> str:
    stored = ", ".join(f"{t['dtype']} {t['shape']} ({t['bytes']} bytes)" for t in tables)
    by = sorted({n for t in tables for n in t["indexed_by"]})
    how = (f"gathered by the input {', '.join(by)} before they are dequantized (only the call's rows are widened)"
           if by and all(t["indexed_by"] for t in tables) else "gathered by indices that are no function input")
    return f"{name}: the quantized embedding table is {len(tables)} constants, {how}: {stored}"


def render_quantized_notes(facts: dict) -> list[str]:
    """The `--quantize` weights of each program, as `quantized_weights` read them from the package."""
    notes = []
    for name, p in facts["programs"].items():
        q = p["quantized"]
        if q[BLOCKWISE]:
            notes.append(_blockwise_note(name, q[BLOCKWISE]))
        if q["embedding_tables"]:
            notes.append(_table_note(name, q["embedding_tables"]))
    return notes


def render_notes(facts: dict, routed_weights: int) -> list[str]:
    notes = []
    total = facts["routed_experts"]
    if routed_weights:
        notes.append(f"routed experts: {total['tensors']} constants, {total['bytes']} bytes in the weight blobs "
                     f"({total['bytes'] * 8 / routed_weights:.3f} bits per weight, codes and scales)")
    for name, p in facts["programs"].items():
        precision = ", ".join(f"{n} {t}" for t, n in p["op_outputs_by_dtype"].items())
        line = f"{name}: {sum(p['ops'].values())} MIL ops (outputs: {precision})"
        if p["states"]:
            s = p["states"][0]
            line += f"; KV cache as {len(p['states'])} {s['dtype']} states of {s['shape']}"
        dynamic = [f"{i['name']} {i['range']}" for i in p["inputs"] if any(lo != hi for lo, hi in i.get("range", []))]
        if dynamic:
            line += f"; dynamic inputs: {', '.join(dynamic)}"
        notes.append(line)
        r = p["routed_experts"]
        if r["tensors"]:
            by_router, every = r["gathers"].get("chosen_by_router", 0), r["gathers"].get("every_expert", 0)
            dtypes = ", ".join(sorted({t["dtype"] for t in r["tensors"]}))
            k = "/".join(map(str, r["top_k"]))
            line = (f"{name}: the routed experts' {len(r['tensors'])} constants ({dtypes}) are read by {by_router} "
                    "gathers indexed by an argsort of the experts the router chose")
            if every:
                line += f", and {every} gathers of every expert"
            else:
                line += (f" (top-{k}): the program gathers no expert the call's tokens did not choose, beyond the "
                         "first min(T x k, E) of the argsort, and no per-token copy of an expert")
            notes.append(line)
    return notes + render_quantized_notes(facts)
