"""What report.json says about the Core ML artifacts, read back from the saved `.mlpackage` files alone.

    facts = read_back(packages)     per program: inputs (with their shape ranges), outputs, states, the op counts,
                                    the precision the ops compute in, the routed-expert weights (from the weight
                                    blobs) and how the program reads them
    notes = render_notes(facts)     sentences worded from those facts only
    deviations = render_deviations(facts)   where the programs compute in lower precision than the reference

The routed experts are the constants that the `__routed_` gathers of our `mote::moe_ffn` converter read
(convert.py); their size is the blob's own header in `weights/weight.bin` (Core ML's blob storage: a 64-byte
metadata record per blob, sentinel 0xDEADBEEF, dtype, size in bytes, data offset), or the immediate value's size for
constants small enough to live in the program itself.
"""
from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path

from .convert import ROUTED_TAG

BLOB_SENTINEL = 0xDEADBEEF
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


def _const_bytes(op, blobs: _Blobs) -> int:
    value = op.attributes["val"]
    if value.HasField("blobFileValue"):
        return blobs.size(value.blobFileValue.offset)
    numel = 1
    for d in _dims(value.type):
        numel *= d
    return (numel * _BITS[value.type.tensorType.dataType] + 7) // 8


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
    }


def routed_totals(per_program) -> dict:
    """Bytes and constants of the routed experts over `routed_experts` results of several programs."""
    per_program = list(per_program)
    return {"bytes": sum(r["bytes"] for r in per_program), "tensors": sum(len(r["tensors"]) for r in per_program)}


def read_back(packages: dict[str, Path]) -> dict:
    programs = {name: read_program(path) for name, path in packages.items()}
    return {"programs": programs, "routed_experts": routed_totals(p["routed_experts"] for p in programs.values())}


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
    return out


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
    return notes
