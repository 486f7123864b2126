"""onnx target with `--quantize` (issue 14): the post-training quantized linears and the embedding reach ONNX Runtime
as its own low-bit ops (com.microsoft.MatMulNBits, GatherBlockQuantized; DequantizeLinear under --portable), the
artifact holds their weights at bits/8 bytes each (+ scales) and no float copy, and the .ort runs them too.

The exports go through the CLI once per session (runtime_tests/conftest.py's `exported`)."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mote.export import semantics
from mote.export.loader import load_model
from mote.targets import get_target
from mote.targets.onnx import repack

from .conftest import EXAMPLE

# The presets (export/quantization.py's docstring): int4 = attn, shared int4 in groups of 32, lm_head / embed / vision
# int8 per output channel; int8 = all of them int8 per output channel. Router fp32 in both.
PRESETS = {"int4": {"attn": (4, 32), "ffn": (4, 32), "lm_head": (8, None)},
           "int8": {"attn": (8, None), "ffn": (8, None), "lm_head": (8, None)}}


@pytest.fixture(scope="module")
def config():
    if not (EXAMPLE / "config.json").is_file():
        pytest.skip("example model not trained yet")
    return load_model(EXAMPLE).config


@pytest.fixture(scope="module")
def quantized(exported, config):
    """quantized(spec, *flags) -> (out_dir, report) of examples/tiny-mote exported with --quantize spec."""
    return lambda spec, *flags: exported("onnx", EXAMPLE, "--quantize", spec, *flags)


def _graph(path):
    m = onnx.load(str(path))
    return m.graph, {t.name: t for t in m.graph.initializer}


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _expected_linears(config, spec):
    """(bits, group or None for per channel, N, K) of every linear of the text decoder the preset quantizes, from
    the model's config."""
    d, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = d // heads
    attn = [(heads * head_dim, d), (kv * head_dim, d), (kv * head_dim, d), (d, heads * head_dim)]
    out = []
    for layer in range(config.num_hidden_layers):   # a dense layer's FFN or a MoE layer's shared expert
        i = config.shared_intermediate_size if layer in config.moe.moe_layers else config.intermediate_size
        out += [(*PRESETS[spec]["attn"], n, k) for n, k in attn]
        out += [(*PRESETS[spec]["ffn"], n, k) for n, k in [(i, d), (i, d), (d, i)]]
    out.append((*PRESETS[spec]["lm_head"], config.vocab_size, d))
    return out


@pytest.mark.parametrize("spec", ["int4", "int8"])
def test_quantized_export_verifies_in_onnxruntime(quantized, spec):
    _, report = quantized(spec)
    assert report["verify"] == "passed"
    assert report["numerics"]["text_decoder"]["greedy_match"] == "32/32"
    assert report["options"]["common"]["quantization"]["spec"] == spec


