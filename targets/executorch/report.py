"""What report.json says about a `.pte`, read back from the file and from the ExecuTorch program it was emitted from.

    facts = read_back(pte_path, et_manager)      routed-expert storage, how the experts are read, KV cache,
                                                  activation quantization, the quantized linears (XNNPACK's
                                                  payloads or our kernel's calls) and the quantized embedding
                                                  table (--quantize)
    facts["delegation"] = delegation_summary(edge)
    notes = render_notes(facts, routed_weights)   sentences worded from those facts only
    deviations = render_deviations(facts)         where the kernels depart from the reference, from the facts

Storage comes from the `.pte` itself: its flatbuffer holds, per method, one value per graph placeholder (the
emitter writes them in graph order) with the tensor's scalar type, sizes and the index of its data in the constant
segment. The placeholders' names come from the emitted program's graph signature, so `...experts.gate_packed`
in the file is known by name; the mapping is checked tensor by tensor (sizes and type) before it is used.
"""
from __future__ import annotations

import operator
from collections import Counter
from pathlib import Path

import torch

ROUTED = ".experts."      # routed-expert constants, as the passes name them (see passes.check_moe_fused)
QUANTIZED_NS = "quantized_decomposed"   # ExecuTorch's quantized kernels library (--quantize's embeddings)
DECODER = "text_decoder"
EMBEDDING = "token_embedding"
# Ops that hand on (a slice or view of) their first argument's values: the top-k indices stay top-k indices.
_PASS_THROUGH = {"aten.select", "aten.select_copy", "aten.alias", "aten.alias_copy", "aten.view", "aten.view_copy",
                 "aten.squeeze", "aten.squeeze_copy", "aten.clone", "dim_order_ops._to_dim_order_copy",
                 "aten._to_copy", "view"}
# The ops from the top-k indices to the ids of the chosen experts (lowering.chosen_experts), views included
_TO_CHOSEN_IDS = _PASS_THROUGH | {"aten.nonzero", "aten.any", "aten.unsqueeze", "aten.unsqueeze_copy"}
_DTYPES = {"BYTE": "uint8", "CHAR": "int8", "SHORT": "int16", "INT": "int32", "LONG": "int64", "HALF": "float16",
           "FLOAT": "float32", "DOUBLE": "float64", "BOOL": "bool", "BFLOAT16": "bfloat16"}
_ELEMENT_SIZE = {"uint8": 1, "int8": 1, "bool": 1, "int16": 2, "float16": 2, "bfloat16": 2, "int32": 4,
                 "float32": 4, "int64": 8, "float64": 8}


def op_kind(target) -> str:
    """`aten.index_select` for an ATen, edge or out-variant overload of it; `getitem`, `view`, ... for functions."""
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.name.replace("::", ".")
    return getattr(target, "__name__", str(target))


def _from_topk_indices(node) -> bool:
    """node is (a slice or view of) the indices output of a top-k, or the ids of the experts it chose:
    nonzero(any(eq(top-k indices, arange(E)), over tokens)), as decompose.py's grouped MoE gathers by."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        kind = op_kind(node.target)
        if node.target is operator.getitem:
            src = node.args[0]
            return op_kind(getattr(src, "target", None)) == "aten.topk" and node.args[1] == 1
        if kind == "aten.eq":
            return any(_from_topk_indices(a) for a in node.args if isinstance(a, torch.fx.Node))
        if kind not in _TO_CHOSEN_IDS:
            return False
        node = node.args[0]
    return False


ROUTED_KERNEL = "mote.routed_experts"   # kernels/: reads only the experts named by its top_i argument


def _reads_chosen_only(user: torch.fx.Node, node: torch.fx.Node) -> bool:
    """user reads node only where the router's top-k chose: index_select(node, 0, top-k indices), or our kernel
    library's routed-experts op with node among its expert operands and the top-k indices as its top_i."""
    kind = op_kind(user.target)
    if kind == "aten.index_select":
        return user.args[0] is node and user.args[1] == 0 and _from_topk_indices(user.args[2])
    if kind == ROUTED_KERNEL:
        return node in user.args[3:9] and node not in user.args[:3] and _from_topk_indices(user.args[2])
    return False


