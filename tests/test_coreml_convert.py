"""targets/coreml/convert.py: our converters, each converted program run by the MIL executor (itself checked against
PyTorch op by op in test_mil_executor.py) and compared with PyTorch.

- mote.moe_ffn -> MIL over uint8 2-bit codes: equals the op's reference kernel (fp32 and fp16 programs), at decode
  it gathers the codes of the k chosen experts only, in a prefill at most min(T x k, E) experts, each once;
- aten.index_copy -> scatter along the sequence axis (the KV cache write);
- the three stock converters we replace because they compute something else: gelu(approximate="tanh"),
  reciprocal, and where with scalar branches under a dynamic T.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools")

from mote.export.verify import sqnr_db  # noqa: E402
from mote.passes.ops import pack_trits  # noqa: E402
from mote.targets.coreml import compute_precision  # noqa: E402  (the target's: fp16 with its fp32 exceptions)
from mote.targets.coreml.convert import ROUTED_TAG, register_converters  # noqa: E402
from mote.targets.coreml.mil_executor import MilExecutor  # noqa: E402

F = torch.nn.functional


def convert(module, args, path, precision="fp32", dynamic_shapes=None):
    register_converters()
    ep = torch.export.export(module.eval(), tuple(args), dynamic_shapes=dynamic_shapes)
    mlmodel = ct.convert(ep.run_decompositions({}), minimum_deployment_target=ct.target.iOS18,
                         compute_precision=compute_precision(precision), skip_model_load=True)
    mlmodel.save(str(path))
    return path


class Recording(MilExecutor):
    """The executor, recording the shape of every value the routed-expert code gathers produce."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.gathered = []

    def _run(self, step, env):
        super()._run(step, env)
        name = step.op.outputs[0].name
        if step.op.op_type == "gather" and ROUTED_TAG in name and "_codes" in name:
            self.gathered.append(env[name].shape)


