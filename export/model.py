"""The PyTorch eager reference of a MoTE LMM (DESIGN.md section 1).

Vision tower (pre-LN ViT) + 2-layer GELU projector + Qwen2-style decoder (RMSNorm, RoPE, grouped-query attention
with q/k/v biases, SwiGLU) whose configured layers are MoTE blocks: a full-precision shared expert (optionally
sigmoid-gated), a softmax router with top-k, and ternary routed experts with per-token int8 activations.

Parameter names follow the Hugging Face Qwen2-MoE layout (`model.layers.N.mlp.shared_expert.gate_proj.weight`,
`model.layers.N.mlp.experts.E.up_proj.weight`, `model.layers.N.mlp.gate.weight`, ...), so both input formats load
into the same module tree.

The KV cache is static (`max_seq_len` slots per layer). The decoder core is written once and used two ways:
functionally (caches in, updated caches out: ONNX past/present, TVM arguments) or in place on module buffers
(ExecuTorch mutable buffers, Core ML states); see `export.programs`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import mote.passes.ops  # noqa: F401  (registers mote::unpack_trits, which packed experts run)

from . import semantics
from .config import HFVisionConfig, MoteConfig, VisionConfig
from .rope import rope_frequencies

# Activations by their transformers (ACT2FN) names, as transformers computes them.
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * self.weight


class TernaryLinear(nn.Module):
    """A routed-expert projection: bitlinear with a ternary weight, in one of three forms.

    - latent: a float `weight` (QAT weights, ternarised by absmean in forward; straight-through estimators in
      training mode, so it can be trained);
    - pre-quantized: an int8 `weight` of trits plus `weight_scale` ([] per tensor or [out, 1] per output channel);
    - packed (what the loader builds, see `set_packed`): `packed_trits` (uint8 [out, ceil(in/4)], the canonical
      2-bit codes of `export.trits`) plus `trit_scale` ([1] or [out]). Forward decodes them with
      `mote::unpack_trits`, the op the pass pipeline starts from, so no float copy of the expert is ever held.
    """

    def __init__(self, in_features: int, out_features: int, per_channel: bool):
        super().__init__()
        self.in_features, self.out_features, self.per_channel = in_features, out_features, per_channel
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_scale = None
        self.packed = False

    @property
    def prequantized(self) -> bool:
        return self.weight_scale is not None or self.packed

    def set_prequantized(self, trits: torch.Tensor, scale: torch.Tensor) -> None:
        del self.weight, self.weight_scale
        self.register_buffer("weight", trits.to(torch.int8))
        self.register_buffer("weight_scale", scale.to(torch.float32))

    def set_packed(self, packed: torch.Tensor, scale: torch.Tensor) -> None:
        """Switch to the packed form: `packed` uint8 [out, ceil(in/4)], `scale` [1] (per tensor) or [out]."""
        del self.weight, self.weight_scale
        self.weight, self.weight_scale, self.packed = None, None, True
        self.register_buffer("packed_trits", packed)
        self.register_buffer("trit_scale", scale.to(torch.float32).reshape(-1))

    def ternary_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(trits as float [out, in], scale [] or [out, 1])."""
        if self.packed:
            trits = torch.ops.mote.unpack_trits(self.packed_trits, self.in_features)
            return trits, (self.trit_scale.view(-1, 1) if self.per_channel else self.trit_scale.view(()))
        if self.weight_scale is not None:
            return self.weight.to(torch.float32), self.weight_scale
        return semantics.ternarize(self.weight, self.per_channel)

    def forward(self, x):
        if self.training and not self.prequantized:
            return self._forward_qat(x)
        trits, scale = self.ternary_weight()
        return semantics.bitlinear(x, trits, scale)

    def _forward_qat(self, x):
        # Same values as bitlinear (up to float rounding), gradients passed straight through both quantizers.
        q, s_v = semantics.quantize_activations(x)
        x_q = x + (q * s_v - x).detach()
        trits, scale = semantics.ternarize(self.weight, self.per_channel)
        w_q = self.weight + (trits * scale - self.weight).detach()
        return F.linear(x_q, w_q)


