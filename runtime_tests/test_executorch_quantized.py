"""android target with --quantize: by default the quantized linears run in our kernel library's weight-only linear
(fp32 activations, int4 / int8 weights dequantized on the fly: the reference's numerics, the fp32 bar); with
--int8-activations in XNNPACK's low-bit kernels (qd8-f32-qb4w for int4 groups, qd8-f32-qc8w for int8 per channel), a
declared deviation. Our integers are stored low-bit in the `.pte`, the embedding runs in ExecuTorch's quantized
embedding kernel; each artifact is verified in ExecuTorch's runtime (needs build/et-kernels/)."""
from pathlib import Path

import pytest
import torch

from mote.export.loader import load_model
from mote.export.model import QuantizedEmbedding, QuantizedLinear
from mote.export.quantization import parse
from mote.tools import cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-mote"
VISION = ("vision_tower", "multi_modal_projector")


@pytest.fixture(scope="module")
def int4(exported):
    return exported("android", EXAMPLE, "--quantize", "int4")


@pytest.fixture(scope="module")
def int8(exported):
    return exported("android", EXAMPLE, "--quantize", "int8")


@pytest.fixture(scope="module")
def fp32(exported):
    return exported("android", EXAMPLE)


def _quantized_modules(spec):
    """(name, module) of the example's linears and embedding as the loader quantized them with `spec`."""
    model = load_model(EXAMPLE, parse(spec))
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def _program(name: str) -> str:
    return "vision_encoder" if any(v in name for v in VISION) else "text_decoder"