class Moe(torch.nn.Module):
    def __init__(self, d=48, width=40, shared=56, experts=4, top_k=1, norm=False, per_channel=False, gate=False,
                 seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.top_k, self.norm, self.d = top_k, norm, d
        self.register_buffer("gate", torch.randn(1, d, generator=g) if gate else None)

        def trits(e, rows, k):
            return torch.randint(-1, 2, (e, rows, k), generator=g).float()

        def scale(e, rows):
            return torch.rand(e, rows if per_channel else 1, generator=g) * 0.05 + 0.01

        for name, value in [("sg", torch.randn(shared, d, generator=g) * 0.1),
                            ("su", torch.randn(shared, d, generator=g) * 0.1),
                            ("sd", torch.randn(d, shared, generator=g) * 0.1),
                            ("router", torch.randn(experts, d, generator=g)),
                            ("gp", pack_trits(trits(experts, width, d))), ("gs", scale(experts, width)),
                            ("up", pack_trits(trits(experts, width, d))), ("us", scale(experts, width)),
                            ("dp", pack_trits(trits(experts, d, width))), ("ds", scale(experts, d))]:
            self.register_buffer(name, value)

    def forward(self, x):
        return torch.ops.mote.moe_ffn(x, self.sg, self.su, self.sd, self.gate, self.router, self.gp, self.gs, self.up,
                                      self.us, self.dp, self.ds, self.top_k, self.norm)


@pytest.mark.parametrize("precision, bar", [("fp32", 60.0), ("fp16", 35.0)])
@pytest.mark.parametrize("top_k, norm, per_channel, d, gate", [
    (1, False, False, 48, False),
    (2, True, True, 50, True),      # K = 50 and 42: the codes padded to a multiple of 4; Qwen2-MoE's shared gate
])
def test_moe_ffn_equals_the_reference_kernel_and_reads_only_chosen_experts(tmp_path, precision, bar, top_k, norm,
                                                                         per_channel, d, gate):
    experts = 4
    module = Moe(d=d, width=40 if d == 48 else 42, top_k=top_k, norm=norm, per_channel=per_channel, gate=gate,
                 experts=experts)
    seq = torch.export.Dim("seq", min=1, max=64)
    x = torch.randn(1, 5, d)
    path = convert(module, (x,), tmp_path / "moe.mlpackage", precision, dynamic_shapes=({1: seq},))
    ex = Recording(path)
    for t, seed in [(1, 1), (1, 2), (3, 3), (9, 4)]:
        x = torch.randn(1, t, d, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            want = module(x)
        ex.gathered.clear()
        got = torch.from_numpy(ex.predict({"x": x.numpy()})[ex.outputs[0]].astype(np.float32))
        assert sqnr_db(want, got) >= bar, (t, sqnr_db(want, got))
        # gate, up and down codes of min(T x k, E) experts: k at decode, never a copy per token
        assert len(ex.gathered) == 3
        assert {shape[0] for shape in ex.gathered} == {min(t * top_k, experts)}


def test_fp16_activation_quantization_of_tiny_and_zero_rows(tmp_path):
    """In an fp16 program 127 / max|v| overflows once max|v| < 2e-3 (and inf * 0 is NaN): the quantization runs in
    fp32. Tiny inputs, and an all-zero expert (what a dead or pruned expert gives every token), stay finite and match
    the reference."""
    module = Moe()
    with torch.no_grad():
        module.gp[1].fill_(0b10101010)     # expert 1: every trit 0
        module.up[1].fill_(0b10101010)
    seq = torch.export.Dim("seq", min=1, max=64)
    path = convert(module, (torch.randn(1, 5, 48),), tmp_path / "moe.mlpackage", "fp16", dynamic_shapes=({1: seq},))
    ex = MilExecutor(path)
    for scale in (1.0, 1e-4):
        x = torch.randn(1, 9, 48, generator=torch.Generator().manual_seed(5)) * scale
        with torch.no_grad():
            want = module(x)
        got = torch.from_numpy(ex.predict({"x": x.numpy()})[ex.outputs[0]].astype(np.float32))
        assert torch.isfinite(got).all()
        if scale == 1.0:    # (at 1e-4 the outputs, ~1e-9, are below fp16's smallest number: zeros, not NaN)
            assert sqnr_db(want, got) >= 35.0, sqnr_db(want, got)


def test_moe_ffn_keeps_the_codes_uint8(tmp_path):
    """The package holds the routed experts as the uint8 packed codes, unchanged (no decoded float copy)."""
    from mote.targets.coreml.mil_executor import load_program

    module = Moe()
    path = convert(module, (torch.randn(1, 3, 48),), tmp_path / "moe.mlpackage", "fp16")
    consts = {op.outputs[0].name: op.outputs[0].val for op in load_program(path).functions["main"].operations
              if op.op_type == "const"}
    codes = [v for v in consts.values() if isinstance(v, np.ndarray) and v.dtype == np.uint8]
    assert sorted(c.shape for c in codes) == sorted([tuple(module.gp.shape), tuple(module.up.shape),
                                                     tuple(module.dp.shape)])
    assert any(np.array_equal(c, module.gp.numpy()) for c in codes)


def test_index_copy_writes_the_sequence_axis(tmp_path):
    class Write(torch.nn.Module):
        def forward(self, cache, pos, k):
            return cache.index_copy(2, pos + torch.arange(k.shape[2]), k)

    cache, k = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 3, 8)
    pos = torch.tensor([5])
    path = convert(Write(), (cache, pos, k), tmp_path / "w.mlpackage")
    ex = MilExecutor(path)
    got = ex.predict({"cache": cache.numpy(), "pos": pos.numpy().astype(np.int32), "k": k.numpy()})
    np.testing.assert_array_equal(got[ex.outputs[0]], Write()(cache, pos, k).numpy())


def _run(module, args, tmp_path, **kw):
    path = convert(module, args, tmp_path / "m.mlpackage", **kw)
    ex = MilExecutor(path)
    return ex, ex.predict({n: np.asarray(a) for n, a in zip(ex.inputs, args)})[ex.outputs[0]]


def test_gelu_tanh_keeps_its_approximation(tmp_path):
    """Stock coremltools 9.0 drops the `approximate` keyword of an ExportedProgram's gelu (exact gelu instead)."""
    x = torch.randn(4, 9) * 3
    ex, got = _run(torch.nn.GELU(approximate="tanh"), (x,), tmp_path)
    assert {op.inputs["mode"].val for op in ex.function.operations if op.op_type == "gelu"} == {"TANH_APPROXIMATION"}
    np.testing.assert_allclose(got, F.gelu(x, approximate="tanh").numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, F.gelu(x).numpy(), rtol=1e-5, atol=1e-6)


def test_reciprocal_is_a_division(tmp_path):
    """Stock coremltools 9.0 converts reciprocal to MIL inverse with epsilon 1e-4: 1 / (x + 1e-4)."""
    class Reciprocal(torch.nn.Module):
        def forward(self, x):
            return 1.0 / x

    x = torch.rand(16) + 0.5
    _, got = _run(Reciprocal(), (x,), tmp_path)
    np.testing.assert_allclose(got, (1.0 / x).numpy(), rtol=1e-6)


def test_where_with_scalar_branches_under_a_dynamic_shape(tmp_path):
    """The attention mask: where(cond [T, S], 0, -inf) with T dynamic. Stock coremltools declares a scalar output
    (select infers its type from the branches only); ours declares, and computes, [T, S]."""
    class Mask(torch.nn.Module):
        def forward(self, x):
            t = torch.arange(x.shape[1]).unsqueeze(-1)
            return torch.where(torch.arange(8).unsqueeze(0) <= t, 0.0, float("-inf")) + x.sum()

    mask = Mask()
    seq = torch.export.Dim("seq", min=1, max=8)
    x = torch.zeros(1, 3)
    ex, got = _run(mask, (x,), tmp_path, dynamic_shapes=({1: seq},))
    (select,) = [op for op in ex.function.operations if op.op_type == "select"]
    assert select.outputs[0].rank == 2
    np.testing.assert_array_equal(got, mask(x).numpy())
    got5 = ex.predict({"x": np.zeros((1, 5), np.float32)})[ex.outputs[0]]
    np.testing.assert_array_equal(got5, mask(torch.zeros(1, 5)).numpy())
