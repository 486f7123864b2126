"""Model configuration: the MoTE `config.json` (and the Hugging Face Qwen2-MoE one), validated.

Native MoTE config (Hugging Face style, Qwen2 names for the text backbone):

    {"model_type": "mote", "vocab_size": 260, "hidden_size": 128, "intermediate_size": 256,
     "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0,
     "rms_norm_eps": 1e-6, "max_position_embeddings": 256, "tie_word_embeddings": true,
     "bos_token_id": 256, "eos_token_id": 257, "image_token_id": 259,
     "moe": {"num_experts": 4, "top_k": 1, "norm_topk_prob": false, "expert_intermediate_size": 256,
             "moe_layers": [1, 3], "weight_scale": "per_tensor", "activation_bits": 8, "shared_expert_gate": false},
     "vision": {"image_size": 32, "patch_size": 8, "num_channels": 3, "hidden_size": 96, "num_layers": 2,
                "num_heads": 4, "intermediate_size": 192, "layer_norm_eps": 1e-5}}

`vision` may be absent (a text-only model). A Qwen2-MoE config (`model_type: qwen2_moe`) is translated: its MoE
layers (decoder_sparse_step / mlp_only_layers) become MoTE blocks, shared_expert_intermediate_size is the shared
expert, moe_intermediate_size the routed experts, and it always has the sigmoid shared-expert gate.
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
class VisionConfig:
    image_size: int
    patch_size: int
    num_channels: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class MoteConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int          # the dense FFN, kept as the shared expert in MoE layers
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    moe: MoEConfig
    vision: VisionConfig | None = None
    bos_token_id: int = 256
    eos_token_id: int = 257
    image_token_id: int | None = None
    attention_bias: bool = True     # Qwen2 has q/k/v biases
    source_format: str = "mote"     # "mote" or "qwen2_moe"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, i: int) -> bool:
        return i in self.moe.moe_layers

    def to_json_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model_type"] = "mote"
        moe = d.pop("moe")
        moe["moe_layers"] = list(moe["moe_layers"])
        moe["weight_scale"] = "per_channel" if moe.pop("per_channel_scale") else "per_tensor"
        d["moe"] = moe
        for optional in ("vision", "image_token_id"):
            if d[optional] is None:
                del d[optional]
        del d["source_format"]
        return d

    def tensor_count(self) -> int:
        """Upper bound on the number of weight tensors the config implies (pre-quantized experts count twice)."""
        n = self.num_hidden_layers * 12 + len(self.moe.moe_layers) * (6 * self.moe.num_experts + 6) + 4
        if self.vision is not None:
            n += self.vision.num_layers * 16 + 8
        return n

    def parameter_count(self) -> int:
        """Number of weights the config implies (used to refuse absurd sizes before allocating)."""
        d, v, kv = self.hidden_size, self.vocab_size, self.num_key_value_heads * self.head_dim
        attn = d * d * 2 + d * kv * 2 + (d + 2 * kv if self.attention_bias else 0) + 2 * d
        dense = 3 * d * self.intermediate_size
        routed = self.moe.num_experts * 3 * d * self.moe.expert_intermediate_size + self.moe.num_experts * d
        n_moe = len(self.moe.moe_layers)
        total = self.num_hidden_layers * (attn + dense) + n_moe * routed + v * d * (1 if self.tie_word_embeddings else 2)
        if self.vision is not None:
            vc = self.vision
            per = 4 * vc.hidden_size**2 + 2 * vc.hidden_size * vc.intermediate_size
            total += vc.num_layers * per + vc.num_channels * vc.patch_size**2 * vc.hidden_size
            total += vc.num_patches * vc.hidden_size + vc.hidden_size * d + d * d
        return total


class _Reader:
    """Typed access to one JSON object, raising InputError that names the file and the key."""

    def __init__(self, data: dict, where: str):
        if not isinstance(data, dict):
            raise InputError(f"{where}: expected a JSON object")
        self.data, self.where = data, where

    def _get(self, key, default):
        if key not in self.data:
            if default is _REQUIRED:
                raise InputError(f"{self.where}: missing required key '{key}'")
            return default
        return self.data[key]

    def int(self, key, default=None, minimum=1):
        if default is None:
            default = _REQUIRED
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{self.where}: '{key}' must be an integer, got {value!r}")
        if value < minimum:
            raise InputError(f"{self.where}: '{key}' must be >= {minimum}, got {value}")
        return value

    def float(self, key, default=None, positive=True):
        if default is None:
            default = _REQUIRED
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{self.where}: '{key}' must be a finite number, got {value!r}")
        if positive and value <= 0:
            raise InputError(f"{self.where}: '{key}' must be > 0, got {value}")
        return float(value)

    def bool(self, key, default=None):
        if default is None:
            default = _REQUIRED
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise InputError(f"{self.where}: '{key}' must be true or false, got {value!r}")
        return value

    def choice(self, key, choices, default=None):
        value = self._get(key, _REQUIRED if default is None else default)
        if value not in choices:
            raise InputError(f"{self.where}: '{key}' must be one of {list(choices)}, got {value!r}")
        return value

    def section(self, key, optional=False):
        if optional and self.data.get(key) is None:
            return None
        return _Reader(self._get(key, _REQUIRED), f"{self.where}: '{key}'")


_REQUIRED = object()


def _layers(value, n_layers, where):
    if value == "all":
        return tuple(range(n_layers))
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise InputError(f"{where}: 'moe_layers' must be \"all\" or a list of layer indices, got {value!r}")
    bad = [i for i in value if not 0 <= i < n_layers]
    if bad:
        raise InputError(f"{where}: 'moe_layers' has indices outside [0, {n_layers}): {bad}")
    if len(set(value)) != len(value):
        raise InputError(f"{where}: 'moe_layers' lists a layer twice: {value}")
    return tuple(sorted(value))


def _text_fields(r: _Reader) -> dict:
    return dict(
        vocab_size=r.int("vocab_size"),
        hidden_size=r.int("hidden_size"),
        num_hidden_layers=r.int("num_hidden_layers"),
        num_attention_heads=r.int("num_attention_heads"),
        num_key_value_heads=r.int("num_key_value_heads"),
        rope_theta=r.float("rope_theta", 10000.0),
        rms_norm_eps=r.float("rms_norm_eps", 1e-6),
        max_position_embeddings=r.int("max_position_embeddings"),
        tie_word_embeddings=r.bool("tie_word_embeddings", False),
    )


def parse_config(data: dict, where: str = "config.json") -> MoteConfig:
    r = _Reader(data, where)
    model_type = r.choice("model_type", ("mote", "qwen2_moe"))
    text = _text_fields(r)
    n_layers = text["num_hidden_layers"]
    if model_type == "mote":
        m = r.section("moe")
        moe = MoEConfig(
            num_experts=m.int("num_experts"),
            top_k=m.int("top_k", 1),
            norm_topk_prob=m.bool("norm_topk_prob", False),
            expert_intermediate_size=m.int("expert_intermediate_size"),
            moe_layers=_layers(m.data.get("moe_layers", "all"), n_layers, m.where),
            per_channel_scale=m.choice("weight_scale", ("per_tensor", "per_channel"), "per_tensor") == "per_channel",
            activation_bits=m.choice("activation_bits", (8,), 8),
            shared_expert_gate=m.bool("shared_expert_gate", False),
        )
        intermediate = r.int("intermediate_size")
        v = r.section("vision", optional=True)
        vision = None
        if v is not None:
            vision = VisionConfig(
                image_size=v.int("image_size"), patch_size=v.int("patch_size"),
                num_channels=v.int("num_channels", 3), hidden_size=v.int("hidden_size"),
                num_layers=v.int("num_layers"), num_heads=v.int("num_heads"),
                intermediate_size=v.int("intermediate_size"), layer_norm_eps=v.float("layer_norm_eps", 1e-5),
            )
            if vision.image_size % vision.patch_size:
                raise InputError(f"{v.where}: image_size {vision.image_size} is not a multiple of patch_size {vision.patch_size}")
            if vision.hidden_size % vision.num_heads:
                raise InputError(f"{v.where}: hidden_size {vision.hidden_size} is not divisible by num_heads {vision.num_heads}")
        image_token = r.int("image_token_id", -1, minimum=-1)
        cfg = MoteConfig(
            **text, intermediate_size=intermediate, moe=moe, vision=vision,
            bos_token_id=r.int("bos_token_id", 256, minimum=0), eos_token_id=r.int("eos_token_id", 257, minimum=0),
            image_token_id=None if image_token < 0 else image_token,
            attention_bias=r.bool("attention_bias", True), source_format="mote",
        )
    else:
        # Hugging Face Qwen2-MoE: every `decoder_sparse_step`-th layer is sparse unless listed in mlp_only_layers.
        step = r.int("decoder_sparse_step", 1)
        mlp_only = data.get("mlp_only_layers") or []
        if not isinstance(mlp_only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in mlp_only):
            raise InputError(f"{where}: 'mlp_only_layers' must be a list of layer indices, got {mlp_only!r}")
        sparse = [i for i in range(n_layers) if i not in mlp_only and (i + 1) % step == 0]
        moe = MoEConfig(
            num_experts=r.int("num_experts"), top_k=r.int("num_experts_per_tok"),
            norm_topk_prob=r.bool("norm_topk_prob", False),
            expert_intermediate_size=r.int("moe_intermediate_size"),
            moe_layers=_layers(sparse, n_layers, where), shared_expert_gate=True,
        )
        shared = r.int("shared_expert_intermediate_size")
        dense = r.int("intermediate_size", shared)
        if mlp_only and dense != shared:
            raise InputError(f"{where}: dense layers with intermediate_size {dense} != shared_expert_intermediate_size "
                             f"{shared} are not supported")
        eos = data.get("eos_token_id", 0)
        cfg = MoteConfig(
            **text, intermediate_size=shared, moe=moe, vision=None,
            bos_token_id=r.int("bos_token_id", 0, minimum=0),
            eos_token_id=eos if isinstance(eos, int) and not isinstance(eos, bool) else r.int("eos_token_id", minimum=0),
            attention_bias=True, source_format="qwen2_moe",
        )
    _check_consistency(cfg, where)
    return cfg


def _check_consistency(cfg: MoteConfig, where: str) -> None:
    if cfg.hidden_size % cfg.num_attention_heads:
        raise InputError(f"{where}: hidden_size {cfg.hidden_size} is not divisible by num_attention_heads "
                         f"{cfg.num_attention_heads}")
    if cfg.head_dim % 2:
        raise InputError(f"{where}: head_dim {cfg.head_dim} must be even for rotary embeddings")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise InputError(f"{where}: num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                         f"num_key_value_heads {cfg.num_key_value_heads}")
    if cfg.moe.top_k > cfg.moe.num_experts:
        raise InputError(f"{where}: top_k {cfg.moe.top_k} exceeds num_experts {cfg.moe.num_experts}")
    for name in ("bos_token_id", "eos_token_id", "image_token_id"):
        tok = getattr(cfg, name)
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


def load_config(model_dir: Path) -> MoteConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise InputError(f"{path}: not found (a model directory needs config.json)")
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InputError(f"{path}: not valid JSON ({str(e) or type(e).__name__})") from None
    return parse_config(data, str(path))
