"""A memory plan by part from the config alone (`mote-inspect --plan`, issue 14): what each part of a MoTE costs as
a dense fp16 model and as our targets export it, without reading a weight.

The module tree is built on the meta device exactly as `export.loader.load_model` builds it (its
`quantize_modules` swaps the modules a `--quantize` spec covers, so a tied head quantized on its own is a copy
here too); then every tensor of it is priced:

    column      routed experts                          quantized parts (--quantize)        the rest
    fp16        2 bytes per weight                      2 bytes per weight                  2 bytes per value
    exported    ceil(K/4) bytes per row (2-bit codes)   bits/8 per weight + one fp32 scale  4 bytes (fp32, what the
                + one fp32 scale per tensor or row      per group of K (+ an fp32 bias)     targets ship)

The fp16 column is the model without --quantize (a tied head costs nothing there: it is the embedding). Parts
follow the module classes and `quantization.part_of`; the KV cache (2 x layers x kv_heads x head_dim x
max_seq_len, batch 1) is listed apart from the weights. `paper_framing` sets the plan beside the MoTE paper's
memory figures (arXiv 2506.14435, introduction).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .config import MoteConfig
from .loader import quantize_modules
from .model import MoteForConditionalGeneration, QuantizedLinear, TernaryLinear
from .programs import DEFAULT_MAX_SEQ_LEN
from .quantization import QuantSpec, part_of

PARTS = ("embed", "attn", "shared", "routed", "router", "lm_head", "vision", "other")
LABELS = {"embed": "embeddings", "attn": "attention", "shared": "shared experts + dense FFNs",
          "routed": "routed experts", "router": "router", "lm_head": "lm_head", "vision": "vision (tower + projector)",
          "other": "norms / other"}
EMBEDDING_PARTS = ("embed", "lm_head")
FP16, FP32 = 2, 4

# The paper's introduction: a 16-expert fp16 MoE-LLaVA on Qwen2.5-3B raises non-embedding memory from 5.2 GB to
# 73.2 GB (GiB, as the arithmetic below shows).
PAPER = {"dense_gb": 5.2, "moe_llava_gb": 73.2, "experts": 16}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Bytes per part in both columns, and the KV cache at `max_seq_len`."""

    fp16: dict
    exported: dict
    kv_cache: dict          # {"fp16": bytes, "fp32": bytes}
    max_seq_len: int
    quantization: QuantSpec | None

    def total(self, column: str, non_embedding: bool = False) -> int:
        parts = getattr(self, column)
        return sum(v for p, v in parts.items() if not (non_embedding and p in EMBEDDING_PARTS))

    def as_dict(self) -> dict:
        return {
            "max_seq_len": self.max_seq_len,
            "quantize": self.quantization.as_dict() if self.quantization else None,
            "parts": {p: {"fp16_bytes": self.fp16[p], "exported_bytes": self.exported[p]} for p in PARTS},
            "weights": {c: self.total(c) for c in ("fp16", "exported")},
            "non_embedding_weights": {c: self.total(c, True) for c in ("fp16", "exported")},
            "kv_cache": {"fp16_bytes": self.kv_cache["fp16"], "exported_bytes": self.kv_cache["fp32"]},
        }


def meta_model(cfg: MoteConfig) -> MoteForConditionalGeneration:
    with torch.device("meta"):
        return MoteForConditionalGeneration(cfg)


def module_part(name: str, module) -> str:
    if isinstance(module, TernaryLinear):
        return "routed"
    if name.startswith(("vision_tower", "multi_modal_projector")):
        return "vision"           # part_of leaves out the patch embedding (a convolution): still the tower's
    return part_of(name) or "other"


def _tensors(model):
    """(part, module, leaf, tensor) of every stored tensor (the state dict: parameters and persistent buffers)."""
    modules = dict(model.named_modules())
    for key, t in model.state_dict(keep_vars=True).items():
        module_name, _, leaf = key.rpartition(".")
        module = modules[module_name]
        yield module_part(module_name, module), module, leaf, t


def _exported_bytes(module, leaf: str, t: torch.Tensor) -> int:
    if isinstance(module, TernaryLinear):         # its latent `weight` [out, K], exported as packed codes + scales
        scales = module.out_features if module.per_channel else 1
        return module.out_features * math.ceil(module.in_features / 4) + FP32 * scales
    if isinstance(module, QuantizedLinear) and leaf == "qweight":
        return math.ceil(t.numel() * module.bits / 8)
    return t.numel() * FP32                       # qscale, biases, norms and every unquantized weight


def kv_cache_elements(cfg: MoteConfig, max_seq_len: int) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * max_seq_len


def plan(cfg: MoteConfig, spec: QuantSpec | None = None, max_seq_len: int | None = None,
         where: str = "config") -> Plan:
    """The plan of `cfg` (as exported with `spec`); `where` names the model in a refusal (a group that does not
    divide a width, as the loader refuses it)."""
    max_seq_len = max_seq_len or min(DEFAULT_MAX_SEQ_LEN, cfg.max_position_embeddings)
    model = meta_model(cfg)
    fp16 = dict.fromkeys(PARTS, 0)
    for part, _, _, t in _tensors(model):
        fp16[part] += t.numel() * FP16
    if spec is not None:
        quantize_modules(model, spec, {}, {}, where)
    exported = dict.fromkeys(PARTS, 0)
    for part, module, leaf, t in _tensors(model):
        exported[part] += _exported_bytes(module, leaf, t)
    kv = kv_cache_elements(cfg, max_seq_len)
    return Plan(fp16, exported, {"fp16": kv * FP16, "fp32": kv * FP32}, max_seq_len, spec)


def moe_llava_config(cfg: MoteConfig, experts: int = PAPER["experts"]) -> MoteConfig:
    """MoE-LLaVA's layout on the same backbone: every FFN replaced by `experts` fp16 copies of it plus a router.
    In our module tree that is `experts` routed experts of the FFN's width in every layer; its plan minus the shared
    part (MoE-LLaVA has none) is the baseline."""
    moe = dataclasses.replace(cfg.moe, num_experts=experts, expert_intermediate_size=cfg.intermediate_size,
                              moe_layers=tuple(range(cfg.num_hidden_layers)))
    return dataclasses.replace(cfg, moe=moe)


def paper_framing(cfg: MoteConfig, ours: Plan) -> dict:
    """Non-embedding weight bytes of: the dense backbone in fp16 (our layout keeps its FFN as the shared expert, so:
    our plan without routed experts and router), MoE-LLaVA's 16 fp16 experts, and this MoTE in fp16 and as
    exported. Meant for the paper's shapes (every layer a MoE layer, the shared expert the FFN's width)."""
    llava = plan(moe_llava_config(cfg), max_seq_len=1)
    return {
        "dense_fp16": ours.total("fp16", True) - ours.fp16["routed"] - ours.fp16["router"],
        "moe_llava_fp16": llava.total("fp16", True) - llava.fp16["shared"],
        "mote_fp16": ours.total("fp16", True),
        "mote_exported": ours.total("exported", True),
        "mote_routed_fp16": ours.fp16["routed"],
        "mote_routed_exported": ours.exported["routed"],
        "moe_llava_experts": PAPER["experts"],
        "mote_routed_experts": cfg.moe.num_experts,
        "layers": cfg.num_hidden_layers,
    }