class QuantizedLinear(nn.Module):
    """A full-precision linear after post-training quantization (`--quantize`, `export.quantization`): `qweight`
    (int8 [out, in], int4 values in int8 storage), `qscale` (float32 [out, in / group_size]), an optional fp32 bias.

    `weight` is the dequantized matrix through `mote::dequantize_weight`, so code that reads a linear's weight (the
    shared expert's SwiGLU, a tied head) computes with the quantized values, and the traced graph shows
    `linear(x, mote.dequantize_weight(q, s))` for the pass `fuse_quantized_linear` to fuse.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("qscale", torch.empty(out_features, in_features // group_size))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        return torch.ops.mote.dequantize_weight(self.qweight, self.qscale, self.bits, self.group_size)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class QuantizedEmbedding(QuantizedLinear):
    """A quantized token embedding [vocab, d], groups along d; a lookup is a gather of quantized rows (traced as
    `embedding(mote.dequantize_weight(q, s), tokens)`, fused into `mote.quantized_embedding`)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int):
        super().__init__(embedding_dim, num_embeddings, False, bits, group_size)

    def forward(self, tokens):
        return F.embedding(tokens, self.weight)


class TernaryExpert(nn.Module):
    def __init__(self, d: int, inter: int, per_channel: bool):
        super().__init__()
        self.gate_proj = TernaryLinear(d, inter, per_channel)
        self.up_proj = TernaryLinear(d, inter, per_channel)
        self.down_proj = TernaryLinear(inter, d, per_channel)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SwiGLU(nn.Module):
    def __init__(self, d: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, inter, bias=False)
        self.up_proj = nn.Linear(d, inter, bias=False)
        self.down_proj = nn.Linear(inter, d, bias=False)

    def forward(self, x):
        return semantics.swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


class MoteBlock(nn.Module):
    """y = [sigmoid(w_g . x)] * shared(x) + sum_{i in top-k} g_i * expert_i(x)."""

    def __init__(self, cfg: MoteConfig):
        super().__init__()
        m = cfg.moe
        self.top_k, self.norm_topk_prob = m.top_k, m.norm_topk_prob
        self.shared_expert = SwiGLU(cfg.hidden_size, cfg.shared_intermediate_size)
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if m.shared_expert_gate else None
        self.gate = nn.Linear(cfg.hidden_size, m.num_experts, bias=False)
        self.experts = nn.ModuleList(
            TernaryExpert(cfg.hidden_size, m.expert_intermediate_size, m.per_channel_scale) for _ in range(m.num_experts)
        )
        self.last_router_logits = None  # kept in training mode for the load-balancing loss

    def forward(self, x):
        logits = self.gate(x)
        if self.training:
            self.last_router_logits = logits
        s = self.shared_expert
        # Eager evaluation skips experts no token selected: they would add exact zeros (see semantics.moe_combine),
        # and decoding every expert of every layer per step dominates the reference's run time at real sizes.
        # Traced programs keep every expert, branch-free, for the passes to fuse.
        return semantics.moe_ffn(
            x, (s.gate_proj.weight, s.up_proj.weight, s.down_proj.weight),
            None if self.shared_expert_gate is None else self.shared_expert_gate.weight,
            logits, self.top_k, self.norm_topk_prob, lambda e: self.experts[e](x), skip_unselected=not _tracing())


