"""mil_executor.MilExecutor against PyTorch, one op (or one small pattern) at a time.

Each test builds a tiny torch module, exports it, converts it with coremltools to an iOS 18 mlprogram, saves the
package, runs the package through the executor and compares with torch. The executor is what verifies our Core ML
target on Linux, so it is checked against an independent reference here. (Where stock coremltools converts an op
into something else, our converters replace it; those are tested in test_coreml_convert.py, which registers them
for the whole process.) fp32 programs must match torch to ~1e-5; fp16 programs must equal torch's fp16-rounded
result (to one fp16 ulp: numpy and torch may accumulate a matmul in a different order).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")

from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from mote.targets.coreml.mil_executor import FALLBACKS, MilExecutor  # noqa: E402

F = torch.nn.functional
PRECISION = {"fp32": ct.precision.FLOAT32, "fp16": ct.precision.FLOAT16}


def convert(module, args, path, precision="fp32", dynamic_shapes=None, states=None) -> MilExecutor:
    ep = torch.export.export(module.eval(), tuple(args), dynamic_shapes=dynamic_shapes)
    extra = {"states": states} if states else {}
    mlmodel = ct.convert(ep.run_decompositions({}), minimum_deployment_target=ct.target.iOS18,
                         compute_precision=PRECISION[precision], skip_model_load=True, **extra)
    mlmodel.save(str(path))
    return MilExecutor(path)


def convert_mil(prog, path, precision="fp32") -> MilExecutor:
    mlmodel = ct.convert(prog, minimum_deployment_target=ct.target.iOS18, compute_precision=PRECISION[precision],
                         skip_model_load=True)
    mlmodel.save(str(path))
    return MilExecutor(path)


def feed(ex: MilExecutor, args) -> dict:
    return {name: np.asarray(a) for name, a in zip(ex.inputs, args)}


def run(module, args, tmp_path, precision="fp32", **kw):
    """(executor outputs in order, torch outputs in order, executor)."""
    ex = convert(module, args, tmp_path / "m.mlpackage", precision, **kw)
    got = ex.predict(feed(ex, args))
    with torch.no_grad():
        want = module(*args)
    want = want if isinstance(want, tuple) else (want,)
    return [got[name] for name in ex.outputs], [w.numpy() for w in want], ex


def assert_fp32(got, want, rtol=1e-5, atol=1e-6):
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


def assert_fp16(got, want):
    """got == want rounded to fp16, to one fp16 ulp."""
    assert got.dtype == np.float16
    want16 = np.asarray(want).astype(np.float16)
    ulp = np.spacing(np.abs(want16)).astype(np.float32)
    assert np.all(np.abs(got.astype(np.float32) - want16.astype(np.float32)) <= ulp), (got, want16)


def fp16_copy(module):
    """The module with every parameter rounded to fp16 (kept fp32): what an fp16 program's consts hold."""
    import copy

    clone = copy.deepcopy(module)
    with torch.no_grad():
        for p in clone.parameters():
            p.copy_(p.half().float())
    return clone


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


# ---------------------------------------------------------------------------------------------------------------------
# single ops, fp32


@pytest.mark.parametrize("name, fn", [
    ("silu", F.silu),
    ("gelu_exact", F.gelu),
    ("sigmoid", torch.sigmoid),
    ("softmax", lambda x: torch.softmax(x, dim=-1)),
    ("sin_cos", lambda x: (torch.sin(x), torch.cos(x))),
    ("rsqrt", lambda x: torch.rsqrt(x.abs() + 0.1)),
    ("erf", torch.erf),
    ("exp_tanh", lambda x: (torch.exp(x), torch.tanh(x))),
])
def test_elementwise_fp32(tmp_path, name, fn):
    x = torch.randn(3, 5, 7) * 3
    got, want, ex = run(Fn(fn), (x,), tmp_path)
    for g, w in zip(got, want, strict=True):
        assert_fp32(g, w)


