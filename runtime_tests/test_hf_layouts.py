"""Hugging Face directories as transformers 5.x writes them export and verify on every target, and `mote-run`
generates through the artifacts with the directory's own tokenizer exactly what transformers generates.

The directories (tools/make_hf_model.py) come from `save_pretrained`: null bos/eos/pad ids, `rope_parameters`
(theta 50000, not the 10000 a reader that ignores it would use), `dtype`, `layer_types`, per-expert tensors, a BPE
tokenizer with a chat template, a generation config, and for LLaVA the tower's preprocessor config.
"""
from __future__ import annotations

import io
import json
import contextlib

import pytest
import torch

from mote.export import semantics
from mote.export.loader import load_model
from mote.export.verify import sqnr_db
from mote.targets import REGISTRY, get_target
from mote.tools import cli, run
from mote.tools.make_hf_model import write_hf_model

transformers = pytest.importorskip("transformers")

LAYOUTS = {   # layout -> routing (top-2 with renormalisation on one of them)
    "qwen2_moe": dict(num_experts_per_tok=1),
    "llava_clip": dict(num_experts_per_tok=1),
    "llava_siglip": dict(num_experts_per_tok=2, norm_topk_prob=True),
}


@pytest.fixture(scope="module")
def ternary_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: write_hf_model(root / name, name, experts="pm_s", tokenizer=True, **kw) for name, kw in LAYOUTS.items()}


def _image(path):
    from PIL import Image

    gen = torch.Generator().manual_seed(3)
    pixels = (torch.rand(40, 48, 3, generator=gen) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_reference_is_transformers_on_these_directories(ternary_dirs, monkeypatch, layout):
    """What the targets are verified against is transformers' own forward (up to the ternary experts' int8
    activations, switched off here), so a verified artifact computes what transformers computes."""
    d = ternary_dirs[layout]
    cls = transformers.Qwen2MoeForCausalLM if layout == "qwen2_moe" else transformers.LlavaForConditionalGeneration
    ref = cls.from_pretrained(d, attn_implementation="eager").eval()
    ours = load_model(d)
    assert ours.config.bos_token_id is None and ours.config.rope.theta == 50000.0
    monkeypatch.setattr(semantics, "quantize_activations", lambda v: (v, torch.ones_like(v[..., :1])))
    ids = torch.tensor([[5, 60, 7, 200, 31, 9, 120, 44]])
    with torch.no_grad():
        assert sqnr_db(ref(input_ids=ids).logits, ours.forward_full(ours.embed(ids))) >= 80.0


@pytest.mark.parametrize("target", sorted(REGISTRY))   # every registered target, as in test_targets.py
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_hf_directory_exports_and_verifies(ternary_dirs, tmp_path, layout, target):
    d = ternary_dirs[layout]
    out = tmp_path / "out"
    assert cli.main(["--target", target, str(d), "-o", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["verify"] == "passed"
    programs = {"token_embedding", "text_decoder"} | ({"vision_encoder"} if layout != "qwen2_moe" else set())
    assert set(report["numerics"]) == programs
    for name in programs:
        assert report["numerics"][name]["sqnr_db"] >= get_target(target).tolerance.min_sqnr_db, name
    m, n = report["numerics"]["text_decoder"]["greedy_match"].split("/")
    assert m == n and int(n) > 1
    # The directory's own files travel with the artifacts, verbatim.
    for name in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (out / name).read_bytes() == (d / name).read_bytes(), name


# -- mote-run against transformers' generate() --------------------------------------------------------------------

def _transformers_generate(d, layout, prompt, image, max_new_tokens):
    tok = transformers.AutoTokenizer.from_pretrained(d)
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": prompt}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    if layout == "qwen2_moe":
        model = transformers.Qwen2MoeForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        extra = {}
    else:   # what LlavaProcessor does: the image token repeated once per image feature
        model = transformers.LlavaForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval()
        n_img = model.config.image_seq_length
        text = text.replace("<image>", "<image>" * n_img)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        processor = transformers.AutoImageProcessor.from_pretrained(d)
        from PIL import Image
        extra = {"pixel_values": processor(Image.open(image), return_tensors="pt")["pixel_values"]}
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, **extra)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("layout,target", [("qwen2_moe", "android"), ("llava_clip", "onnx"), ("qwen2_moe", "ios")])
def test_mote_run_generates_what_transformers_generates(tmp_path, layout, target):
    # Routed experts zero: our reference then equals transformers to float rounding, so greedy decoding through
    # the artifact must give transformers' own tokens, decoded by the directory's tokenizer.
    d = write_hf_model(tmp_path / layout, layout, experts="zero", tokenizer=True)
    out = tmp_path / "out"
    assert cli.main(["--target", target, str(d), "-o", str(out), "--quiet"]) == 0
    image = _image(tmp_path / "image.png") if layout != "qwen2_moe" else None
    prompt = "Describe the image:"
    want = _transformers_generate(d, layout, prompt, image, max_new_tokens=12)
    args = [str(out), "--prompt", prompt, "--max-new-tokens", "12"] + (["--image", str(image)] if image else [])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert run.main(args) == 0
    assert buf.getvalue().rstrip("\n") == want
    assert want.strip()
