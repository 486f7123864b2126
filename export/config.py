"""Model configuration: our native MoTE `config.json` and the Hugging Face ones, read as `transformers` reads them.

Three input formats (DESIGN.md section 2), one validated `MoteConfig`:

- `model_type: "mote"` (ours; Qwen2 names for the text backbone):

    {"model_type": "mote", "vocab_size": 260, "hidden_size": 128, "intermediate_size": 256,
     "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0,
     "rms_norm_eps": 1e-6, "max_position_embeddings": 256, "tie_word_embeddings": true,
     "bos_token_id": 256, "eos_token_id": 257, "image_token_id": 259,
     "moe": {"num_experts": 4, "top_k": 1, "norm_topk_prob": false, "expert_intermediate_size": 256,
             "moe_layers": [1, 3], "weight_scale": "per_tensor", "activation_bits": 8, "shared_expert_gate": false},
     "vision": {"image_size": 32, "patch_size": 8, "num_channels": 3, "hidden_size": 96, "num_layers": 2,
                "num_heads": 4, "intermediate_size": 192, "layer_norm_eps": 1e-5}}

- `model_type: "qwen2_moe"` (transformers' Qwen2MoeConfig): MoE layers by `decoder_sparse_step` / `mlp_only_layers`,
  the shared expert (`shared_expert_intermediate_size`, always sigmoid-gated), routed experts of
  `moe_intermediate_size`, dense layers of `intermediate_size`.
- `model_type: "llava"` (LlavaConfig): a CLIP or SigLIP `vision_config`, the GELU projector and a Qwen2-MoE
  `text_config`.

Every key is accounted for. A key is read and implemented; or it is *inert* (it does not change the computation of
the exported programs, e.g. `initializer_range`, `use_cache`, `architectures`); or it is refused with one line
naming it (a value we do not implement, e.g. `use_sliding_window: true`, `hidden_act: "gelu"` in the text model,
`rope_type: "longrope"`); a key we do not know at all is refused too. Nothing is silently ignored, because the
verification compares the artifact with *our* reading of the config and could never catch a misreading.
Defaults for missing keys are transformers' own.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from .errors import InputError

# Refuse configs whose weights alone would need more than this (checked before anything is allocated).
MAX_PARAMETER_BYTES = 64 * 2**30
# ... or that imply more weight tensors than this: the module tree is built (on the meta device) before the files
# are read, at about 1 ms and 10 KB per module, so a million tiny layers would hang and exhaust memory.
MAX_TENSORS = 250_000

# Keys of transformers' PretrainedConfig (and the generation defaults 4.x wrote into config.json) that do not
# change what the exported programs compute: bookkeeping, training-time switches and `generate()` defaults.
INERT_KEYS = frozenset({
    "_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype", "use_cache",
    "initializer_range", "initializer_factor", "attention_dropout", "dropout", "output_router_logits",
    "router_aux_loss_coef", "output_attentions", "output_hidden_states", "return_dict", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "id2label", "label2id", "problem_type", "finetuning_task", "tokenizer_class",
    "prefix", "task_specific_params", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "tie_encoder_decoder", "decoder_start_token_id", "sep_token_id",
    "chunk_size_feed_forward", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens",
    # descriptive strings a target may show (Core ML puts them where Xcode shows a model's author, license, version)
    "author", "license", "version",
})
FLOAT_DTYPE_NAMES = ("float32", "float16", "bfloat16")
TEXT_ACTIVATIONS = ("silu",)                                   # SwiGLU experts: the MoE formula of DESIGN.md section 1
VISION_ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    expert_intermediate_size: int
    moe_layers: tuple[int, ...]
    per_channel_scale: bool = False
    activation_bits: int = 8
    shared_expert_gate: bool = False


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters as transformers' `rope_parameters` holds them (see export/rope.py)."""
    rope_type: str = "default"
    theta: float = 10000.0
    factor: float | None = None                       # linear, dynamic, yarn, llama3
    original_max_position_embeddings: int | None = None   # yarn, llama3
    attention_factor: float | None = None             # yarn
    beta_fast: float | None = None                    # yarn
    beta_slow: float | None = None                    # yarn
    mscale: float | None = None                       # yarn
    mscale_all_dim: float | None = None               # yarn
    truncate: bool = True                             # yarn
    low_freq_factor: float | None = None              # llama3
    high_freq_factor: float | None = None             # llama3


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Our native pre-LN ViT (model_type "mote")."""
    image_size: int
    patch_size: int
    num_channels: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float = 1e-5
    kind: str = "mote"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        return self.num_patches


@dataclasses.dataclass(frozen=True)
class HFVisionConfig:
    """A LLaVA vision tower (CLIP or SigLIP) and how LLaVA takes its features (modeling_llava.get_image_features).

    `feature_layers` index the tower's hidden states (0 = the embeddings, i = the output of encoder layer i, as
    non-negative indices); several are concatenated along the channels. `drop_first_token` is LLaVA's "default"
    select strategy, which drops position 0 for any tower (the CLIP class token; a SigLIP patch).
    """
    kind: str                      # "clip" or "siglip"
    image_size: int
    patch_size: int
    num_channels: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float
    hidden_act: str
    feature_layers: tuple[int, ...]
    drop_first_token: bool
    projector_act: str = "gelu"
    projector_bias: bool = True

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def has_class_token(self) -> bool:
        return self.kind == "clip"

    @property
    def num_positions(self) -> int:
        return self.num_patches + (1 if self.has_class_token else 0)

    @property
    def num_image_tokens(self) -> int:
        return self.num_positions - (1 if self.drop_first_token else 0)

    @property
    def layers_used(self) -> int:
        """Encoder layers that feed the selected hidden states; later layers (and the post-norm) are never run."""
        return max(self.feature_layers)


@dataclasses.dataclass(frozen=True)
class MoteConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int          # the dense FFN; kept as the shared expert in MoE layers unless set below
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    moe: MoEConfig
    vision: VisionConfig | HFVisionConfig | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    image_token_id: int | None = None
    attention_bias: bool = True     # Qwen2 has q/k/v biases
    source_format: str = "mote"     # "mote", "qwen2_moe" or "llava"
    rope: RopeConfig = RopeConfig()
    explicit_head_dim: int | None = None            # `head_dim` when the config sets it
    shared_expert_intermediate_size: int | None = None   # None: the same as intermediate_size
    checkpoint_dtype: str | None = None             # `dtype` / `torch_dtype` as written (weights are computed in fp32)

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_theta(self) -> float:
        return self.rope.theta

    @property
    def shared_intermediate_size(self) -> int:
        return self.shared_expert_intermediate_size or self.intermediate_size

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def is_moe_layer(self, i: int) -> bool:
        return i in self.moe.moe_layers

    def to_json_dict(self) -> dict:
        """The native ("mote") config.json of this configuration (random models, the example trainer)."""
        if self.source_format != "mote" or self.rope.rope_type != "default" or isinstance(self.vision, HFVisionConfig):
            raise ValueError("only native configs with default RoPE are written back as model_type 'mote'")
        m = self.moe
        d = {
            "model_type": "mote", "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "rope_theta": self.rope.theta, "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings, "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "moe": {"num_experts": m.num_experts, "top_k": m.top_k, "norm_topk_prob": m.norm_topk_prob,
                    "expert_intermediate_size": m.expert_intermediate_size, "moe_layers": list(m.moe_layers),
                    "weight_scale": "per_channel" if m.per_channel_scale else "per_tensor",
                    "activation_bits": m.activation_bits, "shared_expert_gate": m.shared_expert_gate},
        }
        optional = {"bos_token_id": self.bos_token_id, "pad_token_id": self.pad_token_id,
                    "image_token_id": self.image_token_id, "head_dim": self.explicit_head_dim,
                    "shared_expert_intermediate_size": self.shared_expert_intermediate_size,
                    "eos_token_id": (self.eos_token_ids[0] if len(self.eos_token_ids) == 1
                                     else list(self.eos_token_ids) or None)}
        d.update({k: v for k, v in optional.items() if v is not None})
        if self.vision is not None:
            d["vision"] = {k: v for k, v in dataclasses.asdict(self.vision).items() if k != "kind"}
        return d

    def tensor_count(self) -> int:
        """Upper bound on the number of weight tensors the config implies (pre-quantized experts count twice)."""
        n = self.num_hidden_layers * 12 + len(self.moe.moe_layers) * (6 * self.moe.num_experts + 6) + 4
        if self.vision is not None:
            n += self.vision.num_layers * 16 + 8
        return n

    def parameter_count(self) -> int:
        """Number of weights the config implies (used to refuse absurd sizes before allocating)."""
        d, v, hd = self.hidden_size, self.vocab_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = d * q * 2 + d * kv * 2 + (q + 2 * kv if self.attention_bias else 0) + 2 * d
        n_moe = len(self.moe.moe_layers)
        dense = 3 * d * self.intermediate_size
        shared = 3 * d * self.shared_intermediate_size
        routed = self.moe.num_experts * 3 * d * self.moe.expert_intermediate_size + self.moe.num_experts * d
        total = self.num_hidden_layers * attn + (self.num_hidden_layers - n_moe) * dense + n_moe * (shared + routed)
        total += v * d * (1 if self.tie_word_embeddings else 2)
        if self.vision is not None:
            vc = self.vision
            per = 4 * vc.hidden_size**2 + 2 * vc.hidden_size * vc.intermediate_size
            total += vc.num_layers * per + vc.num_channels * vc.patch_size**2 * vc.hidden_size
            total += vc.num_patches * vc.hidden_size + vc.hidden_size * d + d * d
        return total


class _Reader:
    """Typed access to one JSON object, raising InputError that names the file and the key.

    It remembers which keys were read, so `finish` can refuse the keys nobody implemented.
    """

    def __init__(self, data: dict, where: str):
        if not isinstance(data, dict):
            raise InputError(f"{where}: expected a JSON object")
        self.data, self.where, self.seen = data, where, set()

    def has(self, key) -> bool:
        return self.data.get(key) is not None

    def _get(self, key, default):
        self.seen.add(key)
        # transformers writes `null` for an unset optional value: the same as a missing key.
        if self.data.get(key) is None:
            if default is _REQUIRED:
                raise InputError(f"{self.where}: missing required key '{key}'")
            return default
        return self.data[key]

    def raw(self, key, default=None):
        return self._get(key, default)

    def int(self, key, default=None, minimum=1):
        value = self._get(key, _REQUIRED if default is None else default)
        if value is _OPTIONAL:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{self.where}: '{key}' must be an integer, got {value!r}")
        if value < minimum:
            raise InputError(f"{self.where}: '{key}' must be >= {minimum}, got {value}")
        return value

    def float(self, key, default=None, positive=True):
        value = self._get(key, _REQUIRED if default is None else default)
        if value is _OPTIONAL:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{self.where}: '{key}' must be a finite number, got {value!r}")
        if positive and value <= 0:
            raise InputError(f"{self.where}: '{key}' must be > 0, got {value}")
        return float(value)

    def bool(self, key, default=None):
        value = self._get(key, _REQUIRED if default is None else default)
        if not isinstance(value, bool):
            raise InputError(f"{self.where}: '{key}' must be true or false, got {value!r}")
        return value

    def choice(self, key, choices, default=None, what="must be one of"):
        value = self._get(key, _REQUIRED if default is None else default)
        if value not in choices:
            raise InputError(f"{self.where}: '{key}' {what} {list(choices)}, got {value!r}")
        return value

    def unsupported(self, key, allowed, why):
        """A key whose other values we do not implement: refuse anything but `allowed` (a missing key is fine)."""
        value = self._get(key, allowed)
        if value != allowed:
            raise InputError(f"{self.where}: '{key}': {value!r} is not supported ({why})")

    def section(self, key, optional=False):
        if optional and self.data.get(key) is None:
            self.seen.add(key)
            return None
        return _Reader(self._get(key, _REQUIRED), f"{self.where}: '{key}'")

    def finish(self, inert=INERT_KEYS) -> None:
        """Refuse every key that was neither read nor known to be inert."""
        for key in self.data:
            if key not in self.seen and key not in inert:
                raise InputError(f"{self.where}: key '{key}' is not implemented by mote-export (refusing it rather than "
                                 f"exporting a model that ignores it)")


_REQUIRED = object()
_OPTIONAL = object()    # default for an optional int/float: returns None when the key is missing or null


def _layers(value, n_layers, where, key="moe_layers"):
    if value == "all" and key == "moe_layers":
        return tuple(range(n_layers))
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        what = "\"all\" or a list of layer indices" if key == "moe_layers" else "a list of layer indices"
        raise InputError(f"{where}: '{key}' must be {what}, got {value!r}")
    bad = [i for i in value if not 0 <= i < n_layers]
    if bad:
        raise InputError(f"{where}: '{key}' has indices outside [0, {n_layers}): {bad}")
    if len(set(value)) != len(value):
        raise InputError(f"{where}: '{key}' lists a layer twice: {value}")
    return tuple(sorted(value))


def _token_ids(r: _Reader, key) -> tuple[int, ...]:
    """An id or a list of ids (transformers allows both for eos), null or missing = unknown."""
    value = r.raw(key)
    values = value if isinstance(value, list) else [] if value is None else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InputError(f"{r.where}: '{key}' must be a token id (or a list of them) or null, got {value!r}")
    return tuple(values)


def _one_token_id(r: _Reader, key) -> int | None:
    ids = _token_ids(r, key)
    if len(ids) > 1:
        raise InputError(f"{r.where}: '{key}' must be a single token id, got {list(ids)}")
    return ids[0] if ids else None


def _rope(r: _Reader, max_positions: int) -> RopeConfig:
    """`rope_parameters` (transformers 5.x), else the legacy `rope_scaling` + top-level `rope_theta`, merged with
    transformers' priority: values in the dict first, then the top-level `rope_theta`, then 10000."""
    top_theta = r.float("rope_theta", 10000.0)
    if r.has("rope_parameters") and r.has("rope_scaling"):
        raise InputError(f"{r.where}: both 'rope_parameters' and 'rope_scaling' are set; transformers uses "
                         f"'rope_scaling', which is ambiguous; keep one")
    key = "rope_scaling" if r.has("rope_scaling") else "rope_parameters"
    p = r.section(key, optional=True)
    if p is None:
        return RopeConfig(theta=top_theta)
    where = p.where
    rope_type = p.data.get("rope_type", p.data.get("type", "default"))
    p.seen |= {"rope_type", "type"}
    if rope_type not in ROPE_TYPES:
        raise InputError(f"{where}: 'rope_type': {rope_type!r} is not supported (implemented: {list(ROPE_TYPES)})")
    theta = p.float("rope_theta", top_theta)
    p.unsupported("partial_rotary_factor", 1.0, "only full-width rotary embeddings are implemented")
    kw = dict(rope_type=rope_type, theta=theta)
    if rope_type in ("linear", "dynamic", "yarn", "llama3"):
        kw["factor"] = p.float("factor", _OPTIONAL if rope_type == "yarn" else None)
    if rope_type in ("yarn", "llama3"):
        kw["original_max_position_embeddings"] = p.int("original_max_position_embeddings", max_positions)
    if rope_type == "yarn":
        for name in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            kw[name] = p.float(name, _OPTIONAL, positive=False)
        kw["truncate"] = p.bool("truncate", True)
    if rope_type == "llama3":
        kw["low_freq_factor"] = p.float("low_freq_factor")
        kw["high_freq_factor"] = p.float("high_freq_factor")
    p.finish(inert=frozenset())
    return RopeConfig(**kw)


