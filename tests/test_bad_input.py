"""Bad input is refused with exit code 2 and one clear stderr line (DESIGN.md sections 2 and 7); good layouts load.

Every refusal test runs the real command line in process,

    mote-export --target onnx MODEL_DIR -o OUT

and checks: exit code 2; stderr is exactly one line, `mote-export: error: ...`, naming the offending file or tensor
and the problem; no traceback; nothing written (neither OUT nor a staging folder next to it). The model is loaded
before the target is needed, so none of this depends on a target toolchain.
"""
from __future__ import annotations

import json
import math
import pathlib
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mote.export.loader import load_model
from mote.tools.cli import main
from mote.tools.make_random_model import random_config, random_model, write_qwen2_moe

WEIGHTS = "model.safetensors"
EXPERT_UP = "model.layers.1.mlp.experts.2.up_proj.weight"       # a routed-expert projection (layers are all MoE)
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"               # a full-precision weight, [64, 64] by default


# -- helpers -------------------------------------------------------------------------------------------------------

def refused(model_dir: Path, capsys, *expected: str) -> str:
    """Run the CLI on a bad model directory; assert the refusal contract; return the error line."""
    out = model_dir.parent / f"{model_dir.name}-onnx-out"
    capsys.readouterr()                                         # drop anything earlier steps of the test printed
    rc = main(["--target", "onnx", str(model_dir), "-o", str(out)])
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err, err
    assert rc == 2, f"exit code {rc}, stderr:\n{err}"
    lines = err.splitlines()
    assert len(lines) == 1, f"stderr must be exactly one line, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("mote-export: error:"), line
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"
    assert not out.exists(), "a refused run must not create the output directory"
    assert not list(out.parent.glob(".*staging*")), "a refused run must not leave a staging folder"
    return line


def tensors_of(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / WEIGHTS))


def rewrite(model_dir: Path, change) -> None:
    """Load model.safetensors, let `change(tensors)` edit the dict in place, write it back."""
    tensors = tensors_of(model_dir)
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(model_dir / WEIGHTS), metadata={"format": "pt"})


def edit_config(model_dir: Path, change) -> None:
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    change(cfg)
    path.write_text(json.dumps(cfg))


