"""Make random MoTE model directories of any size, deterministically (for tests and scale benchmarks).

    python -m mote.tools.make_random_model OUT_DIR [--hidden 64 --layers 2 --experts 4 --top-k 1 ...]

The same arguments and seed give byte-identical files. `--layout qwen2_moe` writes a Hugging Face Qwen2-MoE
config (and `--fused-experts` the transformers 5.x fused 3-D expert tensors) instead of the native MoTE format.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from mote.export.config import parse_config
from mote.export.io_utils import BYTE_VOCAB, IMAGE
from mote.export.loader import save_model
from mote.export.model import MoteForConditionalGeneration


def random_config(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=BYTE_VOCAB, experts=4, top_k=1,
                  expert_intermediate=96, moe_layers="all", per_channel=False, norm_topk_prob=False,
                  shared_expert_gate=False, vision=True, image_size=16, patch_size=8, max_positions=128) -> dict:
    cfg = {
        "model_type": "mote", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": max_positions,
        "tie_word_embeddings": True, "bos_token_id": 256 % vocab, "eos_token_id": 257 % vocab,
        "moe": {"num_experts": experts, "top_k": top_k, "norm_topk_prob": norm_topk_prob,
                "expert_intermediate_size": expert_intermediate, "moe_layers": moe_layers,
                "weight_scale": "per_channel" if per_channel else "per_tensor", "activation_bits": 8,
                "shared_expert_gate": shared_expert_gate},
    }
    if vision:
        cfg["image_token_id"] = IMAGE % vocab
        cfg["vision"] = {"image_size": image_size, "patch_size": patch_size, "num_channels": 3, "hidden_size": 32,
                         "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "layer_norm_eps": 1e-5}
    return cfg


def random_model(cfg_dict: dict, seed: int = 0) -> MoteForConditionalGeneration:
    """Random weights with realistic scales: linear weights ~ N(0, 1/fan_in), norms near 1."""
    gen = torch.Generator().manual_seed(seed)
    model = MoteForConditionalGeneration(parse_config(cfg_dict))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        model.model.embed_tokens.weight.mul_(cfg_dict["hidden_size"] ** 0.5)
    return model.eval()


def write_qwen2_moe(model: MoteForConditionalGeneration, out_dir: Path, fused_experts: bool) -> None:
    """The Hugging Face Qwen2-MoE layout of the same weights (its shared-expert gate is always present)."""
    cfg = model.config
    assert cfg.moe.shared_expert_gate and cfg.vision is None and not cfg.moe.per_channel_scale
    out_dir.mkdir(parents=True, exist_ok=True)
    hf = {
        "model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "num_experts": cfg.moe.num_experts, "num_experts_per_tok": cfg.moe.top_k,
        "norm_topk_prob": cfg.moe.norm_topk_prob, "moe_intermediate_size": cfg.moe.expert_intermediate_size,
        "shared_expert_intermediate_size": cfg.intermediate_size, "intermediate_size": cfg.intermediate_size,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)],
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "hidden_act": "silu",
    }
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if fused_experts:
        for i in cfg.moe.moe_layers:
            prefix = f"model.layers.{i}.mlp.experts"
            names = lambda proj: [f"{prefix}.{e}.{proj}.weight" for e in range(cfg.moe.num_experts)]  # noqa: E731
            gate_up = [torch.cat([tensors.pop(g), tensors.pop(u)]) for g, u in zip(names("gate_proj"), names("up_proj"))]
            tensors[f"{prefix}.gate_up_proj"] = torch.stack(gate_up).contiguous()
            tensors[f"{prefix}.down_proj"] = torch.stack([tensors.pop(n) for n in names("down_proj")]).contiguous()
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    save_file(dict(sorted(tensors.items())), str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=BYTE_VOCAB)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--expert-intermediate", type=int, default=96)
    ap.add_argument("--per-channel", action="store_true")
    ap.add_argument("--norm-topk-prob", action="store_true")
    ap.add_argument("--shared-expert-gate", action="store_true")
    ap.add_argument("--no-vision", action="store_true")
    ap.add_argument("--prequantized", action="store_true", help="store experts as int8 trits + weight_scale")
    ap.add_argument("--layout", choices=("mote", "qwen2_moe"), default="mote")
    ap.add_argument("--fused-experts", action="store_true", help="qwen2_moe layout: transformers 5.x fused experts")
    ap.add_argument("--max-positions", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    qwen = a.layout == "qwen2_moe"
    cfg = random_config(a.hidden, a.layers, a.heads, a.kv_heads, a.intermediate, a.vocab, a.experts, a.top_k,
                        a.expert_intermediate, "all", a.per_channel, a.norm_topk_prob,
                        a.shared_expert_gate or qwen, not (a.no_vision or qwen), max_positions=a.max_positions)
    model = random_model(cfg, a.seed)
    if qwen:
        write_qwen2_moe(model, a.out_dir, a.fused_experts)
    else:
        save_model(model, a.out_dir, prequantize=a.prequantized)
    print(f"wrote {a.out_dir} ({model.config.parameter_count() / 1e6:.2f} M parameters)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