def _dtype(r: _Reader) -> str | None:
    value = r.raw("dtype", r.raw("torch_dtype"))
    if value is not None and value not in FLOAT_DTYPE_NAMES:
        raise InputError(f"{r.where}: 'dtype': {value!r} is not supported (weights must be one of "
                         f"{list(FLOAT_DTYPE_NAMES)}; quantized checkpoints other than ternary experts are not read)")
    return value


def _text_fields(r: _Reader, kv_heads_default=None) -> dict:
    """The Qwen2 text backbone, common to all formats. Missing sizes are refused rather than defaulted (a
    transformers default of a 2B model is never what a small checkpoint without the key meant)."""
    heads = r.int("num_attention_heads")
    max_positions = r.int("max_position_embeddings")
    r.choice("hidden_act", TEXT_ACTIVATIONS, "silu", what="is not supported; implemented:")
    return dict(
        vocab_size=r.int("vocab_size"),
        hidden_size=r.int("hidden_size"),
        num_hidden_layers=r.int("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=r.int("num_key_value_heads", kv_heads_default),
        rope=_rope(r, max_positions),
        rms_norm_eps=r.float("rms_norm_eps", 1e-6),
        max_position_embeddings=max_positions,
        tie_word_embeddings=r.bool("tie_word_embeddings", False),
        explicit_head_dim=r.int("head_dim", _OPTIONAL),
        bos_token_id=_one_token_id(r, "bos_token_id"),
        eos_token_ids=_token_ids(r, "eos_token_id"),
        pad_token_id=_one_token_id(r, "pad_token_id"),
        checkpoint_dtype=_dtype(r),
    )


def _no_sliding_window(r: _Reader, n_layers: int) -> None:
    r.unsupported("use_sliding_window", False, "sliding-window attention is not implemented")
    r.raw("sliding_window")          # only read by transformers when use_sliding_window is true
    r.raw("max_window_layers")       # likewise
    types = r.raw("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n_layers:
            raise InputError(f"{r.where}: 'layer_types' must list one type per layer ({n_layers}), got {types!r}")
        other = sorted({t for t in types if t != "full_attention"}, key=str)
        if other:
            raise InputError(f"{r.where}: 'layer_types': {other[0]!r} is not supported (only full_attention)")


def _native(r: _Reader) -> MoteConfig:
    text = _text_fields(r, kv_heads_default=r.data.get("num_attention_heads"))
    n_layers = text["num_hidden_layers"]
    m = r.section("moe")
    moe = MoEConfig(
        num_experts=m.int("num_experts"),
        top_k=m.int("top_k", 1),
        norm_topk_prob=m.bool("norm_topk_prob", False),
        expert_intermediate_size=m.int("expert_intermediate_size"),
        moe_layers=_layers(m.raw("moe_layers", "all"), n_layers, m.where),
        per_channel_scale=m.choice("weight_scale", ("per_tensor", "per_channel"), "per_tensor") == "per_channel",
        activation_bits=m.choice("activation_bits", (8,), 8),
        shared_expert_gate=m.bool("shared_expert_gate", False),
    )
    m.finish(inert=frozenset())
    v = r.section("vision", optional=True)
    vision = None
    if v is not None:
        vision = VisionConfig(
            image_size=v.int("image_size"), patch_size=v.int("patch_size"),
            num_channels=v.int("num_channels", 3), hidden_size=v.int("hidden_size"),
            num_layers=v.int("num_layers"), num_heads=v.int("num_heads"),
            intermediate_size=v.int("intermediate_size"), layer_norm_eps=v.float("layer_norm_eps", 1e-5),
        )
        v.finish(inert=frozenset())
        _check_patches(vision, v.where)
    image_token = r.int("image_token_id", -1, minimum=-1)
    return MoteConfig(
        **text, intermediate_size=r.int("intermediate_size"), moe=moe, vision=vision,
        shared_expert_intermediate_size=r.int("shared_expert_intermediate_size", _OPTIONAL),
        image_token_id=None if image_token < 0 else image_token,
        attention_bias=r.bool("attention_bias", True), source_format="mote",
    )


def _qwen2_moe(r: _Reader) -> MoteConfig:
    """transformers' Qwen2MoeConfig and Qwen2MoeDecoderLayer: layer i is sparse iff i not in mlp_only_layers and
    num_experts > 0 and (i + 1) % decoder_sparse_step == 0; dense layers use intermediate_size."""
    text = _text_fields(r)
    n_layers = text["num_hidden_layers"]
    _no_sliding_window(r, n_layers)
    step = r.int("decoder_sparse_step", 1)
    mlp_only = _layers(r.raw("mlp_only_layers", []), n_layers, r.where, "mlp_only_layers")
    sparse = [i for i in range(n_layers) if i not in mlp_only and (i + 1) % step == 0]
    if not sparse:
        raise InputError(f"{r.where}: no layer is a MoE layer (decoder_sparse_step {step}, mlp_only_layers "
                         f"{list(mlp_only)}); a MoTE needs at least one")
    qkv_bias = r.bool("qkv_bias", True)
    if r.has("attention_bias") and r.bool("attention_bias") != qkv_bias:
        raise InputError(f"{r.where}: 'attention_bias' and 'qkv_bias' disagree; Qwen2-MoE reads 'qkv_bias'")
    moe = MoEConfig(
        num_experts=r.int("num_experts", 60), top_k=r.int("num_experts_per_tok", 4),
        norm_topk_prob=r.bool("norm_topk_prob", False),
        expert_intermediate_size=r.int("moe_intermediate_size", 1408),
        moe_layers=tuple(sparse), shared_expert_gate=True,
    )
    return MoteConfig(
        **text, intermediate_size=r.int("intermediate_size", 5632), moe=moe, vision=None,
        shared_expert_intermediate_size=r.int("shared_expert_intermediate_size", 5632),
        attention_bias=qkv_bias, source_format="qwen2_moe",
    )


# transformers' defaults of the two vision towers LLaVA reads (CLIPVisionConfig, SiglipVisionConfig).
_VISION_DEFAULTS = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                                layer_norm_eps=1e-6),
}
# LlavaConfig's vision_config when none is given: CLIP ViT-L/14-336.
_LLAVA_DEFAULT_VISION = {"model_type": "clip_vision_model", "intermediate_size": 4096, "hidden_size": 1024,
                         "patch_size": 14, "image_size": 336, "num_hidden_layers": 24, "num_attention_heads": 16}
