"""The mote:: ops: canonical packing (DESIGN.md section 4) and reference kernels equal to the eager model."""
import pytest
import torch

from mote.export import semantics
from mote.export.model import MoteBlock
from mote.passes import ops
from mote.tools.make_random_model import random_config, random_model


def test_packing_layout_is_code_trit_plus_two_lowest_bits_first():
    trits = torch.tensor([[-1, 0, 1, 1, 0, -1]])
    packed = ops.pack_trits(trits)
    # codes 1,2,3,3 -> 1 | 2<<2 | 3<<4 | 3<<6 ; then 2,1 + two zero-code pads (2,2)
    assert packed.tolist() == [[1 | 2 << 2 | 3 << 4 | 3 << 6, 2 | 1 << 2 | 2 << 4 | 2 << 6]]
    assert packed.dtype == torch.uint8
    assert torch.equal(ops.unpack(packed, 6), trits.float())


def test_pack_roundtrip_random_shapes():
    for k in (1, 4, 7, 33, 96):
        t = torch.randint(-1, 2, (5, 3, k))
        assert torch.equal(ops.unpack(ops.pack_trits(t), k), t.float())


def test_ternary_linear_equals_bitlinear_bitwise():
    w = torch.randn(24, 40)
    x = torch.randn(2, 7, 40)
    for per_channel in (False, True):
        t, s = semantics.ternarize(w, per_channel)
        got = torch.ops.mote.ternary_linear(x, ops.pack_trits(t), s.reshape(-1), 40)
        assert torch.equal(got, semantics.bitlinear(x, t, s))


def test_moe_ffn_equals_eager_block_bitwise():
    for kw in (dict(), dict(top_k=2, norm_topk_prob=True, per_channel=True, shared_expert_gate=True)):
        model = random_model(random_config(**kw), 1)
        block = next(l.mlp for l in model.model.layers if isinstance(l.mlp, MoteBlock))
        x = torch.randn(1, 5, 64)
        stacked = {}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            tw = [getattr(e, proj).ternary_weight() for e in block.experts]
            stacked[proj] = (torch.stack([ops.pack_trits(t) for t, _ in tw]),
                             torch.stack([s.reshape(-1) for _, s in tw]))
        se = block.shared_expert
        got = torch.ops.mote.moe_ffn(
            x, se.gate_proj.weight, se.up_proj.weight, se.down_proj.weight,
            None if block.shared_expert_gate is None else block.shared_expert_gate.weight, block.gate.weight,
            *stacked["gate_proj"], *stacked["up_proj"], *stacked["down_proj"], block.top_k, block.norm_topk_prob)
        with torch.no_grad():
            assert torch.equal(got, block(x))


# -- the MoE op's description and the shared lowering helpers -------------------------------------------------------

def test_moe_ffn_args_are_the_schema_arguments_by_name():
    import dataclasses

    from mote.passes.ops import MoeFfnArgs

    schema = [a.name for a in torch.ops.mote.moe_ffn.default._schema.arguments]
    assert [f.name for f in dataclasses.fields(MoeFfnArgs)] == schema


def test_moe_ffn_args_read_a_fused_node_by_name():
    from mote.export.programs import KVCacheStyle, export_programs
    from mote.passes.pipeline import run_pipeline
    from mote.passes.program import constant_value
    from mote.targets.lowering import moe_nodes, routed_expert_weights
    from mote.tools.make_random_model import random_config, random_model

    model = random_model(random_config(layers=2, hidden=40, expert_intermediate=24, experts=3, top_k=2,
                                       norm_topk_prob=True, shared_expert_gate=True), 1)
    programs, _ = run_pipeline(export_programs(model, 16, KVCacheStyle.STATE), model.config.moe.moe_layers)
    ep = programs["text_decoder"]
    nodes = moe_nodes(ep)
    assert len(nodes) == len(model.config.moe.moe_layers)
    for _, args in nodes:
        assert args.top_k == 2 and args.norm_topk_prob is True
        assert args.x.meta["val"].shape[-1] == 40
        assert constant_value(ep, args.shared_expert_gate).shape == (1, 40)
        assert constant_value(ep, args.router).shape == (3, 40)
        shapes = {name: tuple(constant_value(ep, packed).shape) for name, packed, _, _ in args.projections(40, 24)}
        assert shapes == {"gate": (3, 24, 10), "up": (3, 24, 10), "down": (3, 40, 6)}
    assert routed_expert_weights(ep) == len(nodes) * 3 * 3 * 40 * 24


@pytest.mark.parametrize("top_k,norm,gate", [(1, False, False), (2, True, True)])
def test_gathered_top_k_decomposition_equals_the_op(top_k, norm, gate):
    """The shared decomposition (targets/lowering.py) against the reference kernel: same shared expert, routing and
    experts, summed over the chosen experts only."""
    from mote.passes.ops import MoeFfnArgs, pack_trits, unpack
    from mote.targets.lowering import chosen_experts, gathered_top_k_moe, grouped_ternary_experts

    d, inter, e = 36, 20, 5
    x = torch.randn(2, 7, d)
    packed = lambda rows, k: pack_trits(torch.randint(-1, 2, (e, rows, k)))  # noqa: E731
    args = MoeFfnArgs(x, torch.randn(16, d), torch.randn(16, d), torch.randn(d, 16),
                      torch.randn(1, d) if gate else None, torch.randn(e, d),
                      packed(inter, d), torch.rand(e, inter) + 0.1, packed(inter, d), torch.rand(e, 1) + 0.1,
                      packed(d, inter), torch.rand(e, d) + 0.1, top_k, norm)
    expected = torch.ops.mote.moe_ffn(*args.args())
    got = gathered_top_k_moe(args.x, args.shared, args.shared_expert_gate, args.router, e, top_k, norm,
                             grouped_ternary_experts(args, unpack))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert chosen_experts(torch.tensor([[3, 1], [1, 4]]), e).tolist() == [1, 3, 4]


def test_block_padding_keeps_every_k_and_picks_the_largest_block():
    from mote.targets.lowering import block_scales, block_size, pad_codes, padded

    assert [padded(k) for k in (32, 33, 80, 896)] == [32, 64, 96, 896]
    assert block_size(896) == 128 and block_size(64, 96) == 32 and block_size(1024, 512) == 512
    codes = torch.randint(0, 4, (2, 3, 5), dtype=torch.uint8)
    out = pad_codes(codes, 4, 8)
    assert torch.equal(out[:, :3, :5], codes) and (out[:, 3:] == 2).all() and (out[:, :, 5:] == 2).all()
    scales = block_scales(torch.tensor([[0.5], [2.0]]), 3, 4, 2)   # one scale per tensor, 3 rows padded to 4
    assert scales.shape == (2, 4, 2) and (scales[0, :3] == 0.5).all() and (scales[:, 3] == 1.0).all()
