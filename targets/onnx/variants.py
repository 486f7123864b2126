"""ONNX-to-ONNX rewrites of the exported QMoE nodes into the two other variants users ask for.

- `to_portable`: standard ONNX ops only (opset 25), for runtimes without `com.microsoft` ops. Each expert's weights
  become an INT2 initializer (trits in two's complement, 2 bits each) with block-wise fp32 scales, decoded by
  `DequantizeLinear(axis=0, block_size)` and multiplied by `MatMul`. Standard ONNX has no op that reads only the
  selected experts' weights, so every expert is computed and the router's dense top-k weights combine them
  (this is said in the report). The other low-bit nodes become standard ops too:
      MatMulNBits(x, B, scales, bias?)  -> MatMul(x, DequantizeLinear(W^T INTb [K, N], scales)) (+ bias)
                                           per axis 1 for one block per row, else blocked along K (axis 0)
      GatherBlockQuantized(data, ids, scales), 8 bits -> DequantizeLinear(Gather(W INT8, ids), Gather(scales, ids))
      GatherBlockQuantized, 4 bits      -> Gather(DequantizeLinear(W INT4), ids): ONNX Runtime's Gather takes no
                                           INT4 (measured with 1.32), so the whole table is dequantized
- `to_fp32_experts`: the same model with float32 experts in `com.microsoft.MoE` — the fp32 baseline of the
  benchmark (same runtime, same routing kernel family), never a deployment artifact.

Both start from the QMoE node the normal export produced:
    QMoE(x [N, d_pad], logits [N, E], fc1 u8[E, 2I, d/4], fc1_s [E, 2I, d/bs], -, fc2 u8[E, d, I/4], fc2_s [E, d, I/bs],
         ..., router_weights = softmax(logits))
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from mote.passes.ops import unpack_codes

from .repack import unpack_nbits
from .report import INT8_ACTIVATIONS_LEVEL

PORTABLE_OPSET = 25
INT_DTYPES = {2: ml_dtypes.int2, 4: ml_dtypes.int4, 8: np.int8}


def _codes(packed: np.ndarray, k: int) -> np.ndarray:
    """uint8 [..., K/4] -> codes uint8 [..., K]: the canonical unpacking of passes.ops, on numpy arrays."""
    return unpack_codes(torch.from_numpy(np.array(packed, copy=True)), k).numpy()   # a writable copy


def _qmoe_parts(model: onnx.ModelProto, node: onnx.NodeProto):
    inits = {t.name: t for t in model.graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    arr = lambda i: numpy_helper.to_array(inits[node.input[i]])  # noqa: E731
    fc1_s, fc2_s = arr(3), arr(6)
    d_pad, i_pad = fc1_s.shape[2] * attrs["block_size"], fc2_s.shape[2] * attrs["block_size"]
    return attrs, _codes(arr(2), d_pad), fc1_s, _codes(arr(5), i_pad), fc2_s


def _replace(model: onnx.ModelProto, node: onnx.NodeProto, new_nodes, new_inits, replaced=None) -> None:
    """`node` -> `new_nodes`; the initializers among `replaced` (default: QMoE's weights) that nothing else reads go."""
    g = model.graph
    idx = list(g.node).index(node)
    used = set(node.input[2:7] if replaced is None else replaced)
    g.node.remove(node)
    for j, n in enumerate(new_nodes):
        g.node.insert(idx + j, n)
    still_used = {i for n in g.node for i in n.input}
    for t in [t for t in g.initializer if t.name in used and t.name not in still_used]:
        g.initializer.remove(t)
    g.initializer.extend(new_inits)


def to_fp32_experts(model: onnx.ModelProto) -> onnx.ModelProto:
    """QMoE (2-bit) -> com.microsoft.MoE with the dequantized float32 weights (benchmark baseline)."""
    for node in [n for n in model.graph.node if n.op_type == "QMoE"]:
        attrs, c1, s1, c2, s2 = _qmoe_parts(model, node)
        bs = attrs["block_size"]
        w1 = (c1.astype(np.float32) - 2) * np.repeat(s1, bs, axis=-1)
        w2 = (c2.astype(np.float32) - 2) * np.repeat(s2, bs, axis=-1)
        name = node.name or node.output[0]
        inits = [numpy_helper.from_array(w1, f"{name}_fc1_f32"), numpy_helper.from_array(w2, f"{name}_fc2_f32")]
        moe = helper.make_node(
            "MoE", [node.input[0], node.input[1], inits[0].name, "", inits[1].name], list(node.output),
            name=f"{name}_fp32", domain="com.microsoft", k=attrs["k"], activation_type="swiglu", swiglu_fusion=1,
            activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=attrs.get("normalize_routing_weights", 0))
        _replace(model, node, [moe], inits)
    return model


def _int2(trits: np.ndarray, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(trits.astype(np.int8).astype(ml_dtypes.int2), name)


def _attrs_and_inputs(model: onnx.ModelProto, node: onnx.NodeProto):
    inits = {t.name: t for t in model.graph.initializer}
    arrays = [numpy_helper.to_array(inits[i]) if i in inits else None for i in node.input]
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}, arrays


def _integers(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes packed along the last dim (zero point 2^(bits-1)) -> the symmetric integers (int8)."""
    return unpack_nbits(torch.from_numpy(np.array(packed, copy=True)), bits).numpy().astype(np.int8)


def _int_initializer(q: np.ndarray, bits: int, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(q).astype(INT_DTYPES[bits]), name)


def _check_no_zero_points(node: onnx.NodeProto, arrays) -> None:
    if len(arrays) > 3 and arrays[3] is not None:
        raise RuntimeError(f"onnx --portable: {node.op_type} {node.name} has zero points (only symmetric weights are "
                           "lowered)")


def _matmul_nbits_portable(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    """MatMulNBits -> DequantizeLinear(W^T INTb, scales) + MatMul (+ Add of its bias)."""
    a, arrays = _attrs_and_inputs(model, node)
    _check_no_zero_points(node, arrays)
    k, n, bits, block = a["K"], a["N"], a["bits"], a["block_size"]
    p = node.name or node.output[0]
    w = _int_initializer(_integers(arrays[1].reshape(n, -1), bits)[:, :k].T, bits, p + "_wq")
    scales = arrays[2].reshape(n, -1)
    if scales.shape[1] == 1:   # one block per row: per output channel
        s, dq_attrs = numpy_helper.from_array(scales[:, 0].copy(), p + "_ws"), {"axis": 1}
    else:
        s, dq_attrs = numpy_helper.from_array(scales.T.copy(), p + "_ws"), {"axis": 0, "block_size": block}
    bias = node.input[5] if len(node.input) > 5 and node.input[5] else None
    nodes = [helper.make_node("DequantizeLinear", [w.name, s.name], [p + "_w"], **dq_attrs),
             helper.make_node("MatMul", [node.input[0], p + "_w"], [p + "_mm"] if bias else list(node.output))]
    if bias:
        nodes.append(helper.make_node("Add", [p + "_mm", bias], list(node.output)))
    _replace(model, node, nodes, [w, s], replaced=node.input[1:3])


def _gather_block_quantized_portable(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    """GatherBlockQuantized (gather axis 0, quantized along axis 1) -> Gather + DequantizeLinear (see the docstring)."""
    a, arrays = _attrs_and_inputs(model, node)
    _check_no_zero_points(node, arrays)
    if a.get("gather_axis", 0) != 0 or a.get("quantize_axis", 1) != 1 or arrays[0].dtype != np.uint8:
        raise RuntimeError(f"onnx --portable: GatherBlockQuantized {node.name}: only uint8 data gathered on axis 0, "
                           "quantized along axis 1, is lowered")
    bits, block, ids = a.get("bits", 4), a["block_size"], node.input[1]
    p = node.name or node.output[0]
    w = _int_initializer(_integers(arrays[0], bits), bits, p + "_wq")
    s = numpy_helper.from_array(arrays[2], p + "_ws")
    dq = dict(axis=-1, block_size=block)
    if bits == 8:
        nodes = [helper.make_node("Gather", [w.name, ids], [p + "_rows"], axis=0),
                 helper.make_node("Gather", [s.name, ids], [p + "_row_scales"], axis=0),
                 helper.make_node("DequantizeLinear", [p + "_rows", p + "_row_scales"], list(node.output), **dq)]
    else:
        nodes = [helper.make_node("DequantizeLinear", [w.name, s.name], [p + "_table"], **dq),
                 helper.make_node("Gather", [p + "_table", ids], list(node.output), axis=0)]
    _replace(model, node, nodes, [w, s], replaced=[node.input[0], node.input[2]])


def to_portable(model: onnx.ModelProto) -> onnx.ModelProto:
    """QMoE -> DequantizeLinear(INT2, blocked) + MatMul per expert, dense top-k combine; opset 25, no contrib ops."""
    for node in [n for n in model.graph.node if n.op_type == "QMoE"]:
        attrs, c1, s1, c2, s2 = _qmoe_parts(model, node)
        bs, k, renorm = attrs["block_size"], attrs["k"], attrs.get("normalize_routing_weights", 0)
        x, logits, probs = node.input[0], node.input[1], node.input[14]
        p = (node.name or node.output[0]) + "_p"
        n_experts = c1.shape[0]
        nodes, inits = [], []

        def const(name, value):
            inits.append(numpy_helper.from_array(np.asarray(value), p + name))
            return p + name

        # dense top-k routing weights [N, E]: p_i on the selected experts, 0 elsewhere (renormalised if asked)
        nodes += [helper.make_node("TopK", [logits, const("_k", np.array([k], np.int64))], [p + "_tv", p + "_ti"], axis=-1),
                  helper.make_node("GatherElements", [probs, p + "_ti"], [p + "_tp"], axis=-1)]
        top = p + "_tp"
        if renorm:
            nodes += [helper.make_node("ReduceSum", [top, const("_ax", np.array([-1], np.int64))], [p + "_ts"], keepdims=1),
                      helper.make_node("Div", [top, p + "_ts"], [p + "_tpn"])]
            top = p + "_tpn"
        nodes += [helper.make_node("Shape", [probs], [p + "_shape"]),
                  helper.make_node("ConstantOfShape", [p + "_shape"], [p + "_zeros"],
                                   value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
                  helper.make_node("ScatterElements", [p + "_zeros", p + "_ti", top], [p + "_combine"], axis=-1)]
        acc = None
        for e in range(n_experts):
            q = f"{p}{e}"
            # MatMul wants B = W^T [K, N]; trits in two's complement INT2, scales blocked along K (axis 0)
            w1 = _int2((c1[e].astype(np.int16) - 2).T, q + "_w1")
            w2 = _int2((c2[e].astype(np.int16) - 2).T, q + "_w2")
            inits += [w1, numpy_helper.from_array(np.ascontiguousarray(s1[e].T), q + "_s1"),
                      w2, numpy_helper.from_array(np.ascontiguousarray(s2[e].T), q + "_s2")]
            i_pad = c1.shape[1] // 2
            nodes += [
                helper.make_node("DequantizeLinear", [q + "_w1", q + "_s1"], [q + "_W1"], axis=0, block_size=bs),
                helper.make_node("MatMul", [x, q + "_W1"], [q + "_h"]),
                helper.make_node("Slice", [q + "_h", const(f"_{e}g0", np.array([0])), const(f"_{e}g1", np.array([2 * i_pad])),
                                           const(f"_{e}ax", np.array([1])), const(f"_{e}st", np.array([2]))], [q + "_g"]),
                helper.make_node("Slice", [q + "_h", const(f"_{e}u0", np.array([1])), const(f"_{e}u1", np.array([2 * i_pad])),
                                           p + f"_{e}ax", p + f"_{e}st"], [q + "_u"]),
                helper.make_node("Sigmoid", [q + "_g"], [q + "_sg"]),
                helper.make_node("Mul", [q + "_g", q + "_sg"], [q + "_silu"]),
                helper.make_node("Mul", [q + "_silu", q + "_u"], [q + "_a"]),
                helper.make_node("DequantizeLinear", [q + "_w2", q + "_s2"], [q + "_W2"], axis=0, block_size=bs),
                helper.make_node("MatMul", [q + "_a", q + "_W2"], [q + "_o"]),
                helper.make_node("Slice", [p + "_combine", const(f"_{e}c0", np.array([e])), const(f"_{e}c1", np.array([e + 1])),
                                           p + f"_{e}ax"], [q + "_c"]),
                helper.make_node("Mul", [q + "_c", q + "_o"], [q + "_y"]),
            ]
            if acc is None:
                acc = q + "_y"
            else:
                nodes.append(helper.make_node("Add", [acc, q + "_y"], [q + "_acc"]))
                acc = q + "_acc"
        nodes.append(helper.make_node("Identity", [acc], list(node.output)))
        _replace(model, node, nodes, inits)
    for node in [n for n in model.graph.node if n.domain == "com.microsoft" and n.op_type == "MatMulNBits"]:
        _matmul_nbits_portable(model, node)
    for node in [n for n in model.graph.node if n.domain == "com.microsoft" and n.op_type == "GatherBlockQuantized"]:
        _gather_block_quantized_portable(model, node)
    leftover = sorted({n.op_type for n in model.graph.node if n.domain == "com.microsoft"})
    if leftover:
        raise RuntimeError(f"onnx --portable: no standard-op lowering for com.microsoft {leftover}")
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = max(imp.version, PORTABLE_OPSET)
    kept = [imp for imp in model.opset_import if imp.domain != "com.microsoft"
            or any(n.domain == "com.microsoft" for n in model.graph.node)]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    model.ir_version = max(model.ir_version, 11)
    return model



def with_int8_activations(model: onnx.ModelProto) -> onnx.ModelProto:
    """`--int8-activations`: the quantized linears' MatMulNBits (bits 4 and 8; not the 2-bit routed experts) at
    accuracy_level 4, where ORT's CPU kernels quantize the activations to int8 per block and use integer dot products
    (measured here: 4-bit 1024x4096 0.20 vs 0.33 ms, 8-bit 0.2 vs 7.5 ms at level 0). A declared deviation
    (report.py reads the level back)."""
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        attrs = {a.name: a for a in node.attribute}
        if attrs["bits"].i in (4, 8):
            if "accuracy_level" in attrs:
                node.attribute.remove(attrs["accuracy_level"])
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", INT8_ACTIVATIONS_LEVEL))
    return model
