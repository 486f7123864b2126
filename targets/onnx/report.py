"""What report.json says about the ONNX artifacts, read back from the written `.onnx` files.

    facts = read_back(onnx_paths)                       per file: op domains, the routed-expert nodes and the
                                                        initializers they read, MatMulNBits, KV-cache I/O,
                                                        activation-quantizing ops
    deviations, notes = render(facts, routed_weights)   sentences worded from those facts only

Post-training quantized weights (`--quantize`): com.microsoft.MatMulNBits of 4 or 8 bits, com.microsoft.
GatherBlockQuantized, and for `--portable` the DequantizeLinear nodes of an INT4 / INT8 initializer (directly or
through a Gather of its rows); `facts["quantized"]` sums them per file, op, bits and block size (count, weights,
bytes of the packed weights and of the scales).

Routed-expert nodes: com.microsoft.QMoE (the default export: every initializer it reads from input 2 on is expert
storage), com.microsoft.MoE (the benchmark's fp32 baseline, likewise), and for `--portable` the DequantizeLinear
nodes whose input is an INT2 initializer (its weight, scale and zero point). Files are read without their external
data: sizes come from the tensor headers, and external data is checked to be one file per model, beside it, long
enough for every tensor that points into it.

    facts["ort"] = ort_facts(onnx_paths, limit, facts["files"])   per model: the .ort written (bytes) or why not
    facts["files"][name]["ort_session"] = ort_session_facts(path)    --portable with quantized weights: the
                                                        MatMulNBits ONNX Runtime fuses when it loads the file
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
from onnx import TensorProto, helper

TWO_BIT = (TensorProto.INT2, TensorProto.UINT2)
PTQ_INTS = {TensorProto.INT4: 4, TensorProto.INT8: 8}   # --portable's post-training quantized weights
# MatMulNBits' accuracy_level 4: input A "can be quantized ... to int8 internally" (the op's schema)
INT8_ACTIVATIONS_LEVEL = 4
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
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    facts = {
        "onnx_bytes": path.stat().st_size,
        "initializers": len(inits),
        "initializer_bytes": sum(_bytes(t) for t in inits.values()),
        "external_data": _external_data(path, inits.values()),
        "opsets": {imp.domain or "ai.onnx": imp.version for imp in m.opset_import},
        "ops_by_domain": dict(sorted(Counter(n.domain or "ai.onnx" for n in g.node).items())),
        "qmoe": [], "moe": [], "matmul_nbits": [], "int2_dequantize": [], "gather_block_quantized": [],
        "quantized_dequantize": [],
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
            facts["matmul_nbits"].append({"node": node.name, "bits": a.get("bits", 4),
                                          "block_size": a.get("block_size"),
                                          "accuracy_level": a.get("accuracy_level", 0),
                                          "weights": a["K"] * a["N"], **_roles(inits, node.input, 1, 2),
                                          "initializers": [_tensor(inits[i]) for i in node.input[1:] if i in inits]})
        elif node.domain == "com.microsoft" and node.op_type == "GatherBlockQuantized":
            a = _attrs(node)
            data = inits[node.input[0]]
            bits = _BITS.get(data.data_type, a.get("bits", 4))
            facts["gather_block_quantized"].append({
                "node": node.name, "bits": bits, "block_size": a.get("block_size", 128), "dtype": _dtype(data),
                "weights": _numel(data) * (8 // bits if data.data_type == TensorProto.UINT8 else 1),
                **_roles(inits, node.input, 0, 2)})
        elif node.op_type == "DequantizeLinear" and getattr(inits.get(node.input[0]), "data_type", None) in TWO_BIT:
            facts["int2_dequantize"].append({"node": node.name, "block_size": _attrs(node).get("block_size", 0),
                                             "initializers": [_tensor(inits[i]) for i in node.input if i in inits]})
        elif node.op_type == "DequantizeLinear" and (dq := _quantized_dequantize(node, inits, producers, consumers)):
            facts["quantized_dequantize"].append(dq)
    return facts


def _dtype(t: onnx.TensorProto) -> str:
    return TensorProto.DataType.Name(t.data_type)


def _numel(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def _roles(inits, inputs, weight: int, scales: int) -> dict:
    """Bytes of a quantized node's packed weights and of its scales (initializers at those input positions)."""
    return {"weight_bytes": _bytes(inits[inputs[weight]]), "scale_bytes": _bytes(inits[inputs[scales]])}