def shard(model_dir: Path, n_first: int | None = None) -> list[str]:
    """Split model.safetensors into two shards + model.safetensors.index.json (in place); returns the shard names."""
    tensors = tensors_of(model_dir)
    names = sorted(tensors)
    n_first = len(names) // 2 if n_first is None else n_first
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for fname, part in zip(files, (names[:n_first], names[n_first:])):
        save_file({k: tensors[k] for k in part}, str(model_dir / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (model_dir / WEIGHTS).unlink()
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def logits_of(model, seed: int = 1, n_tokens: int = 7) -> torch.Tensor:
    embeds = torch.randn(1, n_tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.forward_full(embeds)


# -- the config --------------------------------------------------------------------------------------------------

def test_missing_model_dir(tmp_path, capsys):
    refused(tmp_path / "nope", capsys, str(tmp_path / "nope"), "not a directory")


def test_missing_config(make_model_dir, capsys):
    d = make_model_dir()
    (d / "config.json").unlink()
    refused(d, capsys, str(d / "config.json"), "not found")


def test_config_not_json(make_model_dir, capsys):
    d = make_model_dir()
    (d / "config.json").write_text('{"model_type": "mote", "hidden_size": 64,,}')
    refused(d, capsys, str(d / "config.json"), "not valid JSON")


def test_config_not_utf8(make_model_dir, capsys):
    d = make_model_dir()
    (d / "config.json").write_bytes(b"\xff\xfe\x00garbage\x9c")
    refused(d, capsys, str(d / "config.json"), "not valid JSON")


def test_config_not_an_object(make_model_dir, capsys):
    d = make_model_dir()
    (d / "config.json").write_text("[1, 2, 3]")
    refused(d, capsys, "config.json", "expected a JSON object")


def test_config_missing_required_key(make_model_dir, capsys):
    d = make_model_dir()
    edit_config(d, lambda c: c.pop("hidden_size"))
    refused(d, capsys, str(d / "config.json"), "missing required key 'hidden_size'")


def test_config_missing_moe_key(make_model_dir, capsys):
    d = make_model_dir()
    edit_config(d, lambda c: c["moe"].pop("num_experts"))
    refused(d, capsys, "config.json", "'moe'", "missing required key 'num_experts'")


BAD_VALUES = {
    "heads_do_not_divide_hidden": (lambda c: c.update(num_attention_heads=5),
                                   ["hidden_size 64 is not divisible by num_attention_heads 5"]),
    "kv_heads_do_not_divide_heads": (lambda c: c.update(num_key_value_heads=3),
                                     ["num_attention_heads 4 is not a multiple of num_key_value_heads 3"]),
    "odd_head_dim": (lambda c: c.update(hidden_size=60, num_attention_heads=4), ["head_dim 15 must be even"]),
    "top_k_above_num_experts": (lambda c: c["moe"].update(top_k=5), ["top_k 5 exceeds num_experts 4"]),
    "zero_top_k": (lambda c: c["moe"].update(top_k=0), ["'top_k' must be >= 1, got 0"]),
    "moe_layers_out_of_range": (lambda c: c["moe"].update(moe_layers=[0, 7]),
                                ["'moe_layers' has indices outside [0, 2): [7]"]),
    "moe_layers_not_a_list": (lambda c: c["moe"].update(moe_layers="some"), ["'moe_layers' must be"]),
    "moe_layers_repeated": (lambda c: c["moe"].update(moe_layers=[1, 1]), ["'moe_layers' lists a layer twice"]),
    "negative_vocab": (lambda c: c.update(vocab_size=-5), ["'vocab_size' must be >= 1, got -5"]),
    "string_hidden_size": (lambda c: c.update(hidden_size="64"), ["'hidden_size' must be an integer, got '64'"]),
    "float_layers": (lambda c: c.update(num_hidden_layers=2.0), ["'num_hidden_layers' must be an integer, got 2.0"]),
    "bool_as_int": (lambda c: c.update(num_hidden_layers=True), ["'num_hidden_layers' must be an integer, got True"]),
    "nan_norm_eps": (lambda c: c.update(rms_norm_eps=math.nan), ["'rms_norm_eps' must be a finite number"]),
    "negative_rope_theta": (lambda c: c.update(rope_theta=-1.0), ["'rope_theta' must be > 0, got -1.0"]),
    "tie_not_bool": (lambda c: c.update(tie_word_embeddings="yes"), ["'tie_word_embeddings' must be true or false"]),
    "unknown_model_type": (lambda c: c.update(model_type="llama"), ["'model_type' must be one of", "'llama'"]),
    "unknown_weight_scale": (lambda c: c["moe"].update(weight_scale="per_group"), ["'weight_scale' must be one of"]),
    "activation_bits_4": (lambda c: c["moe"].update(activation_bits=4), ["'activation_bits' must be one of [8]"]),
    "moe_not_an_object": (lambda c: c.update(moe=3), ["'moe'", "expected a JSON object"]),
    "eos_outside_vocab": (lambda c: c.update(eos_token_id=999), ["eos_token_id 999 is outside the vocabulary"]),
    "image_size_not_multiple_of_patch": (lambda c: c["vision"].update(image_size=20),
                                         ["image_size 20 is not a multiple of patch_size 8"]),
    "vision_without_image_token": (lambda c: c.pop("image_token_id"), ["needs 'image_token_id'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_config_bad_value(make_model_dir, capsys, case):
    change, expected = BAD_VALUES[case]
    d = make_model_dir()
    edit_config(d, change)
    refused(d, capsys, str(d / "config.json"), *expected)


def test_absurd_sizes_refused_before_allocating(make_model_dir, capsys):
    # ~1e15 weights: refused from the config alone (the weight file is the small random one).
    d = make_model_dir()
    edit_config(d, lambda c: c.update(hidden_size=1_000_000, num_hidden_layers=1000))
    refused(d, capsys, str(d / "config.json"), "GiB", "refusing before allocating")


def test_absurd_layer_count_refused_before_building(make_model_dir, capsys):
    # 100k small layers: 16 GB of weights (under the byte limit), but building the module tree would take minutes
    # and tens of GB of Python objects before a single file is read.
    d = make_model_dir()
    edit_config(d, lambda c: c.update(num_hidden_layers=100_000))
    refused(d, capsys, str(d / "config.json"), "100000 layers", "weight tensors", "refusing before allocating")


def test_qwen2_moe_bad_mlp_only_layers(tmp_path, capsys):
    d = tmp_path / "qwen"
    write_qwen2_moe(random_model(random_config(shared_expert_gate=True, vision=False)), d, fused_experts=False)
    edit_config(d, lambda c: c.update(mlp_only_layers=5))
    refused(d, capsys, str(d / "config.json"), "'mlp_only_layers' must be a list")


QWEN_BAD_CONFIG = {
    "sliding_window": (lambda c: c.update(use_sliding_window=True), ["'use_sliding_window': True is not supported"]),
    "sliding_layer_type": (lambda c: c.update(layer_types=["full_attention", "sliding_attention"]),
                           ["'layer_types': 'sliding_attention' is not supported"]),
    "gelu_text": (lambda c: c.update(hidden_act="gelu"), ["'hidden_act' is not supported", "'gelu'"]),
    "longrope": (lambda c: c.update(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}),
                 ["'rope_type': 'longrope' is not supported"]),
    "partial_rotary": (lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                           "partial_rotary_factor": 0.5}),
                       ["'partial_rotary_factor': 0.5 is not supported"]),
    "unknown_rope_key": (lambda c: c.update(rope_scaling={"type": "linear", "factor": 2.0, "fudge": 1}),
                         ["'rope_scaling'", "key 'fudge' is not implemented"]),
    "linear_without_factor": (lambda c: c.update(rope_scaling={"type": "linear"}), ["missing required key 'factor'"]),
    "unknown_key": (lambda c: c.update(attn_logit_softcapping=30.0),
                    ["key 'attn_logit_softcapping' is not implemented"]),
    "null_kv_heads": (lambda c: c.update(num_key_value_heads=None), ["missing required key 'num_key_value_heads'"]),
    "quantized_dtype": (lambda c: c.update(dtype="int8"), ["'dtype': 'int8' is not supported"]),
    "bad_eos": (lambda c: c.update(eos_token_id=["2"]), ["'eos_token_id' must be a token id"]),
    "no_moe_layer": (lambda c: c.update(mlp_only_layers=[0, 1]), ["no layer is a MoE layer"]),
}


@pytest.mark.parametrize("case", sorted(QWEN_BAD_CONFIG))
def test_qwen2_moe_config_not_implemented(tmp_path, capsys, case):
    """A key that would change the computation is implemented or refused by name, never ignored."""
    change, expected = QWEN_BAD_CONFIG[case]
    d = tmp_path / "qwen"
    write_qwen2_moe(random_model(random_config(shared_expert_gate=True, vision=False)), d, fused_experts=False)
    edit_config(d, change)
    refused(d, capsys, str(d / "config.json"), *expected)


def test_transformers_null_ids_are_accepted(tmp_path):
    d = tmp_path / "qwen"
    write_qwen2_moe(random_model(random_config(shared_expert_gate=True, vision=False)), d, fused_experts=False)
    edit_config(d, lambda c: c.update(bos_token_id=None, eos_token_id=None, pad_token_id=None))
    cfg = load_model(d).config
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.pad_token_id) == (None, (), None)


NATIVE_NOT_IMPLEMENTED = {
    "unknown_top_level": (lambda c: c.update(logit_scale=2.0), ["key 'logit_scale' is not implemented"]),
    "unknown_moe_key": (lambda c: c["moe"].update(capacity_factor=1.25), ["'moe'", "key 'capacity_factor'"]),
    "unknown_vision_key": (lambda c: c["vision"].update(use_cls_token=True), ["'vision'", "key 'use_cls_token'"]),
    "relu_text": (lambda c: c.update(hidden_act="relu"), ["'hidden_act' is not supported"]),
}


@pytest.mark.parametrize("case", sorted(NATIVE_NOT_IMPLEMENTED))
def test_native_config_not_implemented(make_model_dir, capsys, case):
    change, expected = NATIVE_NOT_IMPLEMENTED[case]
    d = make_model_dir()
    edit_config(d, change)
    refused(d, capsys, str(d / "config.json"), *expected)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    vc = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=16, patch_size=8)
    tc = transformers.Qwen2MoeConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=32,
                                     shared_expert_intermediate_size=96, num_experts=4, num_experts_per_tok=1)
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_index=299, image_seq_length=4)
    d = tmp_path_factory.mktemp("llava") / "llava"
    transformers.LlavaForConditionalGeneration(cfg).save_pretrained(d)
    return d


