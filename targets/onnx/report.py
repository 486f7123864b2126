"""What report.json says about the ONNX artifacts, read back from the written `.onnx` files.

    facts = read_back(onnx_paths)                       per file: op domains, the routed-expert nodes and the
                                                        initializers they read, MatMulNBits, KV-cache I/O,
                                                        activation-quantizing ops
    deviations, notes = render(facts, routed_weights)   sentences worded from those facts only

Routed-expert nodes: com.microsoft.QMoE (the default export: every initializer it reads from input 2 on is expert
storage), com.microsoft.MoE (the benchmark's fp32 baseline, likewise), and for `--portable` the DequantizeLinear
nodes whose input is an INT2 initializer (its weight, scale and zero point). Files are read without their external
data: sizes come from the tensor headers, and external data is checked to be one file per model, beside it, long
enough for every tensor that points into it.

    facts["ort"] = ort_facts(onnx_paths, limit, facts["files"])   per model: the .ort written (bytes) or why not
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
from onnx import TensorProto, helper

TWO_BIT = (TensorProto.INT2, TensorProto.UINT2)
# Ops that quantize activations (ONNX standard and ORT contrib).
ACTIVATION_QUANTIZERS = {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul",
                         "MatMulIntegerToFloat", "DynamicQuantizeLSTM"}
CONTROL_FLOW = {"If", "Loop", "Scan"}
_BITS = {TensorProto.INT2: 2, TensorProto.UINT2: 2, TensorProto.INT4: 4, TensorProto.UINT4: 4}


def _bytes(t: onnx.TensorProto) -> int:
    """Bytes the initializer's data takes in the file (raw or typed fields, or its external-data length)."""
    if t.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        if "length" in info:
            return int(info["length"])
    elif t.HasField("raw_data"):
        return len(t.raw_data)
    numel = 1
    for d in t.dims:
        numel *= d
    bits = _BITS.get(t.data_type, 8 * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize)
    return (numel * bits + 7) // 8


def _tensor(t: onnx.TensorProto) -> dict:
    return {"name": t.name, "dtype": TensorProto.DataType.Name(t.data_type), "shape": list(t.dims), "bytes": _bytes(t)}


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _shape(vi) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]


def _external_data(path: Path, initializers) -> dict:
    """Where the initializers' external data lives: {"files", "tensors", "bytes"}; raises if a location leaves the
    model's directory, a file is missing, or a tensor reaches past its file's end."""
    files: dict[str, int] = {}
    n = total = 0
    for t in initializers:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info["location"]
        if Path(loc).name != loc:
            raise RuntimeError(f"onnx: {path.name}: initializer {t.name} has external data outside the model's "
                               f"directory ({loc!r})")
        data = path.parent / loc
        if not data.is_file():
            raise RuntimeError(f"onnx: {path.name}: external data file {loc} of initializer {t.name} is missing")
        end = int(info.get("offset", 0)) + _bytes(t)
        if end > data.stat().st_size:
            raise RuntimeError(f"onnx: {path.name}: initializer {t.name} ends at byte {end} of {loc}, past its end")
        files[loc] = data.stat().st_size
        n, total = n + 1, total + _bytes(t)
    return {"files": sorted(files), "file_bytes": files, "tensors": n, "bytes": total}