def _tracing() -> bool:
    return torch.compiler.is_exporting() or torch.compiler.is_compiling() or torch.jit.is_tracing()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: MoteConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(self, x, cos, sin, mask, k_cache, v_cache, positions, in_place: bool):
        """x [1,T,d]; caches [1, n_kv, S, hd]. Returns (out, k_cache', v_cache')."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if in_place:
            k_cache.index_copy_(2, positions, k)
            v_cache.index_copy_(2, positions, v)
        else:
            k_cache = k_cache.index_copy(2, positions, k)
            v_cache = v_cache.index_copy(2, positions, v)
        rep = self.n_heads // self.n_kv
        s = k_cache.shape[2]
        k_all = k_cache[:, :, None].expand(b, self.n_kv, rep, s, self.head_dim).reshape(b, self.n_heads, s, self.head_dim)
        v_all = v_cache[:, :, None].expand(b, self.n_kv, rep, s, self.head_dim).reshape(b, self.n_heads, s, self.head_dim)
        scores = torch.matmul(q, k_all.transpose(2, 3)) * (1.0 / math.sqrt(self.head_dim)) + mask
        out = torch.matmul(torch.softmax(scores, dim=-1), v_all)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(out), k_cache, v_cache


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MoteConfig, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoteBlock(cfg) if moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask, k_cache, v_cache, positions, in_place):
        h, k_cache, v_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, k_cache, v_cache, positions, in_place)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), k_cache, v_cache


class TextModel(nn.Module):
    def __init__(self, cfg: MoteConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class VisionAttention(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim = vc.num_heads, vc.hidden_size // vc.num_heads
        self.qkv = nn.Linear(vc.hidden_size, 3 * vc.hidden_size)
        self.proj = nn.Linear(vc.hidden_size, vc.hidden_size)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * (1.0 / math.sqrt(self.head_dim)), dim=-1)
        return self.proj(torch.matmul(attn, v).transpose(1, 2).reshape(b, n, d))


class VisionBlock(nn.Module):
    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.attn = VisionAttention(vc)
        self.norm2 = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.fc1 = nn.Linear(vc.hidden_size, vc.intermediate_size)
        self.fc2 = nn.Linear(vc.intermediate_size, vc.hidden_size)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class VisionTower(nn.Module):
    """Pre-LN ViT over non-overlapping patches (patchify = reshape, then a linear patch embedding)."""

    def __init__(self, vc: VisionConfig):
        super().__init__()
        self.cfg = vc
        self.patch_embed = nn.Linear(vc.num_channels * vc.patch_size**2, vc.hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(vc.num_patches, vc.hidden_size))
        self.layers = nn.ModuleList(VisionBlock(vc) for _ in range(vc.num_layers))
        self.post_norm = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)

    def forward(self, pixel_values):
        vc = self.cfg
        p = vc.patch_size
        # The linear patch embedding applied as a stride-p convolution (its [D, C*p*p] weight viewed as [D, C, p, p]):
        # the same numbers as patchify-then-linear, without a 6-D permute, which XNNPACK mis-lowers.
        w = self.patch_embed.weight.view(-1, vc.num_channels, p, p)
        x = torch.nn.functional.conv2d(pixel_values, w, self.patch_embed.bias, stride=p)
        x = x.flatten(2).transpose(1, 2) + self.pos_embed
        for layer in self.layers:
            x = layer(x)
        return self.post_norm(x)


class Projector(nn.Module):
    """LLaVA's multi_modal_projector: linear, activation, linear."""

    def __init__(self, vision_dim: int, text_dim: int, act: str = "gelu_pytorch_tanh", bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)
        self.act = ACTIVATIONS[act]
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class HFVisionEmbeddings(nn.Module):
    """CLIP / SigLIP patch embeddings: a stride-p convolution (SigLIP's with a bias), CLIP's class token, learned
    positions."""

    def __init__(self, vc: HFVisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(vc.num_channels, vc.hidden_size, vc.patch_size, stride=vc.patch_size,
                                         bias=vc.kind == "siglip")
        self.class_embedding = nn.Parameter(torch.empty(vc.hidden_size)) if vc.has_class_token else None
        self.position_embedding = nn.Embedding(vc.num_positions, vc.hidden_size)

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        return x + self.position_embedding.weight[None]


class HFVisionAttention(nn.Module):
    def __init__(self, vc: HFVisionConfig):
        super().__init__()
        d = vc.hidden_size
        self.n_heads, self.head_dim = vc.num_heads, d // vc.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        attn = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * self.head_dim**-0.5, dim=-1)
        return self.out_proj(torch.matmul(attn, v).transpose(1, 2).reshape(b, n, d))


class HFVisionMLP(nn.Module):
    def __init__(self, vc: HFVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(vc.hidden_size, vc.intermediate_size)
        self.act = ACTIVATIONS[vc.hidden_act]
        self.fc2 = nn.Linear(vc.intermediate_size, vc.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class HFVisionLayer(nn.Module):
    def __init__(self, vc: HFVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.self_attn = HFVisionAttention(vc)
        self.layer_norm2 = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.mlp = HFVisionMLP(vc)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class HFVisionTower(nn.Module):
    """A LLaVA vision tower (transformers' CLIPVisionModel / SiglipVisionModel, module names included) reduced to
    what LLaVA reads: the hidden states `vc.feature_layers` (0 = the embeddings after CLIP's pre-layernorm, i = the
    output of encoder layer i), position 0 dropped by the "default" select strategy, several layers concatenated.
    Encoder layers after the last selected one, the post-layernorm and SigLIP's pooling head never influence
    LLaVA's output and are not built (the loader accepts and drops their tensors)."""

    def __init__(self, vc: HFVisionConfig):
        super().__init__()
        self.cfg = vc
        self.embeddings = HFVisionEmbeddings(vc)
        self.pre_layrnorm = nn.LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps) if vc.kind == "clip" else None
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(HFVisionLayer(vc) for _ in range(vc.layers_used))

    def forward(self, pixel_values):
        x = self.embeddings(pixel_values)
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        features = [states[i] for i in self.cfg.feature_layers]
        if self.cfg.drop_first_token:
            features = [f[:, 1:] for f in features]
        return features[0] if len(features) == 1 else torch.cat(features, dim=-1)

    def unused_tensor_names(self, names, prefix: str) -> list[str]:
        """Checkpoint tensors of the tower that LLaVA's output does not depend on (see the class docstring)."""
        unused = []
        for name in names:
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            parts = rest.split(".")
            if parts[0] in ("post_layernorm", "head") or rest == "embeddings.position_ids":
                unused.append(name)
            elif parts[:2] == ["encoder", "layers"] and int(parts[2]) >= len(self.encoder.layers):
                unused.append(name)
        return unused


class MoteForConditionalGeneration(nn.Module):
    def __init__(self, cfg: MoteConfig):
        super().__init__()
        self.config = cfg
        self.model = TextModel(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        vc = cfg.vision
        if isinstance(vc, HFVisionConfig):
            self.vision_tower = HFVisionTower(vc)
            self.multi_modal_projector = Projector(vc.hidden_size * len(vc.feature_layers), cfg.hidden_size,
                                                   vc.projector_act, vc.projector_bias)
        elif vc is not None:
            self.vision_tower = VisionTower(vc)
            self.multi_modal_projector = Projector(vc.hidden_size, cfg.hidden_size)
        else:
            self.vision_tower = self.multi_modal_projector = None
        inv_freq, self.rope_attention_scaling = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    # -- the three programs' bodies -------------------------------------------------------------------------
    def encode_image(self, pixel_values):
        """pixel_values [1,3,H,W] (preprocessed) -> image embeddings [1, N_img, d]."""
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def embed(self, tokens):
        return self.model.embed_tokens(tokens)

    def decode(self, embeds, input_pos, k_caches, v_caches, in_place: bool = False):
        """embeds [1,T,d], input_pos [1] (int64 start position), caches per layer [1, n_kv, S, hd].

        Returns logits [1,T,vocab] and the per-layer caches (the same tensors when `in_place`).
        """
        t = embeds.shape[1]
        s = k_caches[0].shape[2]
        positions = input_pos + torch.arange(t, dtype=torch.long, device=embeds.device)
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        if self.rope_attention_scaling != 1.0:      # YaRN scales cos and sin (transformers' attention_scaling)
            cos, sin = cos * self.rope_attention_scaling, sin * self.rope_attention_scaling
        keys = torch.arange(s, dtype=torch.long, device=embeds.device)
        allowed = keys[None, :] <= positions[:, None]
        mask = torch.where(allowed, 0.0, float("-inf"))[None, None]
        x = embeds
        new_k, new_v = [], []
        for layer, kc, vc in zip(self.model.layers, k_caches, v_caches):
            x, kc, vc = layer(x, cos, sin, mask, kc, vc, positions, in_place)
            new_k.append(kc)
            new_v.append(vc)
        x = self.model.norm(x)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, weight), new_k, new_v

    # -- helpers --------------------------------------------------------------------------------------------
    def new_cache(self, max_seq_len: int):
        cfg = self.config
        shape = (1, cfg.num_key_value_heads, max_seq_len, cfg.head_dim)
        return ([torch.zeros(shape) for _ in range(cfg.num_hidden_layers)],
                [torch.zeros(shape) for _ in range(cfg.num_hidden_layers)])

    def forward_full(self, embeds):
        """Whole-sequence forward without a persistent cache (training, and the cache-equivalence tests)."""
        k, v = self.new_cache(embeds.shape[1])
        logits, _, _ = self.decode(embeds, torch.zeros(1, dtype=torch.long), k, v)
        return logits

    def router_logits(self):
        return [layer.mlp.last_router_logits for layer in self.model.layers if isinstance(layer.mlp, MoteBlock)]