def expert_reads(graph: torch.fx.Graph, names) -> dict[str, list[str]]:
    """Per placeholder in `names`: the ops that read it other than by the top-k choice (`_reads_chosen_only`).

    An empty list means only the router's selected experts are ever read from that tensor (an unused placeholder
    gets ["nothing"]: it is not read through a gather either).
    """
    out = {}
    for node in graph.nodes:
        if node.op != "placeholder" or node.name not in names:
            continue
        other = [op_kind(u.target) for u in node.users if not _reads_chosen_only(u, node)]
        out[node.name] = other if node.users else ["nothing"]
    return out


def _read_pte(path: Path):
    """The `.pte`'s flatbuffer program and the file's segment layout, without loading the constant data."""
    from executorch.exir._serialize._flatbuffer_program import _flatbuffer_to_program
    from executorch.exir._serialize._program import _ExtendedHeader, _get_extended_header

    with open(path, "rb") as f:
        head = f.read(_ExtendedHeader.NUM_HEAD_BYTES)
        header = _get_extended_header(head)
        f.seek(0)
        data = f.read(header.program_size) if header is not None else f.read()
    return _flatbuffer_to_program(data), header, path.stat().st_size


def _serialized_tensors(program, header, file_size: int, ep, method: str) -> dict[str, dict]:
    """FQN -> {dtype, shape, bytes, constant, memory_planned} of `method`'s parameter / buffer placeholders as the
    `.pte` stores them. `constant`: the data is in the file (a constant segment entry); `memory_planned`: the tensor
    lives in the method's planned memory (mutable buffers such as the KV cache).
    """
    from executorch.exir.scalar_type import ScalarType

    plan = next(p for p in program.execution_plan if p.name == method)
    fqns = {s.arg.name: s.target for s in ep.graph_signature.input_specs if s.target is not None}
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    segment = program.segments[program.constant_segment.segment_index] if program.segments else None
    offsets = program.constant_segment.offsets
    out = {}
    for node, value in zip(placeholders, plan.values):
        if node.name not in fqns:
            continue
        t = value.val
        dtype = _DTYPES.get(ScalarType(t.scalar_type).name, ScalarType(t.scalar_type).name.lower())
        shape = [int(s) for s in t.sizes]
        expected = node.meta["val"]
        # The emitter writes one value per placeholder in graph order; anything else and names would be wrong.
        if type(t).__name__ != "Tensor" or shape != list(expected.shape) or dtype != str(expected.dtype)[6:]:
            raise RuntimeError(f"android: {method}'s serialized values do not follow its placeholders "
                               f"({fqns[node.name]}: {dtype}{shape} in the .pte)")
        nbytes = _ELEMENT_SIZE[dtype] * int(torch.Size(shape).numel())
        constant = t.data_buffer_idx > 0
        if constant and segment is not None:
            idx = t.data_buffer_idx
            end = offsets[idx + 1] if idx + 1 < len(offsets) else segment.size
            if idx >= len(offsets) or end - offsets[idx] < nbytes or \
                    header.segment_base_offset + segment.offset + segment.size > file_size:
                raise RuntimeError(f"android: the .pte holds no data for {fqns[node.name]}")
        out[fqns[node.name]] = {"dtype": dtype, "shape": shape, "bytes": nbytes, "constant": constant,
                                "memory_planned": t.allocation_info is not None, "placeholder": node.name}
    return out


def _graphs(gm):
    """A method's graph and the original graphs of its delegated parts (what XNNPACK was given)."""
    yield gm.graph
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            sub = getattr(gm, node.target, None)
            original = getattr(sub, "original_module", None)
            if original is not None:
                yield from _graphs(original.graph_module)


def _activation_quantization(et) -> dict:
    """Quantize-type ops per method (in the graph or inside a delegate), and the int8 rounding of text_decoder."""
    quant, rounds, int8_clamps = {}, 0, 0
    for method in et.methods:
        ops = Counter()
        for graph in _graphs(et.exported_program(method).graph_module):
            for node in graph.nodes:
                if node.op != "call_function":
                    continue
                kind = op_kind(node.target)
                # quantize / dequantize / choose_qparams of activations (not the quantized kernels: embedding_byte,
                # our packed_quantized_linear, whose weights only are low-bit)
                if kind.rsplit(".", 1)[-1].startswith(("quantize", "dequantize", "choose_qparams")):
                    ops[kind] += 1
                if method == DECODER and kind == "aten.round":
                    rounds += 1
                if method == DECODER and kind == "aten.clamp" and list(node.args[1:3]) == [-128, 127]:
                    int8_clamps += 1
        if ops:
            quant[method] = dict(sorted(ops.items()))
    return {"quantize_ops": quant, "text_decoder_round_ops": rounds, "text_decoder_int8_clamps": int8_clamps}


