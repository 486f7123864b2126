"""Write tiny MoTE checkpoints exactly as transformers writes them (`save_pretrained`), for tests and demos.

    python -m mote.tools.make_hf_model OUT_DIR --layout {qwen2_moe,llava_clip,llava_siglip} [--experts pm_s]

A MoTE in the Hugging Face layouts is a Qwen2-MoE (alone, or as a LLaVA's language model with a CLIP or SigLIP
tower) whose routed experts are ternary. Written by transformers 5.x itself: null bos/eos/pad ids,
`rope_parameters`, `dtype`, `layer_types`. Routed experts are set to +-s per matrix (`pm_s`: absmean
ternarisation is lossless, so transformers' float forward and our ternary one differ only by activation
quantization) or zero (`zero`). With `--tokenizer`, a small byte-level BPE `tokenizer.json` (trained on a fixed
text, so deterministic), its `tokenizer_config.json` with a chat template, `generation_config.json`, and for LLaVA the tower's
`preprocessor_config.json`.

transformers is a test dependency, imported here only.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

LAYOUTS = ("qwen2_moe", "llava_clip", "llava_siglip")
VOCAB = 320
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRAINING_TEXT = ("The quick brown fox jumps over the lazy dog. Describe the image: a red circle in the upper left "
                 "corner, a blue square in the middle, one yellow triangle in the lower right corner. ") * 20


def text_config(**overrides):
    import transformers

    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, moe_intermediate_size=64, shared_expert_intermediate_size=80, num_experts=4,
              num_experts_per_tok=1, max_position_embeddings=128,
              rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    kw.update(overrides)
    return transformers.Qwen2MoeConfig(**kw)


def build(layout: str, image_token_id: int = VOCAB - 1, feature_layer=-2, strategy: str | None = None,
          seed: int = 0, **text_overrides):
    """A transformers model of the layout, random weights (seeded); returns (model, number of image tokens)."""
    import transformers

    torch.manual_seed(seed)
    tc = text_config(**text_overrides)
    if layout == "qwen2_moe":
        return transformers.Qwen2MoeForCausalLM(tc).eval(), 0
    tower = layout.removeprefix("llava_")
    strategy = strategy or ("default" if tower == "clip" else "full")
    vision_kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                     patch_size=8)
    vc = (transformers.CLIPVisionConfig if tower == "clip" else transformers.SiglipVisionConfig)(**vision_kw)
    n_img = 16 + (1 if tower == "clip" else 0) - (1 if strategy == "default" else 0)
    cfg = transformers.LlavaConfig(vision_config=vc, text_config=tc, image_token_index=image_token_id,
                                   image_seq_length=n_img, vision_feature_layer=feature_layer,
                                   vision_feature_select_strategy=strategy)
    return transformers.LlavaForConditionalGeneration(cfg).eval(), n_img


def set_experts(model, mode: str, seed: int = 0) -> None:
    """Routed experts (transformers 5.x holds them fused: gate_up_proj [E, 2I, d], down_proj [E, d, I]) set to
    `zero` or +-s per expert matrix (`pm_s`); the router gets larger weights so that routing is decisive."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp.experts." in name:
                for e in range(p.shape[0]):
                    s = 0.0 if mode == "zero" else 0.01 + 0.002 * e      # small next to the shared expert, as in a real MoTE
                    p[e] = s * torch.where(torch.rand(p[e].shape, generator=gen) < 0.5, -1.0, 1.0)
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5, generator=gen)


def write_tokenizer(out_dir: Path) -> dict[str, int]:
    """A byte-level BPE tokenizer.json of VOCAB tokens with our special tokens, as transformers saves it."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TRAINING_TEXT], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>", extra_special_tokens={"image_token": "<image>"})
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


def write_hf_model(out_dir: Path, layout: str = "qwen2_moe", experts: str = "pm_s", tokenizer: bool = False,
                   **build_kw) -> Path:
    import transformers

    out_dir = Path(out_dir)
    ids = write_tokenizer(out_dir) if tokenizer else {}
    if ids:
        build_kw.setdefault("image_token_id", ids["<image>"])
    model, _ = build(layout, **build_kw)
    set_experts(model, experts)
    model.save_pretrained(out_dir)
    if ids:   # generate() stops at <|im_end|>, as a chat model's generation_config says
        transformers.GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]).save_pretrained(out_dir)
        if layout != "qwen2_moe":
            image_processor(layout).save_pretrained(out_dir)
    return out_dir


def image_processor(layout: str):
    """The tower's own preprocessing at our tiny image size (CLIP: shortest-edge resize + center crop, OpenAI
    mean/std; SigLIP: resize to a square, mean/std 0.5), as preprocessor_config.json records it."""
    import transformers

    if layout == "llava_clip":
        return transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--layout", choices=LAYOUTS, default="llava_clip")
    ap.add_argument("--experts", choices=("pm_s", "zero"), default="pm_s")
    ap.add_argument("--tokenizer", action="store_true")
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    write_hf_model(a.out_dir, a.layout, a.experts, a.tokenizer, seed=a.seed, num_experts_per_tok=a.top_k)
    print(f"wrote {a.out_dir} ({a.layout})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