@pytest.mark.parametrize("mode, approximate", [("TANH_APPROXIMATION", "tanh"), ("EXACT", "none")])
def test_gelu_modes_mil(tmp_path, mode, approximate):
    @mb.program(input_specs=[mb.TensorSpec(shape=(4, 9))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.gelu(x=x, mode=mode)

    ex = convert_mil(prog, tmp_path / "m.mlpackage")
    x = torch.randn(4, 9) * 3
    got = ex.predict({"x": x.numpy()})[ex.outputs[0]]
    assert_fp32(got, F.gelu(x, approximate=approximate).numpy())


def test_linear_with_bias(tmp_path):
    m = torch.nn.Linear(16, 8)
    got, want, _ = run(m, (torch.randn(2, 3, 16),), tmp_path)
    assert_fp32(got[0], want[0])


def test_matmul_bmm(tmp_path):
    a, b, c = torch.randn(3, 4, 6), torch.randn(3, 6, 5), torch.randn(5, 2)
    got, want, _ = run(Fn(lambda a, b, c: (torch.bmm(a, b), torch.matmul(a, b) @ c)), (a, b, c), tmp_path)
    for g, w in zip(got, want, strict=True):
        assert_fp32(g, w)


def test_topk_values_and_indices(tmp_path):
    x = torch.randn(2, 3, 10)
    got, want, _ = run(Fn(lambda x: torch.topk(x, 3, dim=-1)), (x,), tmp_path)
    assert_fp32(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_embedding_index_select_gather(tmp_path):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(11, 6)

        def forward(self, tokens, rows, x):
            return (self.emb(tokens), torch.index_select(x, 1, rows), torch.gather(x, 1, rows[None, :].expand(4, -1)))

    tokens, rows = torch.tensor([[3, 0, 10, 3]]), torch.tensor([2, 0, 2])
    got, want, _ = run(M(), (tokens, rows, torch.randn(4, 5)), tmp_path)
    for g, w in zip(got, want, strict=True):
        assert_fp32(g, w)


def test_conv2d_patch_embedding(tmp_path):
    m = torch.nn.Conv2d(3, 8, kernel_size=4, stride=4)
    got, want, ex = run(m, (torch.randn(1, 3, 16, 12),), tmp_path)
    assert ex.op_counts()["conv"] == 1
    assert_fp32(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_conv2d_padded_strided_grouped_dilated(tmp_path):
    m = torch.nn.Conv2d(4, 6, kernel_size=3, stride=2, padding=2, groups=2, dilation=2)
    got, want, _ = run(m, (torch.randn(2, 4, 11, 9),), tmp_path)
    assert_fp32(got[0], want[0], rtol=1e-5, atol=1e-5)


def test_layer_norm(tmp_path):
    m = torch.nn.LayerNorm(12)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    got, want, _ = run(m, (torch.randn(2, 3, 12) * 4 + 1,), tmp_path)
    assert_fp32(got[0], want[0], atol=1e-5)


def test_rmsnorm_from_pow_mean_rsqrt(tmp_path):
    class RMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(12))

        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    got, want, ex = run(RMSNorm(), (torch.randn(2, 3, 12),), tmp_path)
    assert_fp32(got[0], want[0])


def test_rotary_slicing_and_cat(tmp_path):
    class Rope(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # a buffer, as HF computes it: `1.0 / base**...` inside forward would convert to MIL inverse (below)
            self.register_buffer("inv", 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)))

        def forward(self, x, pos):
            emb = torch.cat([pos[:, None].float() * self.inv[None, :]] * 2, dim=-1)
            rotated = torch.cat([-x[..., 4:], x[..., :4]], dim=-1)
            return x * emb.cos() + rotated * emb.sin()

    got, want, _ = run(Rope(), (torch.randn(1, 2, 5, 8), torch.tensor([0, 1, 2, 7, 30])), tmp_path)
    assert_fp32(got[0], want[0], atol=1e-5)


def test_reshape_transpose_permute_slice(tmp_path):
    def fn(x):
        y = x.reshape(2, 3, 4, 5).transpose(1, 2)
        return y.permute(3, 0, 2, 1)[1:4, :, ::2], x[:, 5:17:3]

    got, want, _ = run(Fn(fn), (torch.randn(6, 20),), tmp_path)
    for g, w in zip(got, want, strict=True):
        assert_fp32(g, w)


def test_where_comparison_cast_to_int(tmp_path):
    def fn(x, y):
        return torch.where(x > y, x, y * 2), (x * 4).to(torch.int32), (x <= 0.5).to(torch.int32)

    x, y = torch.randn(3, 7) * 3, torch.randn(3, 7)
    got, want, _ = run(Fn(fn), (x, y), tmp_path)
    assert_fp32(got[0], want[0])
    for g, w in zip(got[1:], want[1:], strict=True):
        assert g.dtype == np.int32
        np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------------------------------------------------------------
# fp16 programs: per-op rounding


def test_fp16_linear_equals_torch_rounded(tmp_path):
    m = torch.nn.Linear(32, 16)
    x = torch.randn(3, 32)
    got, _, ex = run(m, (x,), tmp_path, precision="fp16")
    want = fp16_copy(m)(x.half().float()).detach().numpy()      # fp16 weights and input, fp32 compute, one rounding
    assert_fp16(got[0], want)


def test_fp16_rounds_every_op(tmp_path):
    """(x * 0.1) + x: the product is rounded to fp16 before the add, as on the device; the fp32 result differs."""
    x = torch.randn(64) * 10
    got, _, ex = run(Fn(lambda x: torch.exp(x * 0.1) + x), (x,), tmp_path, precision="fp16")
    x16 = x.half().float()
    tenth = torch.tensor(0.1).half().float()
    per_op = (torch.exp((x16 * tenth).half().float()).half().float() + x16).half().numpy()
    np.testing.assert_array_equal(got[0], per_op)
    unrounded = (torch.exp(x16 * tenth) + x16).numpy()
    assert np.any(got[0].astype(np.float32) != unrounded)
    assert ex.op_counts().get("cast", 0) >= 1       # the fp32 input is cast to fp16 inside the program


def test_fp16_elementwise(tmp_path):
    x = torch.randn(4, 33) * 3
    got, _, _ = run(Fn(lambda x: (F.silu(x), torch.softmax(x, -1), torch.sigmoid(x))), (x,), tmp_path, "fp16")
    x16 = x.half().float()
    for g, w in zip(got, (F.silu(x16), torch.softmax(x16, -1), torch.sigmoid(x16)), strict=True):
        assert_fp16(g, w.numpy())


# ---------------------------------------------------------------------------------------------------------------------
# states


class KVCache(torch.nn.Module):
    """A mutable buffer written with index_copy_ at the positions given as input, then read."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(8, 2, 4))

    def forward(self, kv, pos):
        self.cache.index_copy_(0, pos, kv)
        return self.cache * 2.0


def test_state_kv_cache_persists_and_resets(tmp_path):
    from torch._decomp import get_decompositions

    torch_model = KVCache()
    kv1, pos1 = torch.randn(3, 2, 4).half().float(), torch.tensor([0, 1, 2])     # fp16-exact: the state is fp16
    kv2, pos2 = torch.randn(3, 2, 4).half().float(), torch.tensor([5, 1, 6])
    # coremltools 9.0 has no index_copy converter: decompose it alone (to index_put -> MIL scatter_nd)
    ep = torch.export.export(KVCache().eval(), (kv1, pos1))
    ep = ep.run_decompositions(get_decompositions([torch.ops.aten.index_copy.default]))
    mlmodel = ct.convert(ep, minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT16,
                         skip_model_load=True,
                         states=[ct.StateType(wrapped_type=ct.TensorType(shape=(8, 2, 4), dtype=np.float16),
                                              name="cache")])
    mlmodel.save(str(tmp_path / "kv.mlpackage"))
    ex = MilExecutor(tmp_path / "kv.mlpackage")
    counts = ex.op_counts()
    assert counts["read_state"] == 1 and counts["coreml_update_state"] == 1
    assert set(ex.states) == {"cache"} and ex.states["cache"].dtype == np.float16
    assert set(ex.inputs) == {"kv", "pos"}
    state = ex.states["cache"]

    for kv, pos in ((kv1, pos1), (kv2, pos2)):
        got = ex.predict({"kv": kv.numpy(), "pos": pos.numpy()})[ex.outputs[0]]
        want = torch_model(kv, pos).numpy()
        np.testing.assert_array_equal(got, want.astype(np.float16))
        np.testing.assert_array_equal(ex.states["cache"], torch_model.cache.numpy().astype(np.float16))
    assert ex.states["cache"] is state                      # updated in place
    assert np.count_nonzero(ex.states["cache"].any(axis=(1, 2))) == 5    # rows 0, 1, 2, 5, 6 (row 1 overwritten)

    ex.reset()
    assert not ex.states["cache"].any()
    got = ex.predict({"kv": kv2.numpy(), "pos": pos2.numpy()})[ex.outputs[0]]
    fresh = KVCache()
    np.testing.assert_array_equal(got, fresh(kv2, pos2).numpy().astype(np.float16))


def test_state_scatter_along_sequence_axis(tmp_path):
    """The KV cache layout of our decoder, [1, heads, max_seq, head_dim], written by MIL scatter along axis 2 (what
    our converter lowers index_copy to), checked against torch's index_copy_."""
    @mb.program(input_specs=[mb.StateTensorSpec((1, 2, 8, 4), dtype=types.fp16),
                             mb.TensorSpec((1, 2, 3, 4), dtype=types.fp16), mb.TensorSpec((3,), dtype=types.int32)],
                opset_version=ct.target.iOS18)
    def prog(cache, kv, pos):
        new = mb.scatter(data=mb.read_state(input=cache), indices=pos, updates=kv, axis=2, mode="update")
        return mb.reduce_sum(x=mb.coreml_update_state(state=cache, value=new), axes=[3])

    ex = convert_mil(prog, tmp_path / "m.mlpackage", precision="fp16")
    cache = torch.zeros(1, 2, 8, 4)
    for pos in ([0, 1, 2], [3, 4, 5]):
        kv = torch.randn(1, 2, 3, 4).half()
        cache.index_copy_(2, torch.tensor(pos), kv.float())
        got = ex.predict({"kv": kv.numpy(), "pos": np.array(pos, dtype=np.int32)})[ex.outputs[0]]
        np.testing.assert_array_equal(ex.states["cache"], cache.numpy().astype(np.float16))
        assert_fp16(got, cache.sum(3).numpy())


def test_read_state_after_update_is_merged_by_ct_convert(tmp_path):
    """A second read_state after coreml_update_state is merged by ct.convert's passes into the first read, so the
    saved program reads the state as it was before the update (the executor shows what the program says). Programs
    must use coreml_update_state's output, as the torch frontend does."""
    @mb.program(input_specs=[mb.StateTensorSpec((2, 3), dtype=types.fp16), mb.TensorSpec((2, 3), dtype=types.fp16)],
                opset_version=ct.target.iOS18)
    def prog(acc, x):
        mb.coreml_update_state(state=acc, value=mb.add(x=mb.read_state(input=acc), y=x))
        return mb.mul(x=mb.read_state(input=acc), y=np.float16(1.0))

    ex = convert_mil(prog, tmp_path / "m.mlpackage", precision="fp16")
    assert ex.op_counts()["read_state"] == 1
    x = np.ones((2, 3), np.float16)
    first = ex.predict({"x": x})[ex.outputs[0]]
    second = ex.predict({"x": x})[ex.outputs[0]]
    np.testing.assert_array_equal(first, np.zeros((2, 3)))          # not 1: the read before the update
    np.testing.assert_array_equal(second, np.ones((2, 3)))
    np.testing.assert_array_equal(ex.states["acc"], 2 * x)


# ---------------------------------------------------------------------------------------------------------------------
# dynamic shapes


def test_dynamic_sequence_length(tmp_path):
    """A RangeDim T: reshape with -1, shape, fill (ones(t, t)), band_part (tril), range_1d (arange(t)): ops whose
    value_inference reads the input's (symbolic) shape must see the concrete one."""
    class M(torch.nn.Module):
        def forward(self, x):
            b, t, d = x.shape
            heads = x.reshape(b, t, 2, -1).transpose(1, 2)                       # [b, 2, t, d/2]
            scores = heads @ heads.transpose(-1, -2)
            mask = torch.ones(t, t).tril()
            scores = scores.masked_fill(mask == 0, -1e4)
            out = torch.softmax(scores, -1) @ heads
            return out.transpose(1, 2).reshape(b, t, d) + torch.arange(t, dtype=torch.float32)[None, :, None]

    t = torch.export.Dim("t", min=1, max=16)
    ex = convert(M(), (torch.randn(1, 5, 8),), tmp_path / "m.mlpackage", dynamic_shapes={"x": {1: t}})
    assert ex.inputs["x"] == ((1, None, 8), np.dtype(np.float32))
    for length in (3, 11):
        x = torch.randn(1, length, 8)
        got = ex.predict({"x": x.numpy()})[ex.outputs[0]]
        assert_fp32(got, M()(x).numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# MIL programs our converter writes: 2-bit codes decoded by gathers


def test_gather_table_by_uint8_codes(tmp_path):
    table = np.random.default_rng(0).standard_normal((256, 4)).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec((3, 5), dtype=types.int32)], opset_version=ct.target.iOS18)
    def prog(codes):
        return mb.gather(x=table, indices=mb.cast(x=codes, dtype="uint8"), axis=0)

    ex = convert_mil(prog, tmp_path / "m.mlpackage", precision="fp16")
    gathers = [op for op in ex.function.operations if op.op_type == "gather"]
    assert [op.indices.dtype for op in gathers] == [types.uint8]
    codes = np.array([[0, 255, 7, 128, 3], [1, 2, 3, 4, 5], [255, 254, 0, 0, 9]], dtype=np.int32)
    got = ex.predict({"codes": codes})[ex.outputs[0]]
    want = torch.from_numpy(table)[torch.from_numpy(codes).long()].numpy()
    assert got.dtype == np.float16 and got.shape == (3, 5, 4)
    np.testing.assert_array_equal(got, want)


def test_gather_uint8_const_rows_by_int32(tmp_path):
    packed = np.random.default_rng(1).integers(0, 256, size=(10, 6), dtype=np.uint8)

    @mb.program(input_specs=[mb.TensorSpec((4,), dtype=types.int32)], opset_version=ct.target.iOS18)
    def prog(rows):
        return mb.cast(x=mb.gather(x=packed, indices=rows, axis=0), dtype="int32")

    ex = convert_mil(prog, tmp_path / "m.mlpackage")
    gathers = [op for op in ex.function.operations if op.op_type == "gather"]
    assert [op.x.dtype for op in gathers] == [types.uint8]
    rows = np.array([9, 0, 3, 3], dtype=np.int32)
    got = ex.predict({"rows": rows})[ex.outputs[0]]
    np.testing.assert_array_equal(got, torch.from_numpy(packed)[torch.from_numpy(rows).long()].int().numpy())


# ---------------------------------------------------------------------------------------------------------------------
# what the executor refuses


def test_op_without_value_inference_or_fallback_is_refused(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec((1, 4, 4, 4))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.space_to_depth(x=x, block_size=2)

    assert "space_to_depth" not in FALLBACKS
    mlmodel = ct.convert(prog, minimum_deployment_target=ct.target.iOS18, compute_precision=ct.precision.FLOAT32,
                         skip_model_load=True)
    mlmodel.save(str(tmp_path / "m.mlpackage"))
    with pytest.raises(NotImplementedError, match="MIL op space_to_depth .*no value_inference"):
        MilExecutor(tmp_path / "m.mlpackage")


def test_bad_inputs_are_refused(tmp_path):
    ex = convert(torch.nn.Linear(4, 2), (torch.randn(3, 4),), tmp_path / "m.mlpackage")
    with pytest.raises(ValueError, match="missing"):
        ex.predict({})
    with pytest.raises(ValueError, match="shape"):
        ex.predict({next(iter(ex.inputs)): np.zeros((3, 5), np.float32)})