def _source(name: str, inits: dict, producers: dict):
    """(initializer, gathered): the initializer `name` is, or whose rows a Gather producing `name` takes."""
    if name in inits:
        return inits[name], False
    node = producers.get(name)
    if node is not None and node.op_type == "Gather" and node.input[0] in inits:
        return inits[node.input[0]], True
    return None, False


def _quantized_dequantize(node, inits, producers, consumers) -> dict | None:
    """A --portable DequantizeLinear of a post-training quantized (INT4 / INT8) weight: what it reads (the whole
    tensor or the rows a Gather takes) and which ops read its output; None for any other DequantizeLinear."""
    weight, gathered = _source(node.input[0], inits, producers)
    scale, _ = _source(node.input[1], inits, producers)
    if weight is None or weight.data_type not in PTQ_INTS or scale is None:
        return None
    a = _attrs(node)
    return {"node": node.name, "bits": PTQ_INTS[weight.data_type], "block_size": a.get("block_size", 0),
            "axis": a.get("axis", 1), "weights": _numel(weight), "weight_bytes": _bytes(weight),
            "scale_bytes": _bytes(scale), "reads": "gathered rows" if gathered else "whole tensor",
            "feeds": sorted({c.op_type for c in consumers.get(node.output[0], [])})}


def read_back(paths: list[Path]) -> dict:
    """{"files": {name: facts}, "routed_experts": {"bytes", "blocks", "nodes"}} of the written .onnx files."""
    files = {p.name: file_facts(p) for p in paths}
    routed = [e for f in files.values() for kind in ("qmoe", "moe", "int2_dequantize") for e in f[kind]]
    return {
        "files": files,
        "quantized": quantized_summary(files),
        "routed_experts": {
            "bytes": sum(t["bytes"] for e in routed for t in e["initializers"]),
            "tensors": sum(len(e["initializers"]) for e in routed),
            "block_sizes": sorted({e["block_size"] for e in routed if e.get("block_size")}),
        },
    }


