"""Our reference model against transformers' own forward, on directories transformers itself wrote.

The reference is what every target is verified against, so it must read a Hugging Face directory exactly as
transformers does (DESIGN.md section 2). Each test writes a tiny model with `save_pretrained` (nothing is
downloaded), loads it with our loader and with `from_pretrained`, and compares logits (and image features):

- routed experts all zero: our ternary path adds exact zeros, so the logits agree to float rounding (>= 80 dB);
- routed experts all +-s: absmean ternarisation is lossless, so the only difference is the per-token int8
  activation quantization of the ternary experts; with it replaced by the identity they agree to float rounding,
  and with it they still agree closely.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mote.export import semantics
from mote.export.loader import load_model
from mote.export.verify import sqnr_db
from mote.tools.make_hf_model import VOCAB, build, set_experts

transformers = pytest.importorskip("transformers")

EXACT_DB = 80.0


def qwen(**overrides):
    return build("qwen2_moe", **overrides)[0]


def save_and_reload(model, path):
    model.save_pretrained(path)
    ref = type(model).from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    ours = load_model(path)
    return ref, ours


def logits_pair(ref, ours, ids):
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = ours.forward_full(ours.embed(ids))
    return want, got


def no_activation_quantization(monkeypatch):
    monkeypatch.setattr(semantics, "quantize_activations", lambda v: (v, torch.ones_like(v[..., :1])))


TEXT_IDS = torch.tensor([[1, 17, 250, 3, 99, 42, 7, 180, 64, 5, 211, 33, 12, 8, 290, 77, 150, 2, 9, 120]])

QWEN_VARIANTS = {
    "top1": {},
    "top2": dict(num_experts_per_tok=2),
    "top2_norm": dict(num_experts_per_tok=2, norm_topk_prob=True),
    "mlp_only_layers": dict(mlp_only_layers=[1]),
    "sparse_step_2": dict(decoder_sparse_step=2),
    "tied_embeddings": dict(tie_word_embeddings=True),
    "no_qkv_bias": dict(qkv_bias=False),
    "rope_theta_10000": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "rope_linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "rope_dynamic": dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}),
    "rope_yarn": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 32}),
    "rope_llama3": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 16}),
    "head_dim_32": dict(head_dim=32),
}


@pytest.mark.parametrize("variant", sorted(QWEN_VARIANTS))
def test_qwen2_moe_zero_experts_match_transformers(tmp_path, variant):
    model = qwen(**QWEN_VARIANTS[variant])
    set_experts(model, "zero")
    ref, ours = save_and_reload(model, tmp_path / "m")
    want, got = logits_pair(ref, ours, TEXT_IDS)
    assert sqnr_db(want, got) >= EXACT_DB, f"{variant}: {sqnr_db(want, got):.1f} dB"


@pytest.mark.parametrize("variant", ["top1", "top2", "top2_norm", "mlp_only_layers", "sparse_step_2"])
def test_qwen2_moe_ternary_experts_differ_only_by_activation_quantization(tmp_path, monkeypatch, variant):
    model = qwen(**QWEN_VARIANTS[variant])
    set_experts(model, "pm_s")
    ref, ours = save_and_reload(model, tmp_path / "m")
    want, quantized = logits_pair(ref, ours, TEXT_IDS)
    with monkeypatch.context() as m:
        no_activation_quantization(m)
        _, unquantized = logits_pair(ref, ours, TEXT_IDS)
    exact, close = sqnr_db(want, unquantized), sqnr_db(want, quantized)
    assert exact >= EXACT_DB, f"{variant}: {exact:.1f} dB without activation quantization"
    # int8 activations are active (clearly below float rounding) and still close on random weights
    assert 15.0 <= close < exact - 20.0, f"{variant}: {close:.1f} dB with int8 activations (vs {exact:.1f} without)"


def test_fused_and_per_expert_files_read_the_same(tmp_path):
    """transformers 5.x saves per-expert tensors; its in-memory (and some checkpoints') layout is fused 3-D."""
    model = qwen(num_experts_per_tok=2)
    set_experts(model, "pm_s")
    path = tmp_path / "m"
    ref, per_expert = save_and_reload(model, path)
    tensors = load_file(str(path / "model.safetensors"))
    assert any(".mlp.experts.0.gate_proj.weight" in k for k in tensors)
    fused = {}
    for k in list(tensors):
        if ".mlp.experts." in k:
            continue
        fused[k] = tensors[k]
    for name, p in model.named_parameters():
        if ".mlp.experts." in name:
            fused[name] = p.detach().contiguous()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in fused)
    save_file(fused, str(path / "model.safetensors"), metadata={"format": "pt"})
    want, got = logits_pair(ref, load_model(path), TEXT_IDS)
    _, got_per_expert = logits_pair(ref, per_expert, TEXT_IDS)
    assert torch.equal(got, got_per_expert)


def test_legacy_rope_keys_read_like_transformers(tmp_path):
    """transformers 4.x configs: top-level rope_theta and rope_scaling {"type": ...}; 5.x standardizes them."""
    model = qwen()
    set_experts(model, "zero")
    path = tmp_path / "m"
    model.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["rope_parameters"]
    cfg.update(rope_theta=25000.0, rope_scaling={"type": "linear", "factor": 3.0})
    (path / "config.json").write_text(json.dumps(cfg))
    ref = transformers.Qwen2MoeForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    assert ref.config.rope_parameters["rope_type"] == "linear"
    ours = load_model(path)
    want, got = logits_pair(ref, ours, TEXT_IDS)
    assert sqnr_db(want, got) >= EXACT_DB


# -- LLaVA: CLIP / SigLIP tower + projector + Qwen2-MoE ----------------------------------------------------------

LLAVA_VARIANTS = {
    "clip_default_-2": ("llava_clip", -2, "default"),
    "clip_full_-1": ("llava_clip", -1, "full"),
    "clip_default_layers_0_2": ("llava_clip", [0, 2], "default"),
    "siglip_full_-1": ("llava_siglip", -1, "full"),
    "siglip_default_-2": ("llava_siglip", -2, "default"),
}


@pytest.mark.parametrize("variant", sorted(LLAVA_VARIANTS))
def test_llava_matches_transformers(tmp_path, monkeypatch, variant):
    layout, layer, strategy = LLAVA_VARIANTS[variant]
    model, n_img = build(layout, feature_layer=layer, strategy=strategy, num_experts_per_tok=2, norm_topk_prob=True)
    set_experts(model, "pm_s")
    ref, ours = save_and_reload(model, tmp_path / "m")
    no_activation_quantization(monkeypatch)
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    prefix, suffix = [1, 17, 250], [3, 99, 42, 7, 180]
    ids = torch.tensor([prefix + [VOCAB - 1] * n_img + suffix])
    with torch.no_grad():
        want_features = ref.model.get_image_features(pixel_values=pixels).pooler_output[0]
        want = ref(input_ids=ids, pixel_values=pixels).logits
        features = ours.encode_image(pixels)
        embeds = torch.cat([ours.embed(torch.tensor([prefix])), features, ours.embed(torch.tensor([suffix]))], dim=1)
        got = ours.forward_full(embeds)
    assert features.shape == (1, n_img, 64)
    assert sqnr_db(want_features, features[0]) >= EXACT_DB
    assert sqnr_db(want, got) >= EXACT_DB, f"{variant}: {sqnr_db(want, got):.1f} dB"
