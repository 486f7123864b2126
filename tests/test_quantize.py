"""`--quantize`: the spec, the quantizer against an independent numpy one, quantize-on-load, and the passes that turn
the quantized weights into `mote::` ops (op types before and after, numerics unchanged, idempotent)."""

import numpy as np
import pytest
import torch

from mote.export import semantics
from mote.export.errors import InputError, PipelineError
from mote.export.loader import load_model, save_model
from mote.export.model import QuantizedEmbedding, QuantizedLinear
from mote.export.programs import KVCacheStyle, export_programs
from mote.export.quantization import parse, part_of
from mote.passes.check_quantized import check_quantized
from mote.passes.fuse_moe_block import fuse_moe_block
from mote.passes.fuse_quantized_linear import fuse_quantized_linear
from mote.passes.fuse_ternary_linear import fuse_ternary_linear
from mote.passes.pipeline import run_pipeline
from mote.passes.program import op_histogram
from mote.passes.ternarize_expert_weights import ternarize_expert_weights
from mote.passes.verify_numerics import run_program
from mote.tools.make_random_model import random_config, random_model, write_qwen2_moe


# -- the spec ---------------------------------------------------------------------------------------------------

def test_presets_and_overrides():
    int4 = parse("int4")
    assert int4.bits == {"embed": 8, "attn": 4, "shared": 4, "router": None, "lm_head": 8, "vision": 8}
    assert parse("8da4w").bits == parse("4w").bits == int4.bits
    assert parse("int8").bits == {"embed": 8, "attn": 8, "shared": 8, "router": None, "lm_head": 8, "vision": 8}
    spec = parse("int4,lm_head=int4,vision=fp32,group=64")
    assert spec.bits["lm_head"] == 4 and spec.bits["vision"] is None and spec.group == 64
    assert spec.group_size(4, 256) == 64 and spec.group_size(8, 256) == 64
    assert parse("shared=int4").bits == {"embed": None, "attn": None, "shared": 4, "router": None, "lm_head": None,
                                         "vision": None}
    default = parse("int4")
    assert default.group_size(4, 256) == 32 and default.group_size(8, 256) == 256   # int8: per output channel
    assert parse("int4,group=channel").group_size(4, 96) == 96


@pytest.mark.parametrize("text, message", [
    ("int3", "unknown preset 'int3'"), ("mlp=int4", "unknown part 'mlp'"), ("shared=int2", "shared='int2'"),
    ("int4,group=48", "group='48'"), ("router=int8", "router stays fp32"), ("int4,", "empty entry"),
])
def test_bad_specs_name_the_entry(text, message):
    with pytest.raises(InputError, match=message):
        parse(text)


def test_parts_of_module_names():
    assert part_of("model.embed_tokens") == "embed"
    assert part_of("model.layers.3.self_attn.o_proj") == "attn"
    assert part_of("model.layers.3.mlp.shared_expert.down_proj") == "shared"
    assert part_of("model.layers.1.mlp.up_proj") == "shared"            # a dense layer's FFN
    assert part_of("model.layers.3.mlp.gate") == "router"
    assert part_of("model.layers.3.mlp.shared_expert_gate") == "router"
    assert part_of("model.layers.3.mlp.experts.2.up_proj") is None      # routed experts stay ternary
    assert part_of("vision_tower.layers.0.fc1") == part_of("multi_modal_projector.linear_2") == "vision"
    assert part_of("vision_tower.patch_embed") is None                  # used as a convolution's weight
    assert part_of("lm_head") == "lm_head"


