"""`--quantize` on ExecuTorch: the `mote::` quantized ops rewritten into ops the `.pte`'s runtime runs natively, with
the weights kept low-bit (our integers and scales, zero points 0).

Before (passes/fuse_quantized_linear.py; Q int8 [out, K] holds int4 values when bits = 4, S f32 [out, K/g]):

    y = mote.quantized_linear(x, Q, S, b?, bits, g)
    e = mote.quantized_embedding(tokens, Q, S, bits, g)

After, for each linear, by default (weight-only: the reference's own numerics, verified at the fp32 bar), one call
of our kernel library's weight-only linear (kernels/, `mote::packed_quantized_linear.out`), which dequantizes the
weights on the fly and multiplies the fp32 input:

    y = mote.packed_quantized_linear(x, P, S, b?, bits, g)       bits = 8: P = Q
                                                                 bits = 4: P uint8 [out, K/2] in spans of 32 inputs,
                                                                 byte i of span s: (Q[32s+i] + 8) | (Q[32s+16+i] + 8) << 4

With `--int8-activations` (or `--android-kernels portable`, which has no kernel library of ours), the graph torchao's
`Int8DynamicActivationIntxWeightConfig` exports (torchao 0.18), which XNNPACK's partitioner (executorch 1.5.1,
gemm_configs.LinearConfig, DYNAMIC_QUANT) takes whole into one fully connected operator on int8 per-token
dynamically quantized activations: qd8-f32-qb4w for int4 in groups (XNNPACK packs Q two per byte; its group scales
are bf16), qd8-f32-qc8w for int8 per output channel. XNNPACK has no weight-only low-bit linear in this release (the
partitioner's STATIC_QUANT path needs quantized activations), hence our kernel for the default:

    s_x, z_x = torchao.choose_qparams_affine(x, "ASYMMETRIC", [1, .., 1, K], int8, -128, 127, None, None, int8)
    x_dq     = torchao.dequantize_affine(torchao.quantize_affine(x, [1, .., 1, K], s_x, z_x, int8, -128, 127),
                                         [1, .., 1, K], s_x, z_x, int8, -128, 127)
    W        = torchao.dequantize_affine(Q, [1, g], S, Z, int8, qmin, qmax)    Z int8 zeros [out, K/g] (new constant)
    y        = linear(x_dq, W, b?)

and for each embedding ExecuTorch's quantized embedding kernel (its quantized kernels library), which reads only the
gathered rows:

    e = quantized_decomposed.embedding_byte(Q, S, None, -128, 127, tokens)           bits = 8
    e = quantized_decomposed.embedding_4bit(P, S, None, -8, 7, tokens)               bits = 4, P uint8 [V, d/2]:
                                                                                     (q[2j] + 8) << 4 | (q[2j+1] + 8)

XNNPACK's activation quantization is a declared deviation from the weight-only reference (DESIGN.md section 6).
"""
from __future__ import annotations

import operator

import torch

from mote.export import semantics
from mote.export.errors import InputError
from mote.passes.program import add_constant, call, constant_value, finish_rewrite, replace_call, spec_for

QUANTIZED_LINEAR = torch.ops.mote.quantized_linear.default
QUANTIZED_EMBEDDING = torch.ops.mote.quantized_embedding.default
XNNPACK_GROUP_MULTIPLE = 32     # XNNPACK's blockwise weights: groups a multiple of 32 inputs (node_visitor.py)
INT4_SPAN = 32                  # our kernel's int4 rows: spans of 32 inputs, 16 bytes (one vector of nibbles)