def ort_session_facts(path: Path) -> dict:
    """What ONNX Runtime's CPU provider makes of `path` when it loads it as the runner does (default graph
    optimizations), read from the optimized model it saves: its com.microsoft.MatMulNBits nodes (`--portable` files
    have none of their own: any there were fused from DequantizeLinear + MatMul) and how many take int8 activations."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="mote-ort-optimized-") as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = str(Path(tmp) / path.name)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{path.name}.data")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        nodes = [n for n in onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node
                 if n.domain == "com.microsoft" and n.op_type == "MatMulNBits"]
    return {"onnxruntime": ort.__version__, "matmul_nbits": len(nodes),
            "matmul_nbits_int8_activations": sum(_attrs(n).get("accuracy_level", 0) >= INT8_ACTIVATIONS_LEVEL
                                                 for n in nodes)}


def quantized_summary(files: dict) -> list[dict]:
    """The post-training quantized weights of every file, per (file, op, bits, block size): nodes, weights, bytes of
    the packed weights and of the scales (2-bit MatMulNBits are ternary linears, not post-training quantized)."""
    kinds = [("matmul_nbits", "com.microsoft.MatMulNBits"),
             ("gather_block_quantized", "com.microsoft.GatherBlockQuantized"),
             ("quantized_dequantize", "DequantizeLinear")]
    groups: dict[tuple, dict] = {}
    for name, f in files.items():
        for kind, op in kinds:
            for e in f[kind]:
                if kind == "matmul_nbits" and e["bits"] == 2:
                    continue
                g = groups.setdefault((name, op, e["bits"], e["block_size"]), {
                    "file": name, "op": op, "bits": e["bits"], "block_size": e["block_size"], "nodes": 0, "weights": 0,
                    "weight_bytes": 0, "scale_bytes": 0, "accuracy_levels": set(), "reads": set(), "feeds": set()})
                g["nodes"] += 1
                for key in ("weights", "weight_bytes", "scale_bytes"):
                    g[key] += e[key]
                g["accuracy_levels"].update([e["accuracy_level"]] if "accuracy_level" in e else [])
                g["reads"].update([e["reads"]] if "reads" in e else [])
                g["feeds"].update(e.get("feeds", []))
    out = []
    for g in groups.values():
        g.update({k: sorted(g[k]) for k in ("accuracy_levels", "reads", "feeds")},
                 bits_per_weight=round((g["weight_bytes"] + g["scale_bytes"]) * 8 / max(g["weights"], 1), 4))
        out.append(g)
    return out


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
                # what ONNX Runtime fuses when it loads the file, where it was read (ort_session), is its own deviation
                deviations.append(f"onnx --portable: {name}: the experts' MatMuls take float activations (no "
                                  "activation-quantizing op in the file; the reference quantizes them per token to "
                                  "int8)" + ("" if "ort_session" in f else "; ONNX Runtime may fuse "
                                             "DequantizeLinear+MatMul into MatMulNBits with int8 activations"))
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
    q_deviations, q_notes = _render_quantized(facts)
    deviations += q_deviations
    notes += q_notes
    for name, o in facts.get("ort", {}).get("files", {}).items():
        if not o["written"]:
            notes.append(f"{name} not written: {o['reason']}")
    quantizers = {name: f["activation_quantizers"] for name, f in facts["files"].items() if f["activation_quantizers"]}
    notes.append(f"activation-quantizing ops ({', '.join(sorted(ACTIVATION_QUANTIZERS))}) in the files: "
                 f"{quantizers or 'none'}")
    return deviations, notes


def _render_quantized(facts: dict) -> tuple[list[str], list[str]]:
    """(deviations, notes) about the post-training quantized weights (facts["quantized"], facts["files"])."""
    deviations, notes = [], []
    for g in facts["quantized"]:
        blocks = f"block_size {g['block_size']}" if g["block_size"] else "one scale per output channel"
        text = (f"post-training quantized weights in {g['file']}: {g['nodes']} {g['op']} (bits {g['bits']}, "
                f"{blocks}) holding {g['weights']} weights in {g['weight_bytes']} bytes + "
                f"{g['scale_bytes']} bytes of fp32 scales ({g['bits_per_weight']:.3f} bits/weight)")
        if g["accuracy_levels"]:
            text += f", accuracy_level {g['accuracy_levels']}"
            if g["accuracy_levels"] == [0]:
                text += " (ONNX Runtime keeps their activations float: weight-only, as the reference)"
        if g["reads"]:
            text += (f", dequantizing the {' and the '.join(g['reads'])}, read by "
                     f"{', '.join(g['feeds']) or 'nothing (the graph output)'}")
        notes.append(text)
    for name, f in facts["files"].items():
        int8_inputs = [e for e in f["matmul_nbits"] if e["accuracy_level"] >= INT8_ACTIVATIONS_LEVEL]
        if int8_inputs:
            deviations.append(f"onnx: {name}: {len(int8_inputs)} com.microsoft.MatMulNBits nodes have accuracy_level "
                              f"{_values(int8_inputs, 'accuracy_level')}: ONNX Runtime may quantize their activations "
                              "to int8 (the reference dequantizes the weights only)")
        fused = f.get("ort_session", {}).get("matmul_nbits_int8_activations", 0)
        if fused:
            deviations.append(f"onnx --portable: {name}: onnxruntime {f['ort_session']['onnxruntime']}, loading it, "
                              f"fused DequantizeLinear + MatMul into {fused} com.microsoft.MatMulNBits nodes with "
                              f"accuracy_level >= {INT8_ACTIVATIONS_LEVEL} (int8 activations; the reference "
                              "dequantizes the weights only)")
    return deviations, notes
