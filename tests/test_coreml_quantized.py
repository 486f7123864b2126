"""targets/coreml/convert.py, `--quantize`: the quantized `mote::` ops converted to Core ML and run by the MIL
executor (itself checked against PyTorch op by op in test_mil_executor.py), compared with the ops' reference kernels.

- mote.quantized_linear -> linear over constexpr_blockwise_shift_scale: the weight is stored as int4 / int8 in the
  package's weight.bin (blob bytes = weights x bits / 8), never as a float constant;
- mote.quantized_embedding -> a gather of the tokens' rows of an int8 (or nibble-packed uint8, for int4) table, then
  of their scales: no float copy of the table in the package;
- mote.moe_ffn without a shared expert (quantized, outside the op): the router and routed experts only;
- the report's reading of the saved program (report.read_program) against the weights that went in.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools")

from mote.export.semantics import quantize_weight  # noqa: E402
from mote.export.verify import sqnr_db  # noqa: E402
from mote.passes.ops import pack_trits  # noqa: E402
from mote.targets.coreml.mil_executor import MilExecutor, load_program  # noqa: E402
from mote.targets.coreml.report import BLOCKWISE, read_program  # noqa: E402

from .test_coreml_convert import convert  # noqa: E402  (export, decompose, ct.convert, save)

BARS = {"fp32": 60.0, "fp16": 35.0}


def run(path, value):
    ex = MilExecutor(path)
    (name,) = ex.inputs
    return ex, torch.from_numpy(np.asarray(ex.predict({name: value})[ex.outputs[0]], dtype=np.float32))


def stored_consts(path):
    """Every constant and constexpr operand coremltools loads from the package: (dtype name, shape)."""
    from coremltools.converters.mil.mil import types

    found = []
    for op in load_program(path).functions["main"].operations:
        for var in ([op.outputs[0]] if op.op_type == "const" else list(op.inputs.values())
                    if op.op_type.startswith("constexpr_") else []):
            found.append((types.builtin_to_string(var.dtype), tuple(var.shape)))
    return found


class Linear(torch.nn.Module):
    def __init__(self, bits, group, bias, out=48, k=64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, s = quantize_weight(torch.randn(out, k, generator=g), bits, group or k)
        self.register_buffer("q", q)
        self.register_buffer("s", s)
        self.register_buffer("b", torch.randn(out, generator=g) if bias else None)
        self.bits, self.group = bits, group or k

    def forward(self, x):
        return torch.ops.mote.quantized_linear(x, self.q, self.s, self.b, self.bits, self.group)


class Embedding(torch.nn.Module):
    def __init__(self, bits, group, vocab=70, d=64, seed=0):
        super().__init__()
        q, s = quantize_weight(torch.randn(vocab, d, generator=torch.Generator().manual_seed(seed)), bits, group or d)
        self.register_buffer("q", q)
        self.register_buffer("s", s)
        self.bits, self.group = bits, group or d

    def forward(self, tokens):
        return torch.ops.mote.quantized_embedding(tokens, self.q, self.s, self.bits, self.group)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("bits, group, bias", [(4, 32, False), (4, None, True), (8, None, False), (8, 16, True)])
def test_quantized_linear_is_a_low_bit_constexpr(tmp_path, precision, bits, group, bias):
    module = Linear(bits, group, bias)
    x = torch.randn(1, 5, 64)
    seq = torch.export.Dim("T", min=1, max=16)
    path = convert(module, [x], tmp_path / "m.mlpackage", precision, {"x": {1: seq}})
    ex, got = run(path, x.numpy())
    assert sqnr_db(module(x), got) >= BARS[precision]
    assert ex.op_counts().get(BLOCKWISE) == 1 and ex.op_counts().get("linear") == 1
    consts = stored_consts(path)
    assert (f"int{bits}", (48, 64)) in consts
    assert not [c for c in consts if c[1] == (48, 64) and c[0].startswith("fp")]   # no float copy of the weight
    # the weight.bin blob of the data holds bits / 8 bytes per weight (int4 packed two per byte)
    q = read_program(path)["quantized"][BLOCKWISE][f"int{bits}"]
    assert (q["ops"], q["weights"], q["data_bytes"]) == (1, 48 * 64, 48 * 64 * bits // 8)
    assert q["scale_bytes"] == module.s.numel() * (2 if precision == "fp16" else 4)
    assert q["blocks"] == ["channel" if group is None else group] and q["read_by"] == {"linear": 1}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("bits, group, d", [(8, None, 64), (8, 16, 64), (4, 32, 64), (4, None, 63)])
def test_quantized_embedding_gathers_low_bit_rows(tmp_path, precision, bits, group, d):
    """int8 rows, or int4 as nibble pairs in uint8 (an odd d padded with a zero nibble), gathered by token; then the
    rows' scales. Tokens cover the table's first and last row."""
    module = Embedding(bits, group, d=d)
    tokens = torch.tensor([[0, 69, 5, 33, 5, 12]])
    seq = torch.export.Dim("T", min=1, max=16)
    path = convert(module, [tokens], tmp_path / "e.mlpackage", precision, {"tokens": {1: seq}})
    _, got = run(path, tokens.numpy().astype(np.int32))
    assert sqnr_db(module(tokens), got) >= BARS[precision]
    table = ("int8", (70, d)) if bits == 8 else ("uint8", (70, (d + 1) // 2))
    consts = stored_consts(path)
    assert table in consts
    assert not [c for c in consts if c[0].startswith("fp") and c[1] in {(70, d), (70, (d + 1) // 2)}]
    found = read_program(path)["quantized"]
    rows = [t for t in found["embedding_tables"] if t["dtype"] in ("int8", "uint8")]
    assert [(t["shape"], t["bytes"], t["indexed_by"]) for t in rows] == [(list(table[1]), 70 * table[1][1],
                                                                          ["tokens"])]
    assert not found[BLOCKWISE]


def test_moe_ffn_without_a_shared_expert(tmp_path):
    """The shared expert outside the op (quantized): the op is router + routed experts, as its reference kernel."""
    g = torch.Generator().manual_seed(1)
    experts, d, width = 4, 48, 40

    def trits(rows, k):
        return pack_trits(torch.randint(-1, 2, (experts, rows, k), generator=g).float())

    args = [trits(width, d), torch.rand(experts, 1, generator=g) * 0.05 + 0.01,
            trits(width, d), torch.rand(experts, 1, generator=g) * 0.05 + 0.01,
            trits(d, width), torch.rand(experts, 1, generator=g) * 0.05 + 0.01]
    router = torch.randn(experts, d, generator=g)

    class Routed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("router", router)
            for i, a in enumerate(args):
                self.register_buffer(f"a{i}", a)

        def forward(self, x):
            return torch.ops.mote.moe_ffn(x, None, None, None, None, self.router, self.a0, self.a1, self.a2, self.a3,
                                          self.a4, self.a5, 1, False)

    module = Routed()
    x = torch.randn(1, 6, d, generator=g)
    path = convert(module, [x], tmp_path / "moe.mlpackage", "fp32", {"x": {1: torch.export.Dim("T", max=16)}})
    ex, got = run(path, x.numpy())
    assert sqnr_db(module(x), got) >= 60.0
    assert ex.op_counts().get("linear") == 1       # the router alone: no shared-expert linears in the program


def test_executor_widens_an_fp16_constexpr_weight_once(tmp_path):
    """An fp16 program's decompressed constexpr weight is read by linear as one float32 copy kept across calls."""
    module = Linear(4, 32, False)
    x = torch.randn(1, 3, 64)
    ex, first = run(convert(module, [x], tmp_path / "m.mlpackage", "fp16"), x.numpy())
    (name,) = [op.outputs[0].name for op in ex.function.operations if op.op_type == BLOCKWISE]
    kept = ex._wide[name]
    again = ex.predict({"x": x.numpy()})[ex.outputs[0]]
    assert ex._wide[name] is kept and kept.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(again, dtype=np.float32), first.numpy())
