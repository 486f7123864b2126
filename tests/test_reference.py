"""The reference model against direct formulas of DESIGN.md section 1."""
import pytest
import torch
import torch.nn.functional as F

from mote.export import semantics
from mote.export.model import MoteBlock
from mote.export.config import parse_config
from mote.tools.make_random_model import random_config, random_model


def test_bitlinear_matches_direct_formula():
    x = torch.randn(5, 48) * 3
    w = torch.randn(24, 48)
    t, s = semantics.ternarize(w)
    # direct: s_w = mean|W|, T = clamp(round(W/s_w)), Q8 = round(v*127/max|v|) in [-128,127], integer dot product
    s_direct = w.abs().mean()
    t_direct = torch.clamp(torch.round(w / s_direct), -1, 1)
    amax = x.abs().max(dim=-1, keepdim=True).values
    q = torch.clamp(torch.round(x * 127 / amax), -128, 127).to(torch.int64)
    acc = q @ t_direct.to(torch.int64).T          # true integer arithmetic
    expect = acc.to(torch.float64) * (amax.double() / 127) * s_direct.double()
    got = semantics.bitlinear(x, t, s)
    assert torch.equal(t, t_direct) and set(t.unique().tolist()) <= {-1.0, 0.0, 1.0}
    torch.testing.assert_close(got.double(), expect, rtol=1e-6, atol=1e-6)


def test_bitlinear_per_channel_scale_and_zero_row():
    x = torch.randn(3, 16)
    x[1] = 0.0                                   # all-zero token: the 1e-5 clamp keeps it finite and zero
    w = torch.randn(8, 16) * torch.arange(1, 9)[:, None]
    t, s = semantics.ternarize(w, per_channel=True)
    assert s.shape == (8, 1)
    torch.testing.assert_close(s[:, 0], w.abs().mean(dim=1))
    got = semantics.bitlinear(x, t, s)
    q, sv = semantics.quantize_activations(x)
    torch.testing.assert_close(got, (q @ t.T) * sv * s[:, 0])
    assert torch.equal(got[1], torch.zeros(8))


def test_activation_quantization_is_int8_symmetric():
    x = torch.tensor([[-2.0, 1.0, 0.5, 2.0]])
    q, s = semantics.quantize_activations(x)
    assert q.tolist() == [[-127.0, 64.0, 32.0, 127.0]]   # round half to even: 63.5 -> 64, 31.75 -> 32
    torch.testing.assert_close(s, torch.tensor([[2.0 / 127]]))


@pytest.mark.parametrize("top_k,norm", [(1, False), (2, False), (2, True), (3, True)])
def test_routing_topk(top_k, norm):
    logits = torch.randn(7, 5)
    combine = semantics.route(logits, top_k, norm)
    p = torch.softmax(logits, -1)
    for row in range(7):
        order = torch.argsort(p[row], descending=True)
        chosen = order[:top_k]
        expect = torch.zeros(5)
        expect[chosen] = p[row, chosen] / (p[row, chosen].sum() if norm else 1.0)
        torch.testing.assert_close(combine[row], expect)
    assert ((combine > 0).sum(-1) == top_k).all()


@pytest.mark.parametrize("gate", [False, True])
def test_mote_block_equals_per_token_formula(gate):
    cfg = parse_config(random_config(top_k=2, norm_topk_prob=True, shared_expert_gate=gate, per_channel=True))
    model = random_model(random_config(top_k=2, norm_topk_prob=True, shared_expert_gate=gate, per_channel=True), 3)
    block = next(l.mlp for l in model.model.layers if isinstance(l.mlp, MoteBlock))
    x = torch.randn(1, 6, cfg.hidden_size)
    got = block(x)
    for t in range(6):
        xt = x[0, t]
        se = block.shared_expert
        shared = se.down_proj.weight @ (F.silu(se.gate_proj.weight @ xt) * (se.up_proj.weight @ xt))
        if gate:
            shared = torch.sigmoid(block.shared_expert_gate.weight @ xt) * shared
        p = torch.softmax(block.gate.weight @ xt, -1)
        top_p, top_i = torch.topk(p, 2)
        top_p = top_p / top_p.sum()
        y = shared
        for g, i in sorted(zip(top_p.tolist(), top_i.tolist()), key=lambda gi: gi[1]):
            ex = block.experts[i]
            def bl(v, lin):
                t_, s_ = semantics.ternarize(lin.weight, per_channel=True)
                amax = v.abs().max().clamp(min=1e-5)
                q = torch.clamp(torch.round(v * 127 / amax), -128, 127)
                return (t_ @ q) * (amax / 127) * s_[:, 0]
            y = y + g * bl(F.silu(bl(xt, ex.gate_proj)) * bl(xt, ex.up_proj), ex.down_proj)
        torch.testing.assert_close(got[0, t], y, rtol=1e-5, atol=1e-5)


def test_prefill_then_decode_equals_full_forward():
    model = random_model(random_config(layers=3, top_k=2), 4)
    x = torch.randn(1, 9, 64)
    with torch.no_grad():
        full = model.forward_full(x)
        k, v = model.new_cache(16)
        out = []
        logits, k, v = model.decode(x[:, :5], torch.tensor([0]), k, v)
        out.append(logits)
        for t in range(5, 9):
            logits, k, v = model.decode(x[:, t:t + 1], torch.tensor([t]), k, v)
            out.append(logits)
    torch.testing.assert_close(torch.cat(out, 1), full, rtol=1e-5, atol=1e-5)


def test_qat_forward_equals_eval_forward():
    model = random_model(random_config(), 5)
    x = torch.randn(1, 4, 64)
    with torch.no_grad():
        ev = model.forward_full(x)
        model.train()
        tr = model.forward_full(x)
    torch.testing.assert_close(tr, ev, rtol=1e-4, atol=1e-4)