@pytest.mark.parametrize("spec", ["int4", "int8"])
def test_decoder_linears_are_matmulnbits_of_the_spec(quantized, config, spec):
    """Every quantized linear is a MatMulNBits of its bits holding bits/8 bytes per weight + one fp32 scale per group,
    computing with float activations (accuracy_level 0); no float copy of a quantized weight is left."""
    out, report = quantized(spec)
    graph, inits = _graph(out / "text_decoder.onnx")
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits" and _attrs(n)["bits"] in (4, 8)]
    assert all(n.domain == "com.microsoft" for n in nbits)
    found = []
    for n in nbits:
        a = _attrs(n)
        k, n_out, bits = a["K"], a["N"], a["bits"]
        b, scales = numpy_helper.to_array(inits[n.input[1]]), numpy_helper.to_array(inits[n.input[2]])
        assert b.dtype == np.uint8 and b.nbytes == n_out * k * bits // 8   # K is a multiple of the block here
        assert a.get("accuracy_level", 0) == 0
        assert len(n.input) < 4 or not n.input[3]   # no zero points: the op's default 2^(bits-1)
        n_blocks = scales.size // n_out
        found.append((bits, None if n_blocks == 1 else k // n_blocks, n_out, k))
    assert sorted(found, key=str) == sorted(_expected_linears(config, spec), key=str)
    float_shapes = {tuple(t.dims) for t in inits.values() if t.data_type == TensorProto.FLOAT}
    assert not float_shapes & {s for _, _, n, k in found for s in ((n, k), (k, n))}
    # the report's figures are the file's
    facts = [g for g in report["facts"]["quantized"] if g["file"] == "text_decoder.onnx"]
    assert sum(g["weight_bytes"] for g in facts) == sum(numpy_helper.to_array(inits[n.input[1]]).nbytes for n in nbits)
    assert sum(g["weights"] for g in facts) == sum(n * k for *_, n, k in found)


@pytest.mark.parametrize("spec", ["int4", "int8"])
def test_embedding_is_gather_block_quantized(quantized, config, spec):
    out, _ = quantized(spec)
    graph, inits = _graph(out / "token_embedding.onnx")
    assert [(n.domain, n.op_type) for n in graph.node if n.op_type.startswith("Gather")] == \
        [("com.microsoft", "GatherBlockQuantized")]
    node = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    data = numpy_helper.to_array(inits[node.input[0]])
    assert _attrs(node)["bits"] == 8 and data.dtype == np.uint8
    assert data.shape == (config.vocab_size, config.hidden_size)    # int8 in both presets: one byte per weight
    assert not [t for t in inits.values() if t.data_type == TensorProto.FLOAT and len(t.dims) == 2
                and tuple(t.dims) == data.shape]


def test_quantized_artifact_is_smaller_than_the_fp32_export(quantized, example):
    fp32 = {a["path"]: a["bytes"] for a in example.export("onnx")[1]["artifacts"]}
    for spec in ("int4", "int8"):
        got = {a["path"]: a["bytes"] for a in quantized(spec)[1]["artifacts"]}
        assert got["text_decoder.onnx"] < 0.5 * fp32["text_decoder.onnx"]
        assert got["token_embedding.onnx"] < 0.5 * fp32["token_embedding.onnx"]


def test_vision_linears_are_matmulnbits(quantized, example):
    """Every linear of the fp32 export's vision encoder (a MatMul reading an initializer) became a MatMulNBits."""
    fp32_graph, fp32_inits = _graph(example.export("onnx")[0] / "vision_encoder.onnx")
    graph, inits = _graph(quantized("int8")[0] / "vision_encoder.onnx")
    linears = [n for n in fp32_graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in fp32_inits]
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(linears) > 0
    assert {_attrs(n)["bits"] for n in nbits} == {8}
    assert not [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]


def test_ort_file_runs_the_quantized_ops(quantized, config):
    out, _ = quantized("int4")
    target = get_target("onnx")
    a = target.runner(out, 128)
    b = target.runner(out, 128, suffix=".ort")
    x = torch.randn(1, 5, config.hidden_size, generator=torch.Generator().manual_seed(5))
    pos = torch.tensor([0])
    assert np.allclose(a.text_decoder(x, pos).numpy(), b.text_decoder(x, pos).numpy(), atol=1e-5)
    tokens = torch.tensor([[1, 7, 42, 255]])
    assert np.array_equal(a.token_embedding(tokens).numpy(), b.token_embedding(tokens).numpy())


def test_portable_quantized_uses_standard_ops_only(quantized, config):
    out, report = quantized("int4", "--portable")
    assert report["verify"] == "passed"
    graph, inits = _graph(out / "text_decoder.onnx")
    assert not [n for n in graph.node if n.domain not in ("", "ai.onnx")]
    int4 = [t for t in inits.values() if t.data_type == TensorProto.INT4]
    assert len(int4) == sum(bits == 4 for bits, *_ in _expected_linears(config, "int4"))
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in {t.name for t in int4}]
    assert len(dq) == len(int4) and all(_attrs(n)["block_size"] == 32 for n in dq)
    # stored at 4 bits: the file's int4 bytes are half a byte per weight
    assert sum(len(t.raw_data) for t in int4) * 2 == sum(np.prod(t.dims) for t in int4)
    emb_graph, _ = _graph(out / "token_embedding.onnx")
    # int8 rows: Gather of the int8 rows and of their scales, then DequantizeLinear
    assert [n.op_type for n in emb_graph.node if n.op_type in ("Gather", "DequantizeLinear")] == \
        ["Gather", "Gather", "DequantizeLinear"]
    # the deviation about ORT's fused MatMulNBits is stated exactly when ORT fused some with int8 activations
    session = report["facts"]["files"]["text_decoder.onnx"]["ort_session"]
    stated = any("text_decoder.onnx: onnxruntime" in d and "int8 activations" in d for d in report["deviations"])
    assert stated == (session["matmul_nbits_int8_activations"] > 0)


# -- the repacking and ONNX Runtime's kernels on shapes the example does not have ----------------------------------

def _ort_matmul_nbits(x, b, scales, k, bits, block, bias):
    node = helper.make_node("MatMulNBits", ["A", "B", "S", "", "", "bias"], ["Y"], domain="com.microsoft", K=k,
                            N=b.shape[0], bits=bits, block_size=block, accuracy_level=0)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, b.shape[0]])],
                          [numpy_helper.from_array(b.numpy(), "B"), numpy_helper.from_array(scales.numpy(), "S"),
                           numpy_helper.from_array(bias.numpy(), "bias")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"A": x.numpy()})[0]


