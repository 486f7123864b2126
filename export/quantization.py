"""`--quantize SPEC`: which full-precision parts of a MoTE get post-training quantized, to how many bits, in which
groups (DESIGN.md section 4). The numerics are `semantics.quantize_weight`; the loader applies them as it reads
(`export.loader`), the pass `fuse_quantized_linear` turns them into `mote::` ops, and every target lowers those.

    SPEC   = PRESET | PART=SCHEME | SPEC,SPEC ...   (later entries override earlier ones)
    PRESET = int8 | int4 (aliases: 8da4w and 4w, ExecuTorch's names; ORT calls int4 "block-wise int4")
    PART   = embed | attn | shared | router | lm_head | vision
    SCHEME = fp32 | int8 | int4
    group=32|64|128|256|channel   the group along K of every quantized part (default: 32 for int4, channel for int8)

    int8 = embed, attn, shared, lm_head, vision: int8 per output channel
    int4 = shared, attn: int4 in groups of 32; lm_head, embed, vision: int8; router: fp32

The parts (module names as `export.model` builds them, which follow the Hugging Face layouts):
- embed: `model.embed_tokens` (quantized as a gather: `mote.quantized_embedding`);
- attn: `model.layers.N.self_attn.{q,k,v,o}_proj`;
- shared: the shared experts `model.layers.N.mlp.shared_expert.*` and the FFNs of dense (non-MoE) layers, the
  model's other full-precision SwiGLU FFNs;
- router: `model.layers.N.mlp.gate` and the shared-expert gate; kept fp32 (a rounding error there flips expert
  choices; refused otherwise);
- lm_head: the output projection (a tied one gets its own quantized copy: the token embedding is another program);
- vision: the vision tower's linears and the projector (the patch embedding, a convolution, stays fp32).
Routed experts are ternary whatever the spec says.
"""
from __future__ import annotations

import dataclasses
import re

from .errors import InputError

PARTS = ("embed", "attn", "shared", "router", "lm_head", "vision")
SCHEMES = {"fp32": None, "int8": 8, "int4": 4}
GROUPS = (32, 64, 128, 256)
DEFAULT_GROUP = {4: 32, 8: None}        # None: per output channel
PRESETS = {
    "int8": {"embed": "int8", "attn": "int8", "shared": "int8", "router": "fp32", "lm_head": "int8", "vision": "int8"},
    "int4": {"embed": "int8", "attn": "int4", "shared": "int4", "router": "fp32", "lm_head": "int8", "vision": "int8"},
}
ALIASES = {"8da4w": "int4", "4w": "int4"}


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Per part: its bits (None: fp32); `group`: the group size along K (None: each scheme's default)."""

    bits: dict
    group: int | str | None = None      # 32, 64, 128, 256, "channel" or None (default)
    text: str = ""

    def bits_of(self, part: str | None) -> int | None:
        return self.bits.get(part) if part is not None else None

    def group_size(self, bits: int, k: int) -> int:
        """The group along K of a `bits`-bit weight with K inputs (K itself: per output channel)."""
        group = self.group if self.group is not None else DEFAULT_GROUP[bits]
        return k if group in (None, "channel") else int(group)

    @property
    def canonical(self) -> str:
        """The spec with every part spelled out, e.g. `attn=int4,embed=int8,...,group=32` (for report.json)."""
        parts = ",".join(f"{p}={'fp32' if self.bits.get(p) is None else f'int{self.bits[p]}'}" for p in PARTS)
        return parts + (f",group={self.group}" if self.group is not None else "")

    def as_dict(self) -> dict:
        return {"spec": self.text, "parts": {p: (None if self.bits.get(p) is None else f"int{self.bits[p]}")
                                             for p in PARTS},
                "group": self.group if self.group is not None else {f"int{b}": DEFAULT_GROUP[b] or "channel"
                                                                    for b in sorted(DEFAULT_GROUP)}}

    @property
    def used_bits(self) -> set[int]:
        return {b for b in self.bits.values() if b is not None}


def parse(text: str) -> QuantSpec:
    """`--quantize` text -> QuantSpec; a bad entry is an InputError (exit 2) naming it."""
    bits: dict[str, int | None] = {p: None for p in PARTS}
    group = None
    entries = [e.strip() for e in text.split(",")]
    if not text.strip() or any(not e for e in entries):
        raise InputError(f"--quantize {text!r}: empty entry (expected e.g. int4, or shared=int4,attn=int8)")
    for entry in entries:
        name = ALIASES.get(entry, entry)
        if name in PRESETS:
            bits.update({p: SCHEMES[s] for p, s in PRESETS[name].items()})
            continue
        key, sep, value = entry.partition("=")
        if not sep:
            raise InputError(f"--quantize: unknown preset {entry!r} (presets: {', '.join([*PRESETS, *ALIASES])}; or "
                             f"PART=SCHEME with PART in {', '.join(PARTS)})")
        if key == "group":
            if value != "channel" and not (value.isdigit() and int(value) in GROUPS):
                raise InputError(f"--quantize: group={value!r} (expected one of {', '.join(map(str, GROUPS))} "
                                 f"or channel)")
            group = value if value == "channel" else int(value)
            continue
        if key not in PARTS:
            raise InputError(f"--quantize: unknown part {key!r} (parts: {', '.join(PARTS)}, and group=)")
        if value not in SCHEMES:
            raise InputError(f"--quantize: {key}={value!r} (schemes: {', '.join(SCHEMES)})")
        if key == "router" and value != "fp32":
            raise InputError(f"--quantize: router={value} is not supported: the router stays fp32 (E x d weights; a "
                             "rounding error there changes which expert a token takes)")
        bits[key] = SCHEMES[value]
    return QuantSpec(bits=bits, group=group, text=text)


_LAYER = r"model\.layers\.\d+\."
_PART_PATTERNS = [
    ("embed", re.compile(r"^model\.embed_tokens$")),
    ("lm_head", re.compile(r"^lm_head$")),
    ("attn", re.compile(_LAYER + r"self_attn\.(q|k|v|o)_proj$")),
    ("shared", re.compile(_LAYER + r"mlp\.(shared_expert\.)?(gate|up|down)_proj$")),
    ("router", re.compile(_LAYER + r"mlp\.(gate|shared_expert_gate)$")),
    ("vision", re.compile(r"^(vision_tower\..*|multi_modal_projector\..*)$")),
]


def part_of(module_name: str) -> str | None:
    """The part a full-precision module belongs to (None: not a quantizable module, e.g. a routed expert)."""
    if ".experts." in module_name or module_name == "vision_tower.patch_embed":   # ternary; a convolution's weight
        return None
    for part, pattern in _PART_PATTERNS:
        if pattern.match(module_name):
            return part
    return None
