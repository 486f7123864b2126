"""onnxscript translations of the ONNX-side ops (torch.onnx `custom_translation_table`).

    mote_onnx.moe_block   -> shared expert as MatMuls (+ sigmoid gate), router MatMul + Softmax,
                             com.microsoft.QMoE (2-bit, block-wise, interleaved SwiGLU) for the routed experts
    mote_onnx.matmul_2bit -> com.microsoft.MatMulNBits (bits=2)
    mote_onnx.matmul_nbits -> com.microsoft.MatMulNBits (bits 4 or 8, bias as its input 5, accuracy_level 0: ORT
                              computes with float activations, the reference's weight-only dequantization)
    mote_onnx.gather_block_quantized -> com.microsoft.GatherBlockQuantized (uint8 data, bits 4 or 8)

A moe_block without shared-expert weights (quantized: computed outside by MatMulNBits) is the router and the
routed experts alone.

Routing: QMoE selects the top-k from `router_probs` (logits here) and, by default, mixes with a softmax over only
the k selected values (so top-1 always gets weight 1.0). We pass the full softmax as `router_weights` (input 14),
so the mixing weight is p_i of the whole softmax, applied exactly once, renormalised over the top-k only when the
model says so (`normalize_routing_weights`).
"""
from __future__ import annotations

import functools

import onnx
import torch
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

from . import repack  # noqa: F401  (registers the mote_onnx:: ops named below)


@functools.cache
def ort_contrib_op(name: str, domain: str = "com.microsoft") -> Op:
    """An onnxscript Op for an ONNX Runtime contrib op, with the schema taken from ORT's own registry.

    onnx.defs knows no com.microsoft schemas, and torch's onnxscript recorder needs one to build the node.
    """
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    s = next(x for x in ort_c.get_all_operator_schema() if x.name == name and x.domain == domain)
    formal = onnx.defs.OpSchema.FormalParameter
    options = {k: getattr(onnx.defs.OpSchema.FormalParameterOption, k) for k in ("Single", "Optional", "Variadic")}

    def param(p):
        return formal(p.name, p.typeStr, param_option=options[str(p.option).split(".")[-1]])

    attrs = [onnx.defs.OpSchema.Attribute(a.name, getattr(onnx.defs.OpSchema.AttrType, str(a.type).split(".")[-1]),
                                          required=a.required) for a in s.attributes.values()]
    schema = onnx.defs.OpSchema(
        name, domain, s.since_version, inputs=[param(p) for p in s.inputs], outputs=[param(p) for p in s.outputs],
        attributes=attrs, type_constraints=[(t.type_param_str, list(t.allowed_type_strs), "") for t in s.type_constraints])
    return Op(Opset(domain, s.since_version), name, op_schema=schema)


def _linear(x, w):
    return op.MatMul(x, op.Transpose(w, perm=[1, 0]))


def _pad_last(x2d, pad: int):
    if pad == 0:
        return x2d
    return op.Pad(x2d, op.Constant(value_ints=[0, 0, 0, pad]))


def moe_block(x, shared_gate, shared_up, shared_down, shared_expert_gate, router, fc1_w, fc1_s, fc2_w, fc2_s,
              top_k: int, norm_topk_prob: bool, block: int, d: int, inter: int, d_pad: int, i_pad: int):
    shared = None if shared_gate is None else _shared_expert(x, shared_gate, shared_up, shared_down,
                                                             shared_expert_gate)
    flat = op.Reshape(x, op.Constant(value_ints=[-1, d]))
    logits = _linear(flat, router)
    probs = op.Softmax(logits, axis=-1)
    routed = ort_contrib_op("QMoE")(
        _pad_last(flat, d_pad - d), logits, fc1_w, fc1_s, None, fc2_w, fc2_s, None, None, None, None, None, None, None,
        probs, k=top_k, expert_weight_bits=2, block_size=block, activation_type="swiglu", swiglu_fusion=1,
        activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=int(norm_topk_prob))
    if d_pad != d:
        routed = op.Slice(routed, op.Constant(value_ints=[0]), op.Constant(value_ints=[d]), op.Constant(value_ints=[1]))
    routed = op.Reshape(routed, op.Shape(x))
    return routed if shared is None else op.Add(shared, routed)


def _shared_expert(x, gate, up, down, shared_expert_gate):
    g = _linear(x, gate)
    shared = _linear(op.Mul(op.Mul(g, op.Sigmoid(g)), _linear(x, up)), down)
    if shared_expert_gate is not None:
        shared = op.Mul(op.Sigmoid(_linear(x, shared_expert_gate)), shared)
    return shared


def matmul_2bit(x, b, scales, k: int, k_pad: int, block: int):
    if k_pad != k:
        shape = op.Shape(x)
        x = op.Reshape(_pad_last(op.Reshape(x, op.Constant(value_ints=[-1, k])), k_pad - k),
                       op.Concat(op.Slice(shape, op.Constant(value_ints=[0]), op.Constant(value_ints=[-1])),
                                 op.Constant(value_ints=[k_pad]), axis=0))
    return ort_contrib_op("MatMulNBits")(x, b, scales, K=k_pad, N=b.shape[0], bits=2, block_size=block, accuracy_level=0)


def matmul_nbits(x, b, scales, bias, k: int, bits: int, block: int):
    return ort_contrib_op("MatMulNBits")(x, b, scales, None, None, bias, K=k, N=b.shape[0], bits=bits,
                                         block_size=block, accuracy_level=0)


def gather_block_quantized(tokens, data, scales, bits: int, block: int):
    return ort_contrib_op("GatherBlockQuantized")(data, tokens, scales, bits=bits, block_size=block, gather_axis=0,
                                                  quantize_axis=1)


TRANSLATIONS = {
    torch.ops.mote_onnx.moe_block.default: moe_block,
    torch.ops.mote_onnx.matmul_2bit.default: matmul_2bit,
    torch.ops.mote_onnx.matmul_nbits.default: matmul_nbits,
    torch.ops.mote_onnx.gather_block_quantized.default: gather_block_quantized,
}