@pytest.mark.parametrize("bits,k,group", [(4, 96, 96), (8, 100, 100), (4, 128, 32), (8, 896, 896), (4, 64, 16)])
def test_matmul_nbits_layout_in_onnxruntime(bits, k, group):
    """Per-channel weights whose K is not a power of two sit in one larger block (the codes past K are the zero
    point); ORT's MatMulNBits then computes linear(x, dequantized weight) + bias like mote.quantized_linear."""
    gen = torch.Generator().manual_seed(bits * k)
    w, bias = torch.randn(24, k, generator=gen), torch.randn(24, generator=gen)
    q, s = semantics.quantize_weight(w, bits, group)
    block = repack.nbits_block(group, k)
    n_blocks = -(-k // block)
    b = repack.pack_nbits(q, bits, n_blocks * block).reshape(24, n_blocks, block * bits // 8)
    x = torch.randn(3, k, generator=gen)
    ref = torch.ops.mote.quantized_linear(x, q, s, bias, bits, group)
    eager = torch.ops.mote_onnx.matmul_nbits(x, b, s.reshape(24, n_blocks), bias, k, bits, block)
    assert torch.equal(eager, ref)
    got = _ort_matmul_nbits(x, b, s.reshape(24, n_blocks), k, bits, block, bias)
    assert np.abs(got - ref.numpy()).max() <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 96)])
def test_gather_block_quantized_layout(bits, group):
    gen = torch.Generator().manual_seed(bits)
    q, s = semantics.quantize_weight(torch.randn(50, 96, generator=gen), bits, group)
    tokens = torch.tensor([[3, 0, 49, 3]])
    got = torch.ops.mote_onnx.gather_block_quantized(tokens, repack.pack_nbits(q, bits), s, bits,
                                                     repack.nbits_block(group, 96))
    assert torch.equal(got, torch.ops.mote.quantized_embedding(tokens, q, s, bits, group))


def test_int8_activations_sets_accuracy_level_4_and_declares_it(quantized):
    """`--int8-activations`: every quantized linear's MatMulNBits (bits 4 / 8) at accuracy_level 4, the 2-bit
    routed experts untouched; the report names the deviation, and the export still verifies at the 35 dB bar."""
    out, report = quantized("int4", "--int8-activations")
    graph, _ = _graph(out / "text_decoder.onnx")
    levels = {}
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            a = _attrs(node)
            levels.setdefault(a["bits"], set()).add(a.get("accuracy_level", 0))
    assert levels[4] == {4} and levels[8] == {4}
    assert levels.get(2, {0}) == {0}
    assert report["verify"] == "passed" and report["numerics"]["text_decoder"]["greedy_match"] == "32/32"
    assert any("accuracy_level" in d and "4" in d for d in report["deviations"]), report["deviations"]