# Vision-config keys that only matter for parts of CLIP/SigLIP that LLaVA never runs (the text model, the CLIP
# projection, the SigLIP pooling head) or for training.
_VISION_INERT = INERT_KEYS | {"projection_dim", "vision_use_head", "vocab_size", "hidden_dropout_prob",
                              "attention_probs_dropout_prob", "bos_token_id", "eos_token_id", "pad_token_id"}


def _llava(r: _Reader) -> MoteConfig:
    t = r.section("text_config", optional=True)
    if t is None:
        raise InputError(f"{r.where}: 'text_config' is missing (transformers would default to a Llama text model; "
                         f"a MoTE needs a qwen2_moe text_config)")
    t.choice("model_type", ("qwen2_moe",), what="is not supported; a MoTE text model is one of")
    text = _qwen2_moe(t)
    t.finish()

    v_data = r.raw("vision_config") or dict(_LLAVA_DEFAULT_VISION)
    v = _Reader(v_data, f"{r.where}: 'vision_config'")
    kind = v.choice("model_type", tuple(_VISION_DEFAULTS), what="is not supported; implemented vision towers:")
    dflt = _VISION_DEFAULTS[kind]
    n_layers = v.int("num_hidden_layers", dflt["num_hidden_layers"])
    feature = r.raw("vision_feature_layer", -2)
    feature_list = feature if isinstance(feature, list) else [feature]
    if not feature_list or not all(isinstance(i, int) and not isinstance(i, bool) for i in feature_list):
        raise InputError(f"{r.where}: 'vision_feature_layer' must be an integer or a list of integers, got {feature!r}")
    # hidden_states has n_layers + 1 entries (the embeddings, then every encoder layer's output).
    resolved = [i if i >= 0 else n_layers + 1 + i for i in feature_list]
    if not all(0 <= i <= n_layers for i in resolved):
        raise InputError(f"{r.where}: 'vision_feature_layer' {feature!r} is outside the vision tower's "
                         f"{n_layers + 1} hidden states")
    strategy = r.choice("vision_feature_select_strategy", ("default", "full"), "default")
    vision = HFVisionConfig(
        kind="clip" if kind == "clip_vision_model" else "siglip",
        image_size=v.int("image_size", dflt["image_size"]), patch_size=v.int("patch_size", dflt["patch_size"]),
        num_channels=v.int("num_channels", dflt["num_channels"]), hidden_size=v.int("hidden_size", dflt["hidden_size"]),
        num_layers=n_layers, num_heads=v.int("num_attention_heads", dflt["num_attention_heads"]),
        intermediate_size=v.int("intermediate_size", dflt["intermediate_size"]),
        layer_norm_eps=v.float("layer_norm_eps", dflt["layer_norm_eps"]),
        hidden_act=v.choice("hidden_act", VISION_ACTIVATIONS, dflt["hidden_act"], what="is not supported; implemented:"),
        feature_layers=tuple(resolved), drop_first_token=strategy == "default",
        projector_act=r.choice("projector_hidden_act", VISION_ACTIVATIONS, "gelu", what="is not supported; implemented:"),
        projector_bias=r.bool("multimodal_projector_bias", True),
    )
    v.finish(inert=_VISION_INERT)
    _check_patches(vision, v.where)
    n_img = r.int("image_seq_length", vision.num_image_tokens)
    if n_img != vision.num_image_tokens:
        raise InputError(f"{r.where}: 'image_seq_length' {n_img} != the {vision.num_image_tokens} image features the "
                         f"vision tower gives ({vision.num_patches} patches, select strategy {strategy!r})")
    image_token = r.int("image_token_index", _OPTIONAL, minimum=0)
    if image_token is None:
        image_token = r.int("image_token_id", 32000, minimum=0)     # LlavaConfig's default image_token_index
    # LlavaConfig: the top-level tie_word_embeddings, switched on when the text config ties.
    tie = r.bool("tie_word_embeddings", False) or text.tie_word_embeddings
    r.raw("ignore_index")            # a training-loss setting of 4.x LLaVA configs
    r.raw("vocab_size")              # 4.x LLaVA configs repeat the text vocabulary here
    top_pad = _one_token_id(r, "pad_token_id")
    return dataclasses.replace(text, vision=vision, image_token_id=image_token, tie_word_embeddings=tie,
                               pad_token_id=text.pad_token_id if text.pad_token_id is not None else top_pad,
                               checkpoint_dtype=_dtype(r) or text.checkpoint_dtype, source_format="llava")