def routed_constants(ep) -> set[str]:
    """FQNs of the routed-expert constants of a program (after the passes: the moe ops' stacked expert buffers)."""
    return {s.target for s in ep.graph_signature.input_specs if s.target is not None and ROUTED in s.target}


def read_back(pte_path: Path, et, routed_names: set[str]) -> dict:
    """Facts about the written `.pte` (see the module docstring); `et` is the ExecutorchProgramManager it came from,
    `routed_names` the routed-expert constants of the text_decoder that was lowered."""
    program, header, file_size = _read_pte(pte_path)
    ep = et.exported_program(DECODER)
    tensors = _serialized_tensors(program, header, file_size, ep, DECODER)
    routed = {fqn: t for fqn, t in tensors.items() if ROUTED in fqn}
    # A routed-expert tensor taken into a delegate (or folded away) would be missing from the count below.
    missing = sorted(routed_names - {fqn for fqn, t in routed.items() if t["constant"]})
    if missing:
        raise RuntimeError(f"android: {len(missing)} routed-expert tensors are not constants of the .pte's "
                           f"{DECODER} (e.g. {missing[0]}): their storage cannot be read back")
    by_name = {t["placeholder"]: fqn for fqn, t in routed.items()}
    embedding = _serialized_tensors(program, header, file_size, et.exported_program(EMBEDDING), EMBEDDING)
    reads = expert_reads(ep.graph, set(by_name))
    mutated = set(ep.graph_signature.buffers_to_mutate.values())
    return {
        "routed_experts": {
            "constants": [{"name": fqn, "dtype": t["dtype"], "shape": t["shape"], "bytes": t["bytes"]}
                          for fqn, t in routed.items()],
            "bytes": sum(t["bytes"] for t in routed.values()),
            "read_other_than_by_topk_gather": {by_name[p]: ops for p, ops in reads.items() if ops},
            "readers": sorted({op_kind(u.target) for n in ep.graph.nodes if n.name in by_name for u in n.users}),
        },
        "kv_cache": [{"name": fqn, "dtype": t["dtype"], "shape": t["shape"], "memory_planned": t["memory_planned"]}
                     for fqn, t in tensors.items() if fqn in mutated],
        "activations": _activation_quantization(et),
        "storage": _storage(program, header, file_size, pte_path),
        "kernels": kernel_facts(program),
        "quantized_linears": {**xnnpack_quantized_linears(program, header, pte_path),
                              **library_quantized_linears(program, header, file_size, et)},
        "embedding_constants": [{"name": fqn, "dtype": t["dtype"], "shape": t["shape"], "bytes": t["bytes"]}
                                for fqn, t in embedding.items() if t["constant"]],
    }


def kernel_facts(program) -> dict:
    """The ops of our kernel library the `.pte` calls (its operator tables, by method) and the library version it
    records in its VERSION_METHOD constant method (None: it needs no kernel library); and the ops of ExecuTorch's
    quantized kernels library it calls (`quantized_decomposed::embedding_byte`, ...: --quantize's embeddings)."""
    from .kernel_library import VERSION_METHOD

    calls, quantized, version = {}, {}, None
    for plan in program.execution_plan:
        if plan.name == VERSION_METHOD:
            version = int(plan.values[plan.outputs[0]].val.int_val)
        for op in plan.operators:
            namespace = op.name.split("::")[0]
            table = calls if namespace in ("mote", "mote_bench") else quantized if namespace == QUANTIZED_NS else None
            if table is not None:
                table.setdefault(f"{op.name}.{op.overload}", []).append(plan.name)
    return {"library_ops": {k: sorted(set(v)) for k, v in sorted(calls.items())}, "library_version": version,
            "executorch_quantized_ops": {k: sorted(set(v)) for k, v in sorted(quantized.items())}}