# -- the quantizer ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits, group", [(4, 32), (4, 96), (8, 96), (8, 16)])
def test_quantize_weight_matches_numpy(bits, group):
    w = torch.randn(5, 96, generator=torch.Generator().manual_seed(bits + group))
    w[0, :group] = 0.0                                      # an all-zero group: the 1e-5 clamp, q = 0
    q, s = semantics.quantize_weight(w, bits, group)
    qmax = 2 ** (bits - 1) - 1
    g = w.numpy().astype(np.float32).reshape(5, 96 // group, group)
    scale = np.maximum(np.abs(g).max(-1, keepdims=True), np.float32(1e-5)) / np.float32(qmax)
    expect = np.clip(np.rint(g / scale), -qmax - 1, qmax).astype(np.int8).reshape(5, 96)
    assert q.dtype == torch.int8 and s.shape == (5, 96 // group)
    np.testing.assert_array_equal(q.numpy(), expect)
    np.testing.assert_allclose(s.numpy(), scale[..., 0], rtol=0, atol=0)
    assert int(q.abs().max()) == qmax                       # the largest magnitude maps to +-qmax
    back = semantics.dequantize_weight(q, s, group)
    assert (back - w).abs().max() <= s.max() / 2 + 1e-6     # round to nearest: at most half a step off


# -- quantize on load ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("q") / "model"
    save_model(random_model(random_config(layers=3, moe_layers=[0, 2], top_k=2), 5), d)
    return d


def test_loader_quantizes_the_chosen_parts_as_it_reads(model_dir):
    fp32 = load_model(model_dir)
    model = load_model(model_dir, parse("int4"))
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert kinds["model.embed_tokens"] is QuantizedEmbedding and model.model.embed_tokens.bits == 8
    assert model.model.layers[0].self_attn.q_proj.bits == 4 and model.model.layers[0].self_attn.q_proj.group_size == 32
    assert model.model.layers[1].mlp.gate_proj.bits == 4                  # the dense layer's FFN
    assert model.model.layers[0].mlp.shared_expert.up_proj.bits == 4
    assert not isinstance(model.model.layers[0].mlp.gate, QuantizedLinear)  # the router stays fp32
    assert model.vision_tower.layers[0].fc1.bits == 8 and not isinstance(model.vision_tower.patch_embed, QuantizedLinear)
    # The tied head gets its own int8 copy from the embedding's tensor; no float weight of a quantized module is left.
    assert model.lm_head.bits == 8 and model.lm_head.group_size == model.config.hidden_size
    float_left = {n for n, t in model.state_dict().items()
                  if t.is_floating_point() and t.dim() == 2 and not n.endswith(".qscale")}
    assert float_left == {"model.layers.0.mlp.gate.weight", "model.layers.2.mlp.gate.weight",
                          "vision_tower.patch_embed.weight", "vision_tower.pos_embed"}
    # Each quantized weight is exactly the quantizer applied to the fp32 model's weight.
    q, s = semantics.quantize_weight(fp32.model.layers[2].self_attn.o_proj.weight, 4, 32)
    assert torch.equal(model.model.layers[2].self_attn.o_proj.qweight, q)
    assert torch.equal(model.model.layers[2].self_attn.o_proj.qscale, s)
    q, _ = semantics.quantize_weight(fp32.model.embed_tokens.weight, 8, model.config.hidden_size)
    assert torch.equal(model.lm_head.qweight, q) and torch.equal(model.model.embed_tokens.qweight, q)


def test_quantizing_a_block_of_rows_at_a_time_changes_nothing(model_dir, monkeypatch):
    import mote.export.loader as loader

    whole = load_model(model_dir, parse("int4"))
    monkeypatch.setattr(loader, "QUANTIZE_ROWS", 7)       # the example's 260-row embedding in 38 blocks
    blocks = load_model(model_dir, parse("int4"))
    for (name, a), (_, b) in zip(whole.state_dict().items(), blocks.state_dict().items()):
        assert torch.equal(a, b), name


def test_group_that_does_not_divide_a_width_is_refused_before_reading(model_dir):
    with pytest.raises(InputError, match=r"group 256 does not divide the input width 64 of 'model.embed_tokens'"):
        load_model(model_dir, parse("embed=int8,group=256"))


# -- the passes ---------------------------------------------------------------------------------------------------

def _decoder(model):
    return export_programs(model, 16, KVCacheStyle.IO)["text_decoder"]


def test_fuse_quantized_linear_rewrites_every_quantized_weight(model_dir):
    model = load_model(model_dir, parse("int4"))
    ep = _decoder(model)
    inputs = ep.example_inputs[0]
    before_ops, before = op_histogram(ep), run_program(ep, inputs)
    n_quantized = sum(type(m) is QuantizedLinear for n, m in model.named_modules()
                      if not n.startswith(("vision_tower", "multi_modal_projector")))
    assert before_ops["mote.dequantize_weight"] == n_quantized     # the decoder reads every quantized linear
    assert fuse_quantized_linear(ep) == n_quantized
    after_ops = op_histogram(ep)
    assert "mote.dequantize_weight" not in after_ops
    assert after_ops["mote.quantized_linear"] == n_quantized
    assert after_ops["aten.linear"] == before_ops["aten.linear"] - n_quantized
    for a, b in zip(before, run_program(ep, inputs)):
        assert torch.equal(a, b)                                    # the same dequantize + linear: bit-identical
    assert fuse_quantized_linear(ep) == 0


def test_quantized_embedding_is_a_gather(model_dir):
    ep = export_programs(load_model(model_dir, parse("embed=int8")), 16, KVCacheStyle.IO)["token_embedding"]
    inputs = ep.example_inputs[0]
    before = run_program(ep, inputs)
    assert op_histogram(ep) == {"mote.dequantize_weight": 1, "aten.embedding": 1}
    assert fuse_quantized_linear(ep) == 1
    assert op_histogram(ep) == {"mote.quantized_embedding": 1}
    assert torch.equal(before[0], run_program(ep, inputs)[0])


@pytest.mark.parametrize("layout", ["mote", "qwen2_moe"])   # Qwen2-MoE: with the sigmoid shared-expert gate
def test_quantized_shared_expert_stays_outside_the_fused_block(layout, tmp_path):
    d = tmp_path / layout
    model = random_model(random_config(layers=2, top_k=2, shared_expert_gate=layout == "qwen2_moe", vision=False), 8)
    write_qwen2_moe(model, d, True) if layout == "qwen2_moe" else save_model(model, d)
    ep = _decoder(load_model(d, parse("shared=int8")))
    inputs = ep.example_inputs[0]
    before = run_program(ep, inputs)
    for p in (ternarize_expert_weights, fuse_ternary_linear, fuse_quantized_linear):
        p(ep)
    assert fuse_moe_block(ep) == 2
    ops = op_histogram(ep)
    assert ops["mote.moe_ffn"] == 2 and ops["mote.quantized_linear"] == 6 and "mote.ternary_linear" not in ops
    for node in [n for n in ep.graph.nodes if n.target is torch.ops.mote.moe_ffn.default]:
        assert node.args[1:5] == (None, None, None, None)           # no shared weights inside the op
        (add,) = node.users                                         # y = shared + moe_ffn(...)
        assert add.target is torch.ops.aten.add.Tensor
    for a, b in zip(before, run_program(ep, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)      # top-2: the k + 1 additions in another order


def test_pipeline_log_and_check(model_dir):
    model = load_model(model_dir, parse("int4"))
    programs = export_programs(model, 16, KVCacheStyle.IO)
    programs, log = run_pipeline(programs, model.config.moe.moe_layers)
    assert log["token_embedding"]["quantized_ops"] == 1
    assert log["vision_encoder"]["quantized_ops"] == log["vision_encoder"]["rewrites"]["fuse_quantized_linear"] > 0
    assert log["text_decoder"]["moe_ffn_layers"] == [0, 2]


def test_a_weight_the_pass_cannot_fuse_stops_the_export(model_dir):
    model = load_model(model_dir, parse("attn=int8"))
    ep = _decoder(model)
    fuse_quantized_linear(ep)
    # Give one quantized weight a reader the pass does not know: a dequantize feeding a transpose.
    from mote.passes.program import call
    q_node = next(n for n in ep.graph.nodes if n.target is torch.ops.mote.quantized_linear.default)
    dq = call(ep.graph, torch.ops.mote.dequantize_weight.default, (*q_node.args[1:3], 8, q_node.args[5]), q_node)
    out = call(ep.graph, torch.ops.aten.t.default, (dq,), q_node)
    ep.graph.output_node().args = ((*ep.graph.output_node().args[0], out),)
    with pytest.raises(PipelineError, match=r"self_attn.q_proj.qweight: quantized weight was not fused \(it is read "
                                            r"by t.default, not by a linear or an embedding\)"):
        check_quantized({"text_decoder": ep})