def _check_patches(vision, where) -> None:
    if vision.image_size % vision.patch_size:
        raise InputError(f"{where}: image_size {vision.image_size} is not a multiple of patch_size {vision.patch_size}")
    if vision.hidden_size % vision.num_heads:
        raise InputError(f"{where}: hidden_size {vision.hidden_size} is not divisible by num_heads {vision.num_heads}")


_FORMATS = {"mote": _native, "qwen2_moe": _qwen2_moe, "llava": _llava}


def parse_config(data: dict, where: str = "config.json") -> MoteConfig:
    r = _Reader(data, where)
    model_type = r.choice("model_type", tuple(_FORMATS))
    cfg = _FORMATS[model_type](r)
    r.finish()
    _check_consistency(cfg, where)
    return cfg


def _check_consistency(cfg: MoteConfig, where: str) -> None:
    if cfg.explicit_head_dim is None and cfg.hidden_size % cfg.num_attention_heads:
        raise InputError(f"{where}: hidden_size {cfg.hidden_size} is not divisible by num_attention_heads "
                         f"{cfg.num_attention_heads}")
    if cfg.head_dim % 2:
        raise InputError(f"{where}: head_dim {cfg.head_dim} must be even for rotary embeddings")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise InputError(f"{where}: num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                         f"num_key_value_heads {cfg.num_key_value_heads}")
    if cfg.moe.top_k > cfg.moe.num_experts:
        raise InputError(f"{where}: top_k {cfg.moe.top_k} exceeds num_experts {cfg.moe.num_experts}")
    ids = [("bos_token_id", cfg.bos_token_id), ("pad_token_id", cfg.pad_token_id), ("image_token_id", cfg.image_token_id)]
    ids += [("eos_token_id", t) for t in cfg.eos_token_ids]
    for name, tok in ids:
        if tok is not None and tok >= cfg.vocab_size:
            raise InputError(f"{where}: {name} {tok} is outside the vocabulary (vocab_size {cfg.vocab_size})")
    if cfg.vision is not None and cfg.image_token_id is None:
        raise InputError(f"{where}: a model with a vision tower needs 'image_token_id'")
    n_tensors = cfg.tensor_count()
    if n_tensors > MAX_TENSORS:
        raise InputError(f"{where}: the configured sizes ({cfg.num_hidden_layers} layers, {cfg.moe.num_experts} experts) "
                         f"imply up to {n_tensors} weight tensors (limit {MAX_TENSORS}); refusing before allocating "
                         f"anything")
    n_bytes = cfg.parameter_count() * 4
    if n_bytes > MAX_PARAMETER_BYTES:
        raise InputError(f"{where}: the configured sizes need {n_bytes / 2**30:.0f} GiB of fp32 weights "
                         f"(limit {MAX_PARAMETER_BYTES / 2**30:.0f} GiB); refusing before allocating anything")


def read_json(path: Path):
    """A model directory's JSON file (config, generation config, tokenizer config, preprocessor config), with one
    clear line naming the file if it cannot be read or parsed."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"{path}: not valid JSON ({str(e) or type(e).__name__})") from None


def load_config(model_dir: Path) -> MoteConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise InputError(f"{path}: not found (a model directory needs config.json)")
    return parse_config(read_json(path), str(path))