def pte_routed_expert_storage(pte_path: Path):
    """The routed experts' storage read from the `.pte` alone (no program to name the constants): the text_decoder's
    3-D constants [E, rows, K/4 or K] (uint8 codes, or the fp32 baseline's float weights) and the 2-D float scales
    [E, 1 or rows] beside them. The shared expert, router and attention weights are XNNPACK's (named data), and the
    only other constant, the embedding, is 2-D with another leading size."""
    from executorch.exir.scalar_type import ScalarType

    from mote.targets import RoutedExpertStorage

    program, _, _ = _read_pte(pte_path)
    plan = next(p for p in program.execution_plan if p.name == DECODER)
    constants = []
    for value in plan.values:
        t = value.val
        if type(t).__name__ == "Tensor" and t.data_buffer_idx > 0:
            dtype = _DTYPES.get(ScalarType(t.scalar_type).name, "?")
            constants.append((dtype, [int(s) for s in t.sizes]))
    experts = [(d, s) for d, s in constants if len(s) == 3]
    leading = {s[0] for _, s in experts}
    rows = {s[1] for _, s in experts} | {1}
    scales = [(d, s) for d, s in constants if len(s) == 2 and d == "float32" and s[0] in leading and s[1] in rows]
    tensors = experts + scales
    return RoutedExpertStorage(bytes=sum(_ELEMENT_SIZE[d] * int(torch.Size(s).numel()) for d, s in tensors),
                               tensors=len(tensors), where=f"{pte_path.name}: {DECODER} constants")


# XNNPACK's datatypes as its kernels are named (qd8-f32-qb4w: int8 dynamic activations, f32 out, 4-bit blockwise)
_XNN_TYPES = {"xnn_datatype_qdint8": "qd8", "xnn_datatype_fp32": "f32", "xnn_datatype_qbint4": "qb4w",
              "xnn_datatype_qcint4": "qc4w", "xnn_datatype_qcint8": "qc8w"}


def _delegate_graphs(program, header, pte_path: Path) -> dict[str, list[dict]]:
    """{method: [XNNGraph as JSON]} of every XNNPACK delegate payload in the `.pte` (decoded with ExecuTorch's
    flatc and XNNPACK's schema, all payloads in one call)."""
    import json
    import re
    import tempfile

    import executorch.backends.xnnpack.serialization as xnn_serialization
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
    from executorch.exir._serialize._flatbuffer import _run_flatc

    schema = Path(next(iter(xnn_serialization.__path__))) / "schema.fbs"
    owners = [(plan.name, d.processed.index) for plan in program.execution_plan for d in plan.delegates
              if d.id == "XnnpackBackend" and d.processed.location.name == "SEGMENT"]
    with tempfile.TemporaryDirectory(prefix="mote-xnn-") as tmp, open(pte_path, "rb") as f:
        for i, (_, segment) in enumerate(owners):
            seg = program.segments[segment]
            f.seek(header.segment_base_offset + seg.offset)
            blob = f.read(seg.size)
            xh = XNNHeader.from_bytes(blob[:XNNHeader.EXPECTED_LENGTH])
            Path(tmp, f"{i}.bin").write_bytes(blob[xh.flatbuffer_offset:xh.flatbuffer_offset + xh.flatbuffer_size])
        if owners:
            _run_flatc(["--json", "--defaults-json", "--strict-json", "-o", tmp, str(schema), "--"]
                       + [str(Path(tmp, f"{i}.bin")) for i in range(len(owners))])
        graphs: dict[str, list[dict]] = {}
        for i, (method, _) in enumerate(owners):
            # flatc writes non-finite floats (a clamp's bounds) as bare inf / nan, which JSON has no word for
            text = re.sub(r'(?<=[\s:\[,])(-?(?:inf|nan))(?=[\s,\]}])', r'"\1"', Path(tmp, f"{i}.json").read_text())
            graphs.setdefault(method, []).append(json.loads(text))
    return graphs