def file_facts(path: Path) -> dict:
    m = onnx.load(str(path), load_external_data=False)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    facts = {
        "onnx_bytes": path.stat().st_size,
        "initializers": len(inits),
        "initializer_bytes": sum(_bytes(t) for t in inits.values()),
        "external_data": _external_data(path, inits.values()),
        "opsets": {imp.domain or "ai.onnx": imp.version for imp in m.opset_import},
        "ops_by_domain": dict(sorted(Counter(n.domain or "ai.onnx" for n in g.node).items())),
        "qmoe": [], "moe": [], "matmul_nbits": [], "int2_dequantize": [],
        "activation_quantizers": dict(Counter(n.op_type for n in g.node if n.op_type in ACTIVATION_QUANTIZERS)),
        "control_flow_ops": sum(n.op_type in CONTROL_FLOW for n in g.node),
        "kv_cache": {"inputs": [{"name": i.name, "shape": _shape(i)} for i in g.input if i.name.startswith("past_")],
                     "outputs": [{"name": o.name, "shape": _shape(o)} for o in g.output
                                 if o.name.startswith("present_")]},
    }
    for node in g.node:
        if node.domain == "com.microsoft" and node.op_type in ("QMoE", "MoE"):
            a = _attrs(node)
            entry = {"node": node.name, "k": a.get("k"), "initializers": [_tensor(inits[i]) for i in node.input[2:]
                                                                          if i in inits]}
            if node.op_type == "QMoE":
                entry.update(expert_weight_bits=a.get("expert_weight_bits"), block_size=a.get("block_size", 0),
                             normalize_routing_weights=a.get("normalize_routing_weights", 0))
            facts[node.op_type.lower()].append(entry)
        elif node.domain == "com.microsoft" and node.op_type == "MatMulNBits":
            a = _attrs(node)
            facts["matmul_nbits"].append({"node": node.name, "bits": a.get("bits"), "block_size": a.get("block_size"),
                                          "accuracy_level": a.get("accuracy_level", 0),
                                          "initializers": [_tensor(inits[i]) for i in node.input[1:] if i in inits]})
        elif node.op_type == "DequantizeLinear" and getattr(inits.get(node.input[0]), "data_type", None) in TWO_BIT:
            facts["int2_dequantize"].append({"node": node.name, "block_size": _attrs(node).get("block_size", 0),
                                             "initializers": [_tensor(inits[i]) for i in node.input if i in inits]})
    return facts


def read_back(paths: list[Path]) -> dict:
    """{"files": {name: facts}, "routed_experts": {"bytes", "blocks", "nodes"}} of the written .onnx files."""
    files = {p.name: file_facts(p) for p in paths}
    routed = [e for f in files.values() for kind in ("qmoe", "moe", "int2_dequantize") for e in f[kind]]
    return {
        "files": files,
        "routed_experts": {
            "bytes": sum(t["bytes"] for e in routed for t in e["initializers"]),
            "tensors": sum(len(e["initializers"]) for e in routed),
            "block_sizes": sorted({e["block_size"] for e in routed if e.get("block_size")}),
        },
    }


def ort_facts(onnx_paths: list[Path], limit: int, files: dict) -> dict:
    """Per model, whether its .ort was written (and its size, read from the file) or why not (`files`: the
    per-file facts of read_back)."""
    import onnxruntime

    out = {"size_limit_bytes": limit, "files": {}}
    for p in onnx_paths:
        ort_path = p.with_suffix(".ort")
        if ort_path.is_file():
            out["files"][ort_path.name] = {"written": True, "bytes": ort_path.stat().st_size}
            continue
        f = files[p.name]
        out["files"][ort_path.name] = {
            "written": False, "initializer_bytes": f["initializer_bytes"],
            "reason": (f"{p.name} holds {f['initializer_bytes']} bytes of initializers, above the {limit}-byte limit "
                       f"for the ORT format: an .ort file is a single FlatBuffer (32-bit offsets, under 2 GiB) and "
                       f"onnxruntime {onnxruntime.__version__}'s converter writes every initializer into it (the "
                       f"format has no external data for inference models); use {p.name}"
                       + (f" with {', '.join(f['external_data']['files'])}" if f["external_data"]["files"] else "")),
        }
    return out


def _shapes(tensors) -> str:
    counts = Counter((t["dtype"], tuple(t["shape"])) for t in tensors)
    return ", ".join(f"{d} {list(s)} x{n}" for (d, s), n in counts.items())


def _values(entries, key) -> list:
    return sorted({e[key] for e in entries})


def _reads(entries) -> str:
    """'uint8 [4, 128, 16] x2, float32 [4, 128, 1] x2 (9216 bytes)': what a group of nodes reads."""
    tensors = [t for e in entries for t in e["initializers"]]
    return f"{_shapes(tensors)} ({sum(t['bytes'] for t in tensors)} bytes)"