LLAVA_BAD_CONFIG = {
    "llama_text": (lambda c: c["text_config"].update(model_type="llama"), ["'text_config'", "'model_type'", "'llama'"]),
    "unknown_tower": (lambda c: c["vision_config"].update(model_type="siglip2_vision_model"),
                      ["'vision_config'", "'siglip2_vision_model'"]),
    "image_seq_length": (lambda c: c.update(image_seq_length=5), ["'image_seq_length' 5 != the 4 image features"]),
    "relu_projector": (lambda c: c.update(projector_hidden_act="relu"), ["'projector_hidden_act' is not supported"]),
    "feature_layer_out_of_range": (lambda c: c.update(vision_feature_layer=-4), ["'vision_feature_layer' -4"]),
    "select_strategy": (lambda c: c.update(vision_feature_select_strategy="cls_patch"),
                        ["'vision_feature_select_strategy' must be one of"]),
    "vision_unknown_key": (lambda c: c["vision_config"].update(use_rope=True), ["key 'use_rope'"]),
}


@pytest.mark.parametrize("case", sorted(LLAVA_BAD_CONFIG))
def test_llava_config_not_implemented(llava_dir, tmp_path, capsys, case):
    import shutil
    change, expected = LLAVA_BAD_CONFIG[case]
    d = tmp_path / "llava"
    shutil.copytree(llava_dir, d)
    edit_config(d, change)
    refused(d, capsys, str(d / "config.json"), *expected)