def _quantized_fully_connected(graph: dict):
    """(kind, weight key, weight elements, scale key, scale count, group size) of each fully connected node of an
    XNNGraph whose filter is a quantized tensor."""
    values = [v["xvalue_union"] for v in graph["xvalues"]]
    by_id = {(v.get("tensor_value") or v)["id_out"]: v for v in values}
    for node in graph["xnodes"]:
        if node["xnode_union_type"] != "XNNFullyConnected":
            continue
        filt, act = by_id[node["xnode_union"]["filter_id"]], by_id[node["xnode_union"]["input1_id"]]
        if "tensor_value" not in filt:
            continue
        tensor, params = filt["tensor_value"], filt["quant_params"]
        kind = (f"{_XNN_TYPES.get((act.get('tensor_value') or act)['datatype'], '?')}-f32-"
                f"{_XNN_TYPES.get(tensor['datatype'], tensor['datatype'])}")
        keys = graph["constant_data"]
        numel = int(torch.Size(tensor["dims"]).numel())
        yield (kind, keys[tensor["constant_buffer_idx"]]["named_key"], numel,
               keys[params["scale_buffer_idx"]]["named_key"], params["num_scales"],
               params.get("group_size") or tensor["dims"][1])


def _linear_kind(kernel: str) -> dict:
    """The running totals of one kind of quantized linear (`xnnpack_quantized_linears`, `library_quantized_linears`)."""
    return {"kernel": kernel, "count": {}, "weights": 0, "weight_bytes": 0, "scales": 0, "scale_bytes": 0,
            "group_sizes": set()}


def _finished(kinds: dict) -> dict:
    for k in kinds.values():
        k["group_sizes"] = sorted(k["group_sizes"])
    return dict(sorted(kinds.items()))


def xnnpack_quantized_linears(program, header, pte_path: Path) -> dict:
    """The linears XNNPACK runs on quantized weights, read from its delegate payloads: per kernel kind ('qd8-f32-qb4w':
    int8 per-token dynamic activations, 4-bit blockwise weights) the count per method, the weights and the bytes the
    `.pte` stores for them and their scales (XNNPACK's named data, each distinct blob once), and the group sizes."""
    sizes = {d.key: program.segments[d.segment_index].size for d in (program.named_data or [])}
    kinds: dict[str, dict] = {}
    seen = set()
    for method, graphs in _delegate_graphs(program, header, pte_path).items():
        for graph in graphs:
            for kind, w_key, numel, s_key, n_scales, group in _quantized_fully_connected(graph):
                k = kinds.setdefault(kind, _linear_kind("XNNPACK"))
                k["count"][method] = k["count"].get(method, 0) + 1
                k["weights"] += numel
                k["scales"] += n_scales
                k["group_sizes"].add(group)
                k["weight_bytes"] += sizes[w_key] if w_key not in seen else 0
                k["scale_bytes"] += sizes[s_key] if s_key not in seen else 0
                seen.update((w_key, s_key))
    return _finished(kinds)


def _library_kind(bits: int, group: int, k: int) -> str:
    """Our weight-only linear named the way XNNPACK names its kernels: f32 activations, 4-bit blockwise (qb4w) or
    8-bit per channel (qc8w) / blockwise (qb8w) weights."""
    return f"f32-qb{bits}w" if group != k or bits == 4 else "f32-qc8w"


def library_quantized_linears(program, header, file_size: int, et) -> dict:
    """The linears our kernel library's weight-only `mote::packed_quantized_linear` runs, read from each method's
    program and the `.pte`'s constants: per kind (see `_library_kind`) the calls per method, the weights and the
    bytes the file stores for them and their scales, and the group sizes."""
    kinds: dict[str, dict] = {}
    for method in et.methods:
        ep = et.exported_program(method)
        calls = [n for n in ep.graph.nodes if n.op == "call_function" and "packed_quantized_linear" in str(n.target)]
        if not calls:
            continue
        stored = {t["placeholder"]: t for t in _serialized_tensors(program, header, file_size, ep, method).values()}
        for node in calls:
            x, packed, scale, _, bits, group = node.args[:6]
            k_in = x.meta["val"].shape[-1]
            w, s = stored[packed.name], stored[scale.name]
            k = kinds.setdefault(_library_kind(bits, group, k_in), _linear_kind("mote::packed_quantized_linear"))
            k["count"][method] = k["count"].get(method, 0) + 1
            k["weights"] += w["shape"][0] * k_in
            k["weight_bytes"] += w["bytes"]
            k["scales"] += s["bytes"] // 4
            k["scale_bytes"] += s["bytes"]
            k["group_sizes"].add(group)
    return _finished(kinds)


