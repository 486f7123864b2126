"""The mote:: ops: canonical packing (DESIGN.md section 4) and reference kernels equal to the eager model."""
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