# -- the tensors -------------------------------------------------------------------------------------------------

def test_missing_tensor(make_model_dir, capsys):
    d = make_model_dir()
    rewrite(d, lambda t: t.pop(EXPERT_UP))
    refused(d, capsys, str(d), f"missing tensor '{EXPERT_UP}'")


def test_unexpected_tensor(make_model_dir, capsys):
    d = make_model_dir()
    rewrite(d, lambda t: t.update({"model.layers.0.mlp.bogus.weight": torch.zeros(4, 4)}))
    refused(d, capsys, str(d / WEIGHTS), "unexpected tensor 'model.layers.0.mlp.bogus.weight'")


def test_untied_lm_head_in_tied_model_is_unexpected(make_model_dir, capsys):
    d = make_model_dir()
    rewrite(d, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    refused(d, capsys, str(d / WEIGHTS), "unexpected tensor 'lm_head.weight'")


def test_shape_mismatch(make_model_dir, capsys):
    d = make_model_dir()
    rewrite(d, lambda t: t.update({Q_PROJ: torch.zeros(64, 63)}))
    refused(d, capsys, str(d / WEIGHTS), f"'{Q_PROJ}'", "shape [64, 63], expected [64, 64]")


def test_transposed_expert_weight(make_model_dir, capsys):
    d = make_model_dir()
    rewrite(d, lambda t: t.update({EXPERT_UP: t[EXPERT_UP].T}))
    refused(d, capsys, str(d / WEIGHTS), f"'{EXPERT_UP}'", "shape [64, 96], expected [96, 64]")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_dtype_mismatch(make_model_dir, capsys, dtype):
    d = make_model_dir()
    rewrite(d, lambda t: t.update({Q_PROJ: t[Q_PROJ].to(dtype)}))
    name = str(dtype).replace("torch.", "")
    refused(d, capsys, str(d / WEIGHTS), f"'{Q_PROJ}'", f"dtype {name}, expected float32, float16 or bfloat16")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", [Q_PROJ, EXPERT_UP, "model.norm.weight"])
def test_nan_or_inf_weight(make_model_dir, capsys, bad, name):
    d = make_model_dir()

    def poison(t):
        t[name].view(-1)[3] = bad
    rewrite(d, poison)
    refused(d, capsys, str(d / WEIGHTS), f"'{name}'", "NaN or Inf")


def test_nan_in_bf16_weight(make_model_dir, capsys):
    d = make_model_dir()

    def poison(t):
        t[Q_PROJ] = t[Q_PROJ].to(torch.bfloat16)
        t[Q_PROJ].view(-1)[0] = math.nan
    rewrite(d, poison)
    refused(d, capsys, str(d / WEIGHTS), f"'{Q_PROJ}'", "NaN or Inf")


@pytest.mark.parametrize("value", [2, -2, 127])
def test_prequantized_trits_outside_ternary(make_model_dir, capsys, value):
    d = make_model_dir(prequantize=True)
    assert tensors_of(d)[EXPERT_UP].dtype == torch.int8

    def poison(t):
        t[EXPERT_UP].view(-1)[5] = value
    rewrite(d, poison)
    refused(d, capsys, str(d / WEIGHTS), f"'{EXPERT_UP}'", "1 values outside {-1, 0, 1}", f"e.g. {value}")


def test_prequantized_trits_wrong_dtype(make_model_dir, capsys):
    d = make_model_dir(prequantize=True)
    rewrite(d, lambda t: t.update({EXPERT_UP: t[EXPERT_UP].to(torch.float32)}))
    refused(d, capsys, str(d / WEIGHTS), f"'{EXPERT_UP}'", "has dtype float32, expected int8")


@pytest.mark.parametrize("scale", [0.0, -0.5, math.nan, math.inf])
def test_prequantized_bad_scale(make_model_dir, capsys, scale):
    d = make_model_dir(prequantize=True)
    name = EXPERT_UP + "_scale"
    rewrite(d, lambda t: t.update({name: torch.full_like(t[name], scale)}))
    refused(d, capsys, str(d / WEIGHTS), f"'{name}'", "non-positive or non-finite scales")


def test_prequantized_scale_wrong_size(make_model_dir, capsys):
    d = make_model_dir(prequantize=True, per_channel=True)
    name = EXPERT_UP + "_scale"
    rewrite(d, lambda t: t.update({name: t[name][:10]}))
    refused(d, capsys, str(d / WEIGHTS), f"'{name}'", "shape [10]", "(96 values)")


def test_scale_on_a_full_precision_weight(make_model_dir, capsys):
    d = make_model_dir()
    name = "model.layers.0.mlp.shared_expert.up_proj.weight_scale"
    rewrite(d, lambda t: t.update({name: torch.ones(())}))
    refused(d, capsys, str(d / WEIGHTS), f"unexpected tensor '{name}'")


# -- the files ---------------------------------------------------------------------------------------------------

def test_truncated_safetensors(make_model_dir, capsys):
    d = make_model_dir()
    data = (d / WEIGHTS).read_bytes()
    (d / WEIGHTS).write_bytes(data[: len(data) // 2])
    refused(d, capsys, str(d / WEIGHTS), "not a readable safetensors file")


@pytest.mark.parametrize("how", ["garbage", "bad_json_header", "empty", "huge_header_length"])
def test_corrupt_safetensors_header(make_model_dir, capsys, how):
    d = make_model_dir()
    data = (d / WEIGHTS).read_bytes()
    broken = {
        "garbage": b"\x13\x37garbage, not a header at all\x00\xff" * 8 + data[256:],
        "bad_json_header": data[:8] + b"{not json" + data[17:],
        "empty": b"",
        "huge_header_length": (2**62).to_bytes(8, "little") + data[8:],
    }[how]
    (d / WEIGHTS).write_bytes(broken)
    refused(d, capsys, str(d / WEIGHTS), "not a readable safetensors file")


def test_no_weights_at_all(make_model_dir, capsys):
    d = make_model_dir()
    (d / WEIGHTS).unlink()
    refused(d, capsys, str(d), "no *.safetensors weights found")


def _touch_payload(marker: Path) -> bytes:
    """Pickle bytes whose unpickling creates `marker` (what a malicious checkpoint would do, harmlessly)."""
    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (pathlib.Path(marker),))
    return pickle.dumps(Payload())


@pytest.mark.parametrize("fname", ["pytorch_model.bin", "model.pt", "consolidated.pth"])
def test_pickle_checkpoint_is_refused_unopened(tmp_path, make_model_dir, capsys, fname):
    # The payload is live: unpickling it really creates its marker.
    probe = tmp_path / "probe-marker"
    pickle.loads(_touch_payload(probe))
    assert probe.exists()

    d = make_model_dir()
    (d / WEIGHTS).unlink()
    marker = tmp_path / "pickle-was-opened"
    (d / fname).write_bytes(_touch_payload(marker))
    line = refused(d, capsys, str(d / fname), "pickle checkpoints are refused", ".safetensors")
    assert not marker.exists(), "the loader unpickled the checkpoint"
    assert "runs arbitrary code" in line


def test_index_names_missing_shard(make_model_dir, capsys):
    d = make_model_dir()
    first, second = shard(d)
    (d / second).unlink()
    refused(d, capsys, str(d / "model.safetensors.index.json"), f"shard '{second}' does not exist")


def test_index_not_valid(make_model_dir, capsys):
    d = make_model_dir()
    shard(d)
    (d / "model.safetensors.index.json").write_text('{"weights": {}}')
    refused(d, capsys, str(d / "model.safetensors.index.json"), "not a valid safetensors index")


def test_index_shard_outside_model_dir(make_model_dir, capsys):
    d = make_model_dir()
    first, _ = shard(d)
    index = d / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = f"../{d.name}/{first}"
    index.write_text(json.dumps(data))
    refused(d, capsys, str(index), f"shard '../{d.name}/{first}'", "inside the model directory")


def test_tensor_in_two_shards(make_model_dir, capsys):
    d = make_model_dir()
    first, second = shard(d)
    a = load_file(str(d / first))
    name = sorted(a)[0]
    b = load_file(str(d / second))
    b[name] = a[name]
    save_file(b, str(d / second))
    refused(d, capsys, str(d / second), f"tensor '{name}' is also in {first}")


# -- the Hugging Face Qwen2-MoE layout -------------------------------------------------------------------------

def _qwen_model(**kw):
    return random_model(random_config(shared_expert_gate=True, vision=False, **kw), seed=2)


@pytest.mark.parametrize("name,shape", [("gate_up_proj", (4, 96, 64)), ("down_proj", (4, 96, 64)),
                                        ("down_proj", (3, 64, 96))])
def test_qwen2_moe_fused_expert_wrong_shape(tmp_path, capsys, name, shape):
    d = tmp_path / "qwen"
    write_qwen2_moe(_qwen_model(), d, fused_experts=True)
    key = f"model.layers.1.mlp.experts.{name}"
    rewrite(d, lambda t: t.update({key: torch.zeros(shape)}))
    want = [4, 192, 64] if name == "gate_up_proj" else [4, 64, 96]
    refused(d, capsys, str(d / WEIGHTS), f"'{key}'", f"shape {list(shape)}, expected {want}")


def test_qwen2_moe_fused_and_unfused_experts_together(tmp_path, capsys):
    d = tmp_path / "qwen"
    model = _qwen_model()
    write_qwen2_moe(model, d, fused_experts=True)
    extra = "model.layers.0.mlp.experts.1.down_proj.weight"
    rewrite(d, lambda t: t.update({extra: model.state_dict()[extra].clone()}))
    refused(d, capsys, str(d / WEIGHTS), "'model.layers.0.mlp.experts.down_proj'", f"'{extra}'", "expert 1")


# -- the command line itself -----------------------------------------------------------------------------------

def test_cli_subprocess_bad_dir(tmp_path):
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text("{ not json")
    proc = subprocess.run([sys.executable, "-m", "mote.tools.cli", "--target", "onnx", str(bad)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mote-export: error:") and str(bad / "config.json") in lines[0]
    assert "not valid JSON" in lines[0]
    assert "mote-export: error" not in proc.stdout     # stdout carries progress only; the error is on stderr
    assert not (tmp_path / "out").exists()             # the default output folder (out/<model>-<target>)


def test_usage_error_unknown_target(make_model_dir, capsys):
    d = make_model_dir()
    out = d.parent / "out"
    rc = main(["--target", "no-such-runtime", str(d), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("mote-export: error:")
    assert "no-such-runtime" in err and "invalid choice" in err
    assert not out.exists()


def test_usage_error_missing_model_dir(capsys):
    rc = main(["--target", "onnx"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith("mote-export: error:") and "MODEL_DIR" in err


@pytest.mark.parametrize("argv, expected", [
    (["--target", "onnx", "--smoke-test", "arm64", "--no-verify"], "drop --no-verify"),
    (["--target", "ios", "--smoke-test", "arm64"], "--target ios has no runtime for arm64 devices"),
    (["--target", "onnx", "--smoke-test", "phone"], "invalid choice: 'phone'"),
])
def test_smoke_test_usage_errors(make_model_dir, capsys, argv, expected):
    d = make_model_dir()
    out = d.parent / "out"
    rc = main([*argv, str(d), "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("mote-export: error:") and expected in err
    assert not out.exists()


def test_smoke_test_device_not_built(make_model_dir, capsys, monkeypatch, tmp_path):
    """The emulated device is checked before any work: one line naming what is missing and how to build it."""
    from mote.tools import arm64_device

    monkeypatch.setattr(arm64_device, "ROOT", tmp_path / "no-device")
    monkeypatch.setattr(arm64_device, "_which", lambda program: f"/usr/bin/{program}")   # qemu "installed"
    d = make_model_dir()
    out = d.parent / "out"
    rc = main(["--target", "onnx", str(d), "-o", str(out), "--smoke-test", "arm64"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "the emulated device is not ready" in err and str(tmp_path / "no-device") in err
    assert "python -m mote.tools.arm64_device" in err
    assert not out.exists()


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "--target" in capsys.readouterr().out


def test_existing_output_survives_bad_input(make_model_dir, capsys):
    d = make_model_dir()
    (d / "config.json").unlink()
    out = d.parent / "previous-export"
    out.mkdir()
    (out / "report.json").write_text("{}")
    rc = main(["--target", "onnx", str(d), "-o", str(out)])
    assert rc == 2 and "Traceback" not in capsys.readouterr().err
    assert (out / "report.json").read_text() == "{}"


# -- layouts that must load ------------------------------------------------------------------------------------

def test_sharded_model_equals_unsharded(make_model_dir):
    d = make_model_dir("one")
    ref = logits_of(load_model(d))
    s = make_model_dir("two")
    shard(s)
    assert not (s / WEIGHTS).exists()
    got = logits_of(load_model(s))
    assert torch.equal(got, ref)


def test_sharded_prequantized_model_loads(make_model_dir):
    d = make_model_dir("one", prequantize=True)
    ref = logits_of(load_model(d))
    s = make_model_dir("two", prequantize=True)
    shard(s, n_first=7)
    assert torch.equal(logits_of(load_model(s)), ref)


def test_prequantized_equals_latent(make_model_dir):
    latent = logits_of(load_model(make_model_dir("latent")))
    pre = logits_of(load_model(make_model_dir("pre", prequantize=True)))
    torch.testing.assert_close(pre, latent, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("moe_layers", ["all", [1]], ids=["all-moe", "dense-and-moe"])
def test_qwen2_moe_layout_loads_to_same_outputs(tmp_path, fused, moe_layers):
    model = _qwen_model(moe_layers=moe_layers, top_k=2, norm_topk_prob=True)
    d = tmp_path / "qwen"
    write_qwen2_moe(model, d, fused_experts=fused)
    loaded = load_model(d)
    assert loaded.config.source_format == "qwen2_moe"
    assert loaded.config.moe.moe_layers == model.config.moe.moe_layers
    assert torch.equal(logits_of(loaded), logits_of(model))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_load(make_model_dir, dtype):
    model = random_model(random_config(), seed=0)
    d = make_model_dir("m")                                    # the same model (same seed), written in fp32
    rewrite(d, lambda t: t.update({k: v.to(dtype) for k, v in t.items() if v.is_floating_point()}))
    assert all(v.dtype == dtype for v in tensors_of(d).values())
    loaded = load_model(d)
    assert all(p.dtype == torch.float32 for p in loaded.state_dict().values() if p.is_floating_point())
    with torch.no_grad():                                       # the reference: the same weights rounded to `dtype`
        for p in model.parameters():
            p.copy_(p.to(dtype).to(torch.float32))
    assert torch.equal(logits_of(loaded), logits_of(model))


def test_huge_finite_weights_are_not_taken_for_inf(make_model_dir):
    # The NaN/Inf check sums the tensor first; a sum that overflows must fall back to an element-wise look.
    d = make_model_dir()

    def huge(t):
        t[Q_PROJ].view(-1)[:4] = 3e38
    rewrite(d, huge)
    loaded = load_model(d)
    assert loaded.state_dict()[Q_PROJ].view(-1)[:4].tolist() == [pytest.approx(3e38)] * 4