def _storage(program, header, file_size: int, pte_path: Path) -> dict:
    """Where the .pte keeps its data, from its header and flatbuffer: the constant segment (portable-op constants:
    routed-expert codes, embeddings), the delegates' named data (XNNPACK's weights), the delegate payloads, and any
    external .ptd data file next to it."""
    sizes = [s.size for s in program.segments]
    named = {d.segment_index for d in (program.named_data or [])}
    delegate = {d.processed.index for plan in program.execution_plan for d in plan.delegates
                if d.processed.location.name == "SEGMENT"}
    constant = program.constant_segment.segment_index if program.segments else None
    return {
        "file_bytes": file_size,
        "flatbuffer_bytes": header.program_size if header is not None else file_size,
        "segments": len(sizes),
        "constant_segment_bytes": sizes[constant] if constant is not None else 0,
        "named_data_bytes": sum(sizes[i] for i in named),
        "delegate_payload_bytes": sum(sizes[i] for i in delegate),
        "external_data_files": sorted(p.name for p in pte_path.parent.glob("*.ptd")),
    }


def _shapes(items) -> str:
    """[{dtype, shape}, ...] -> 'uint8 [4, 96, 16] x4, float32 [4, 1] x6'."""
    counts = Counter((i["dtype"], tuple(i["shape"])) for i in items)
    return ", ".join(f"{d} {list(s)} x{n}" for (d, s), n in counts.items())


def _quantized_notes(facts: dict) -> list[str]:
    """--quantize: the low-bit linears (XNNPACK's payloads, our kernel's calls) and the stored embedding table."""
    notes = []
    for kind, q in facts["quantized_linears"].items():
        where = ", ".join(f"{m} x{n}" for m, n in sorted(q["count"].items()))
        what = ("fully-connected operators" if q["kernel"] == "XNNPACK" else
                "calls on fp32 activations, the weights dequantized on the fly")
        notes.append(f"quantized linears, {q['kernel']} {kind}: {sum(q['count'].values())} {what} "
                     f"({where}); {q['weights']} weights stored in {q['weight_bytes']} bytes "
                     f"({q['weight_bytes'] * 8 / max(q['weights'], 1):.2f} bits/weight) + {q['scale_bytes']} bytes "
                     f"for {q['scales']} scales, groups of {'/'.join(map(str, q['group_sizes']))} inputs")
    ops = facts["kernels"]["executorch_quantized_ops"]
    if any(EMBEDDING in methods for methods in ops.values()):
        notes.append(f"quantized embedding: token_embedding stores {_shapes(facts['embedding_constants'])} "
                     f"({sum(c['bytes'] for c in facts['embedding_constants'])} bytes) and gathers the rows of its "
                     "tokens with ExecuTorch's quantized embedding kernel")
    return notes


def render_deviations(facts: dict) -> list[str]:
    """Where the lowered kernels depart from the reference, worded from `facts`: XNNPACK's dynamically quantized
    linears (int8 per-token activations) and blockwise scales stored in 2 bytes (bf16) instead of fp32."""
    out = []
    for kind, q in facts["quantized_linears"].items():
        if kind.startswith("qd8-"):
            where = ", ".join(f"{m} x{n}" for m, n in sorted(q["count"].items()))
            out.append(f"activation quantization: {sum(q['count'].values())} linears ({where}) run as XNNPACK {kind} "
                       "operators, which quantize their input to int8 per token (asymmetric, scale and zero point "
                       "chosen at run time); the reference multiplies the fp32 input by the dequantized weight")
        if q["scales"] and q["scale_bytes"] < 4 * q["scales"]:
            out.append(f"weight scales: the {q['scales']} scales of the {kind} weights take {q['scale_bytes']} bytes "
                       f"in the .pte ({q['scale_bytes'] / q['scales']:.0f} bytes each: XNNPACK's bf16 blockwise "
                       "scales); the reference's are fp32")
    return out


