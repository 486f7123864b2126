"""The three deployable programs of DESIGN.md section 3, and their `torch.export` trace (one entry point for all targets).

    vision_encoder(pixel_values [1,3,H,W])        -> image_embeds [1, N_img, d]
    token_embedding(tokens [1,T])                  -> embeds [1,T,d]
    text_decoder(embeds [1,T,d], input_pos [1])   -> logits [1,T,vocab]      T dynamic in [1, max_seq_len]

The decoder's static KV cache is runtime state in one of two forms, chosen by the target:
- `KVCacheStyle.STATE`: module buffers updated in place (ExecuTorch mutable buffers, Core ML states);
- `KVCacheStyle.IO`: explicit inputs `k_cache_i, v_cache_i [1, n_kv, S, hd]` and updated copies as extra outputs
  (ONNX past/present, TVM arguments).
"""
from __future__ import annotations

import enum

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from .model import MoteForConditionalGeneration

PROGRAMS = ("vision_encoder", "token_embedding", "text_decoder")
DEFAULT_MAX_SEQ_LEN = 128   # mote-export's KV-cache length without --max-seq-len (capped at the max positions)


class KVCacheStyle(enum.Enum):
    STATE = "state"
    IO = "io"


class VisionEncoder(nn.Module):
    def __init__(self, model: MoteForConditionalGeneration):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.encode_image(pixel_values)


class TokenEmbedding(nn.Module):
    def __init__(self, model: MoteForConditionalGeneration):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model.embed(tokens)


class StatefulTextDecoder(nn.Module):
    """KV cache in buffers `k_cache_i` / `v_cache_i`, written in place at `input_pos + arange(T)`."""

    def __init__(self, model: MoteForConditionalGeneration, max_seq_len: int):
        super().__init__()
        self.model = model
        k, v = model.new_cache(max_seq_len)
        self.n_layers = len(k)
        for i, (kc, vc) in enumerate(zip(k, v)):
            self.register_buffer(f"k_cache_{i}", kc)
            self.register_buffer(f"v_cache_{i}", vc)

    def caches(self):
        return ([getattr(self, f"k_cache_{i}") for i in range(self.n_layers)],
                [getattr(self, f"v_cache_{i}") for i in range(self.n_layers)])

    def forward(self, embeds, input_pos):
        k, v = self.caches()
        logits, _, _ = self.model.decode(embeds, input_pos, k, v, in_place=True)
        return logits


class FunctionalTextDecoder(nn.Module):
    """Caches in, updated caches out: (logits, k_cache_0', ..., v_cache_0', ...)."""

    def __init__(self, model: MoteForConditionalGeneration):
        super().__init__()
        self.model = model

    def forward(self, embeds, input_pos, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]):
        logits, k, v = self.model.decode(embeds, input_pos, k_caches, v_caches, in_place=False)
        return (logits, *k, *v)


def program_modules(model: MoteForConditionalGeneration, max_seq_len: int, kv: KVCacheStyle) -> dict[str, nn.Module]:
    mods: dict[str, nn.Module] = {}
    if model.vision_tower is not None:
        mods["vision_encoder"] = VisionEncoder(model)
    mods["token_embedding"] = TokenEmbedding(model)
    mods["text_decoder"] = StatefulTextDecoder(model, max_seq_len) if kv is KVCacheStyle.STATE else FunctionalTextDecoder(model)
    return mods


def sample_inputs(model: MoteForConditionalGeneration, max_seq_len: int, kv: KVCacheStyle, seq_len: int = 3):
    """Example inputs per program (also the inputs `torch.export` traces with)."""
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    inputs = {}
    if model.vision_tower is not None:
        vc = cfg.vision
        inputs["vision_encoder"] = (torch.rand(1, vc.num_channels, vc.image_size, vc.image_size, generator=gen) * 2 - 1,)
    inputs["token_embedding"] = (torch.randint(0, cfg.vocab_size, (1, seq_len), generator=gen),)
    embeds = torch.randn(1, seq_len, cfg.hidden_size, generator=gen)
    pos = torch.tensor([0], dtype=torch.long)
    if kv is KVCacheStyle.STATE:
        inputs["text_decoder"] = (embeds, pos)
    else:
        k, v = model.new_cache(max_seq_len)
        inputs["text_decoder"] = (embeds, pos, k, v)
    return inputs


def export_programs(model: MoteForConditionalGeneration, max_seq_len: int, kv: KVCacheStyle) -> dict[str, ExportedProgram]:
    """torch.export each program with a dynamic sequence length (T in [1, max_seq_len])."""
    if not 2 <= max_seq_len <= model.config.max_position_embeddings:
        from .errors import InputError
        raise InputError(f"--max-seq-len {max_seq_len} must be in [2, max_position_embeddings="
                         f"{model.config.max_position_embeddings}]")
    model.eval()
    mods = program_modules(model, max_seq_len, kv)
    inputs = sample_inputs(model, max_seq_len, kv)
    seq = Dim("seq_len", min=1, max=max_seq_len)
    shapes = {
        "vision_encoder": None,
        "token_embedding": ({1: seq},),
        "text_decoder": ({1: seq}, None) if kv is KVCacheStyle.STATE
        else ({1: seq}, None, [None] * model.config.num_hidden_layers, [None] * model.config.num_hidden_layers),
    }
    out = {}
    with torch.no_grad():
        for name, mod in mods.items():
            out[name] = torch.export.export(mod, inputs[name], dynamic_shapes=shapes[name], strict=False)
    return out