def _span(items) -> str:
    return f"{items[0]['name']} ... {items[-1]['name']}" if items else "none"


def render(facts: dict, routed_weights: int) -> tuple[list[str], list[str]]:
    """(deviations, notes), each sentence worded from `facts` alone."""
    r = facts["routed_experts"]
    deviations = []
    notes = [f"routed-expert storage in the .onnx files: {r['bytes']} bytes for {routed_weights} weights, "
             f"{r['bytes'] * 8 / max(routed_weights, 1):.3f} bits/weight"]
    for name, f in facts["files"].items():
        if f["qmoe"]:
            q = f["qmoe"]
            notes.append(f"routed experts in {name}: {len(q)} com.microsoft.QMoE nodes (expert_weight_bits "
                         f"{_values(q, 'expert_weight_bits')}, block_size {_values(q, 'block_size')}, k "
                         f"{_values(q, 'k')}) reading {_reads(q)}; QMoE computes only each token's top-k experts")
            if any(e["block_size"] for e in q):
                deviations.append(
                    f"onnx: {name}: com.microsoft.QMoE's block-wise 2-bit CPU kernel (MLAS LUT GEMM) quantizes the "
                    "expert activations itself instead of the reference's per-token symmetric int8, and does not "
                    "re-quantize the activation before the down projection")
        if f["moe"]:
            notes.append(f"routed experts in {name}: {len(f['moe'])} com.microsoft.MoE nodes (k "
                         f"{_values(f['moe'], 'k')}) reading {_reads(f['moe'])}")
        if f["int2_dequantize"]:
            dq = f["int2_dequantize"]
            dense = ("dense all-expert compute: the graph has no control flow, so every expert's MatMul runs for "
                     "every token (standard ONNX has no op that reads only the selected experts' weights)"
                     if not f["control_flow_ops"] else f"{f['control_flow_ops']} control-flow ops in the graph")
            notes.append(f"routed experts in {name}: standard ops only (opsets {f['opsets']}), {len(dq)} "
                         f"DequantizeLinear nodes (block_size {_values(dq, 'block_size')}) reading {_reads(dq)}; "
                         + dense)
            if not f["activation_quantizers"]:
                deviations.append(f"onnx --portable: {name}: the experts' MatMuls take float activations (no "
                                  "activation-quantizing op in the file; the reference quantizes them per token to "
                                  "int8); ONNX Runtime may fuse DequantizeLinear+MatMul into MatMulNBits with int8 "
                                  "activations")
        if f["matmul_nbits"]:
            mm = f["matmul_nbits"]
            notes.append(f"{name}: {len(mm)} com.microsoft.MatMulNBits nodes (bits {_values(mm, 'bits')}, "
                         f"block_size {_values(mm, 'block_size')}, accuracy_level {_values(mm, 'accuracy_level')}) "
                         f"reading {_reads(mm)}")
        ext = f["external_data"]
        if ext["files"]:
            notes.append(f"{name}: {ext['tensors']} of {f['initializers']} initializers ({ext['bytes']} of "
                         f"{f['initializer_bytes']} bytes) in external data file(s) {', '.join(ext['files'])} "
                         f"({sum(ext['file_bytes'].values())} bytes; keep them beside the .onnx)")
        kv = f["kv_cache"]
        if kv["inputs"] or kv["outputs"]:
            notes.append(f"KV cache of {name}: {len(kv['inputs'])} inputs ({_span(kv['inputs'])}), "
                         f"{len(kv['outputs'])} outputs ({_span(kv['outputs'])}), shapes "
                         f"{sorted({str(i['shape']) for i in kv['inputs'] + kv['outputs']})}")
    for name, o in facts.get("ort", {}).get("files", {}).items():
        if not o["written"]:
            notes.append(f"{name} not written: {o['reason']}")
    quantizers = {name: f["activation_quantizers"] for name, f in facts["files"].items() if f["activation_quantizers"]}
    notes.append(f"activation-quantizing ops ({', '.join(sorted(ACTIVATION_QUANTIZERS))}) in the files: "
                 f"{quantizers or 'none'}")
    return deviations, notes