def render_notes(facts: dict, routed_weights: int) -> list[str]:
    """The report's sentences, each worded from `facts` alone."""
    r = facts["routed_experts"]
    notes = [f"routed experts: {len(r['constants'])} constants in the .pte's text_decoder ({_shapes(r['constants'])}): "
             f"{r['bytes']} bytes for {routed_weights} weights, {r['bytes'] * 8 / max(routed_weights, 1):.3f} "
             "bits/weight"]
    st = facts["storage"]
    where = ("in the .pte's own segments, no external .ptd: the runtime maps them from the one file"
             if not st["external_data_files"] else f"partly in {', '.join(st['external_data_files'])}")
    notes.append(f"storage: {st['file_bytes']} bytes, {st['flatbuffer_bytes']} of them the program; constants "
                 f"{where} ({st['segments']} segments: constant segment {st['constant_segment_bytes']} bytes, "
                 f"XNNPACK named data {st['named_data_bytes']} bytes, delegate payloads "
                 f"{st['delegate_payload_bytes']} bytes)")
    k = facts["kernels"]
    if k["library_ops"]:
        ops = "; ".join(f"{op} ({', '.join(methods)})" for op, methods in k["library_ops"].items())
        notes.append(f"kernels: the .pte calls our kernel library's {ops}; it records version {k['library_version']} "
                     "of the library, which must be linked into the runtime (mote-run and the verification load it)")
    else:
        notes.append("kernels: portable ATen ops and XNNPACK only (--android-kernels portable): runs in any ExecuTorch "
                     "runtime, without our kernel library")
    if k["executorch_quantized_ops"]:
        ops = "; ".join(f"{op} ({', '.join(methods)})" for op, methods in k["executorch_quantized_ops"].items())
        notes.append(f"kernels: the .pte calls ExecuTorch's quantized kernels library's {ops}: the runtime must link "
                     "it (quantized_ops_lib, as ExecuTorch's LLM runners do; the verification loads the wheel's)")
    notes.extend(_quantized_notes(facts))
    other = r["read_other_than_by_topk_gather"]
    if r["constants"] and not other:
        notes.append(f"routed-expert reads: all {len(r['constants'])} routed-expert constants are read only by "
                     f"{' and '.join(r['readers'])} on the experts the router's top-k chose: only chosen experts' "
                     "bytes are read")
    elif other:
        first = next(iter(other.items()))
        notes.append(f"routed-expert reads: {len(other)} of {len(r['constants'])} routed-expert constants are also "
                     f"read by other ops (e.g. {first[0]}: {', '.join(first[1])}): unselected experts are read too")
    a = facts["activations"]
    quant = "; ".join(f"{m}: {', '.join(f'{k} x{n}' for k, n in ops.items())}" for m, ops in a["quantize_ops"].items())
    if a["text_decoder_round_ops"]:
        rounding = (f"text_decoder rounds activations to the int8 grid itself ({a['text_decoder_round_ops']} round, "
                    f"{a['text_decoder_int8_clamps']} clamp(-128, 127) ops)")
    elif facts["kernels"]["library_ops"]:
        rounding = ("text_decoder's graph rounds no activation to the int8 grid: the routed experts' per-token int8 "
                    "quantization runs inside our kernel library's ops")
    else:
        rounding = "text_decoder rounds no activation to the int8 grid"
    notes.append(f"activations: quantize/dequantize ops in the methods and their XNNPACK delegates: {quant or 'none'}; "
                 + rounding)
    kv = facts["kv_cache"]
    if kv:
        planned = "memory-planned" if all(t["memory_planned"] for t in kv) else "not all memory-planned"
        notes.append(f"KV cache: {len(kv)} mutable buffers of text_decoder, {planned} ({kv[0]['name']} ... "
                     f"{kv[-1]['name']}: {_shapes(kv)})")
    else:
        notes.append("KV cache: text_decoder has no mutable buffers")
    for method, d in sorted(facts.get("delegation", {}).items()):
        # memory.alloc / memory.view are emitter instructions (planned memory, aliasing), not kernels
        portable = ", ".join(f"{k} x{n}" for k, n in d["portable_ops"].items() if k not in ("alloc", "view"))
        notes.append(f"delegation, {method}: {d['xnnpack_delegates']} XNNPACK delegate calls; on portable kernels: "
                     f"{portable or 'nothing'}")
    return notes