def pack_int4_spans(q: torch.Tensor) -> torch.Tensor:
    """int8 [rows, K] of int4 values -> uint8 [rows, K/2], our kernel's layout (the module docstring): per span of
    32 inputs, input i in the low nibble of byte i and input 16 + i in its high nibble, each stored as value + 8, so
    that one mask and one shift of a 16-byte vector give 16 consecutive inputs each."""
    rows, k = q.shape
    u = (q.to(torch.int16) + 8).to(torch.uint8).reshape(rows, k // INT4_SPAN, 2, INT4_SPAN // 2)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(rows, k // 2)


def unpack_int4_spans(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of `pack_int4_spans`: uint8 [rows, K/2] -> int8 [rows, K]."""
    rows = packed.shape[0]
    spans = packed.reshape(rows, k // INT4_SPAN, 1, INT4_SPAN // 2)
    nibbles = torch.cat([spans & 0xF, spans >> 4], dim=2).reshape(rows, k)
    return (nibbles.to(torch.int16) - 8).to(torch.int8)


@torch.library.custom_op("mote::packed_quantized_linear", mutates_args=())
def packed_quantized_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                            bits: int, group_size: int) -> torch.Tensor:
    """mote.quantized_linear on our kernel's storage (reference kernel: unpack, then the same semantics)."""
    k = x.shape[-1]
    q = unpack_int4_spans(packed, k) if bits == 4 else packed
    return torch.nn.functional.linear(x, semantics.dequantize_weight(q, scale, group_size), bias)


@packed_quantized_linear.register_fake
def _(x, packed, scale, bias, bits, group_size):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _quantized_ops():
    """torchao's affine ops and ExecuTorch's quantized_decomposed embeddings (their Python registrations)."""
    import torchao.quantization.quant_primitives  # noqa: F401  (defines torch.ops.torchao.*_affine)
    from executorch.exir.passes import _quant_patterns_and_replacements  # noqa: F401  (quantized_decomposed.*)

    return torch.ops.torchao, torch.ops.quantized_decomposed


def check_supported(ep, name: str, int8_activations: bool) -> None:
    """InputError (exit 2) for a quantized weight the chosen kernel has none for: int4 whose K or group is not a
    multiple of 32 inputs (XNNPACK's blockwise weights, our kernel's spans); with XNNPACK (`int8_activations`), int8
    in groups smaller than K (its blockwise weights are 4-bit only)."""
    for node in ep.graph.nodes:
        if node.target is not QUANTIZED_LINEAR:
            continue
        _, q, _, _, bits, group = node.args
        k = q.meta["val"].shape[1]
        fqn = spec_for(ep, q).target
        if not int8_activations:
            if bits == 4 and (k % INT4_SPAN or group % INT4_SPAN):
                raise InputError(f"--quantize: {name}'s {fqn} is int4 with {k} inputs in groups of {group}; the int4 "
                                 f"kernel needs both to be multiples of {INT4_SPAN}")
            continue
        if bits == 8 and group != k:
            raise InputError(f"--quantize: {name}'s {fqn} is int8 in groups of {group} of its {k} inputs; XNNPACK "
                             "runs int8 weights per output channel only (use group=channel for int8 parts)")
        if bits == 4 and group % XNNPACK_GROUP_MULTIPLE:
            raise InputError(f"--quantize: {name}'s {fqn} is int4 in groups of {group} inputs; XNNPACK's 4-bit "
                             f"weights need groups of a multiple of {XNNPACK_GROUP_MULTIPLE}")


def _weight_only_linear(ep, node) -> None:
    x, q, scale, bias, bits, group = node.args
    packed = q
    if bits == 4:
        fqn = spec_for(ep, q).target.rsplit(".", 1)[0]
        packed = add_constant(ep, f"{fqn}.packed_int4", pack_int4_spans(constant_value(ep, q)))
    replace_call(ep.graph, node, torch.ops.mote.packed_quantized_linear.default,
                 (x, packed, scale, bias, bits, group))


def _xnnpack_linear(ep, node) -> None:
    ao, _ = _quantized_ops()
    x, q, scale, bias, bits, group = node.args
    qmax = 2 ** (bits - 1) - 1
    rows, k = q.meta["val"].shape
    fqn = spec_for(ep, q).target.rsplit(".", 1)[0]
    zero = add_constant(ep, f"{fqn}.xnnpack_zero_point", torch.zeros(rows, k // group, dtype=torch.int8))
    x_block = [1] * (x.meta["val"].dim() - 1) + [k]
    qparams = call(ep.graph, ao.choose_qparams_affine.default,
                   (x, "ASYMMETRIC", x_block, torch.int8, -128, 127, None, None, torch.int8), node)
    s_x, z_x = (_getitem(ep.graph, qparams, i) for i in (0, 1))
    x_q = call(ep.graph, ao.quantize_affine.default, (x, x_block, s_x, z_x, torch.int8, -128, 127), node)
    x_dq = call(ep.graph, ao.dequantize_affine.default, (x_q, x_block, s_x, z_x, torch.int8, -128, 127), node)
    w = call(ep.graph, ao.dequantize_affine.default, (q, [1, group], scale, zero, torch.int8, -qmax - 1, qmax), node)
    replace_call(ep.graph, node, torch.ops.aten.linear.default, (x_dq, w) if bias is None else (x_dq, w, bias))


def _getitem(graph, node, i: int):
    """operator.getitem(node, i), as XNNPACK's partitioner finds the choose_qparams outputs (`call` needs tensors)."""
    with graph.inserting_after(node):
        item = graph.call_function(operator.getitem, (node, i))
    item.meta["val"] = node.meta["val"][i]
    return item


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """int8 [V, d] of int4 values -> uint8 [V, d/2], ExecuTorch's embedding_4bit layout: element 2j in the high
    nibble, 2j+1 in the low one, each stored as value + 8."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return (u[:, 0::2] << 4) | u[:, 1::2]


def _embedding(ep, node) -> None:
    _, qd = _quantized_ops()
    tokens, q, scale, bits, _ = node.args
    if bits == 8:
        replace_call(ep.graph, node, qd.embedding_byte.default, (q, scale, None, -128, 127, tokens))
        return
    packed = add_constant(ep, spec_for(ep, q).target.rsplit(".", 1)[0] + ".packed_int4",
                          pack_int4_rows(constant_value(ep, q)))
    replace_call(ep.graph, node, qd.embedding_4bit.default, (packed, scale, None, -8, 7, tokens))


def lower_quantized_ops(ep, name: str, int8_activations: bool) -> int:
    """Rewrite `ep`'s mote.quantized_linear / mote.quantized_embedding ops in place (see the module docstring): the
    linears into our weight-only kernel, or with `int8_activations` into XNNPACK's dynamically quantized ones; returns
    how many. Run after `run_decompositions`, so that XNNPACK's partitioner sees the ops as written here."""
    check_supported(ep, name, int8_activations)
    linear = _xnnpack_linear if int8_activations else _weight_only_linear
    nodes = [n for n in ep.graph.nodes if n.target in (QUANTIZED_LINEAR, QUANTIZED_EMBEDDING)]
    for node in nodes:
        if node.target is QUANTIZED_LINEAR:
            linear(ep, node)
        else:
            _embedding(ep, node)
    if nodes:
        finish_rewrite(ep)
    return len(nodes)