def _stored_bytes(m) -> int:
    """What the weight of m takes in the .pte with our kernel (int4 two per byte or int8, fp32 group scales) or as the
    embedding's int8 table and fp32 scales (ExecuTorch's embedding_byte)."""
    n, groups = m.qweight.numel(), m.qscale.numel()
    return (n // 2 if m.bits == 4 else n) + 4 * groups


def _span_int4(q: torch.Tensor) -> bytes:
    """int4 values -> our kernel's bytes, written from its header's layout: per row, spans of 32 inputs in 16 bytes,
    byte i = (q[i] + 8) | (q[16 + i] + 8) << 4."""
    u = (q.to(torch.int16) + 8).to(torch.uint8).numpy()
    out = bytearray()
    for row in u:
        for s in range(0, len(row), 32):
            out += bytes(int(row[s + i]) | int(row[s + 16 + i]) << 4 for i in range(16))
    return bytes(out)


def _xnnpack_int4(q: torch.Tensor) -> bytes:
    """int4 values -> XNNPACK's qb4w bytes: value + 8, element 2j in the low nibble, 2j + 1 in the high one."""
    u = (q.to(torch.int16) + 8).to(torch.uint8).reshape(-1)
    return (u[0::2] | (u[1::2] << 4)).numpy().tobytes()


@pytest.mark.parametrize("spec", ["int4", "int8"])
def test_quantized_export_verifies_at_the_fp32_bar(spec, int4, int8):
    """Verified in ExecuTorch's runtime against the reference holding the same quantized weights: the weight-only
    kernel keeps the reference's numerics, so the fp32 bar holds (60 dB, capped at the reference's noise floor) with
    identical greedy tokens and no deviation declared."""
    _, report = {"int4": int4, "int8": int8}[spec]
    assert report["verify"] == "passed"
    assert report["tolerance"] == {"min_sqnr_db": 60.0, "need_identical_greedy": True}
    assert report["numerics"]["text_decoder"]["greedy_match"] == "32/32"
    assert report["numerics"]["vision_encoder"]["sqnr_db"] >= 60.0
    assert report["numerics"]["token_embedding"]["exact"]     # the int8 rows dequantized exactly as the reference
    assert report["deviations"] == []


@pytest.mark.parametrize("spec", ["int4", "int8"])
def test_every_quantized_linear_is_one_weight_only_kernel_call(spec, int4, int8):
    """The facts read back from the .pte: one call of our weight-only linear per quantized linear of the model, by
    kind and program, its weights stored at 4 or 8 bits; no quantize op on any activation."""
    _, report = {"int4": int4, "int8": int8}[spec]
    expected = {}
    for name, m in _quantized_modules(spec):
        if not isinstance(m, QuantizedEmbedding):
            kind = "f32-qb4w" if m.bits == 4 else "f32-qc8w"
            expected.setdefault(kind, {}).setdefault(_program(name), 0)
            expected[kind][_program(name)] += 1
    facts = report["facts"]["quantized_linears"]
    assert {k: v["count"] for k, v in facts.items()} == expected
    for kind, q in facts.items():
        assert q["kernel"] == "mote::packed_quantized_linear"
        assert q["weight_bytes"] * 8 / q["weights"] == (4.0 if kind.endswith("qb4w") else 8.0)
    assert report["facts"]["activations"]["quantize_ops"] == {}
    assert sorted(report["facts"]["kernels"]["library_ops"]) == ["mote::packed_quantized_linear.out",
                                                                 "mote::routed_experts.out"]
    assert report["facts"]["kernels"]["executorch_quantized_ops"] == {
        "quantized_decomposed::embedding_byte.out": ["token_embedding"]}


@pytest.mark.parametrize("spec", ["int4", "int8"])
def test_the_pte_holds_our_low_bit_integers(spec, int4, int8):
    """The very integers the loader quantized are bytes of the .pte: int4 packed two per byte in our kernel's spans,
    int8 as they are (linears and the embedding table); no fp32 copy of a quantized weight anywhere in the file."""
    out, _ = {"int4": int4, "int8": int8}[spec]
    pte = (out / "model.pte").read_bytes()
    for name, m in _quantized_modules(spec):
        q = m.qweight
        stored = _span_int4(q) if m.bits == 4 else q.numpy().tobytes()
        assert stored in pte, name
        assert m.weight.numpy().tobytes()[:4096] not in pte, name


def test_pte_is_smaller_by_what_the_quantized_weights_save(fp32, int4, int8):
    """Against the export without --quantize: the file shrinks by the fp32 bytes of the quantized weights minus
    their low-bit storage (packed integers and fp32 scales, the int8 embedding table), to within segment padding."""
    _, base = fp32
    for spec, (out, report) in (("int4", int4), ("int8", int8)):
        saving = sum(4 * m.qweight.numel() - _stored_bytes(m) for _, m in _quantized_modules(spec))
        actual = base["facts"]["storage"]["file_bytes"] - report["facts"]["storage"]["file_bytes"]
        assert actual == pytest.approx(saving, rel=0.02), spec


XNNPACK_SPEC = "int4,embed=int4,lm_head=int4"


def test_portable_kernels_with_int8_activations(exported):
    """--android-kernels portable (no kernel library of ours) --int8-activations: the linears in XNNPACK's qd8 kernels
    (int4 in groups of 32 as qb4w, the int8 vision per channel as qc8w) on our integers, a declared deviation verified
    at 35 dB; the int4 embedding in ExecuTorch's embedding_4bit on our integers packed two per byte."""
    out, report = exported("android", EXAMPLE, "--android-kernels", "portable", "--int8-activations",
                           "--quantize", XNNPACK_SPEC)
    assert report["verify"] == "passed" and report["numerics"]["text_decoder"]["greedy_match"] == "32/32"
    assert report["tolerance"] == {"min_sqnr_db": 35.0, "need_identical_greedy": True}
    assert any("int8 per token" in d for d in report["deviations"])
    assert report["numerics"]["token_embedding"]["exact"]
    facts = report["facts"]
    assert facts["kernels"]["library_ops"] == {}
    assert facts["kernels"]["executorch_quantized_ops"] == {
        "quantized_decomposed::embedding_4bit.out": ["token_embedding"]}
    expected = {}
    for name, m in _quantized_modules(XNNPACK_SPEC):
        if isinstance(m, QuantizedEmbedding):
            continue
        kind = "qd8-f32-qb4w" if m.bits == 4 else "qd8-f32-qc8w"
        expected.setdefault(kind, {}).setdefault(_program(name), 0)
        expected[kind][_program(name)] += 1
    assert {k: v["count"] for k, v in facts["quantized_linears"].items()} == expected
    assert {v["kernel"] for v in facts["quantized_linears"].values()} == {"XNNPACK"}
    assert facts["quantized_linears"]["qd8-f32-qb4w"]["group_sizes"] == [32]
    for method, d in facts["delegation"].items():
        assert not [op for op in d["portable_ops"] if "affine" in op or op.split(".")[0] in ("linear", "addmm", "mm")]
    pte = (out / "model.pte").read_bytes()
    for name, m in _quantized_modules(XNNPACK_SPEC):
        if m.bits == 4 and not isinstance(m, QuantizedEmbedding):
            assert _xnnpack_int4(m.qweight) in pte, name
    embed = next(m for _, m in _quantized_modules(XNNPACK_SPEC) if isinstance(m, QuantizedEmbedding))
    u = (embed.qweight.to(torch.int16) + 8).to(torch.uint8)
    assert ((u[:, 0::2] << 4) | u[:, 1::2]).numpy().tobytes() in pte


def test_portable_kernels_without_int8_activations_is_refused(tmp_path, capsys):
    """--android-kernels portable has no weight-only low-bit linear: --quantize without --int8-activations is refused
    on the command line (exit 2, one line), before the model is read."""
    code = cli.main(["--target", "android", str(EXAMPLE), "-o", str(tmp_path / "out"), "--quiet",
                     "--android-kernels", "portable", "--quantize", "int4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--int8-activations" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_int8_in_groups_with_int8_activations_is_refused(tmp_path, capsys):
    """XNNPACK's blockwise weights are 4-bit only: int8 in groups with --int8-activations is refused (exit 2, one line
    naming a weight), never left in fp32."""
    code = cli.main(["--target", "android", str(EXAMPLE), "-o", str(tmp_path / "out"), "--quiet",
                     "--int8-activations", "--quantize", "int8,group=32", "--no-verify"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "qweight is int8 in groups of 32" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()

