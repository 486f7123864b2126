"""Load a model directory (DESIGN.md section 2) into the reference model, refusing bad input with one clear line.

- safetensors only (single file or sharded with `model.safetensors.index.json`); pickle checkpoints are refused,
  never opened;
- routed experts either latent float weights or pre-quantized: int8 trits + `weight_scale`;
- the Hugging Face Qwen2-MoE layout, including the transformers 5.x fused expert tensors
  `mlp.experts.gate_up_proj [E, 2I, d]` and `mlp.experts.down_proj [E, d, I]`;
- the module tree is built on the meta device; tensors are read one at a time with pread (not memory-mapped), only
  when they are converted, so no more than one tensor of the file is held beside the converted weights;
- routed experts are ternarised as they are read (latent float weights: absmean; pre-quantized: checked trits) and
  kept only as packed 2-bit codes + scales (`export.trits`), so no float copy of the experts ever exists: a
  Qwen2.5-0.5B-shaped MoTE (1.75 B weights) is held in about 2.3 GB instead of 7 GB of fp32 (a config needing
  absurd memory or absurdly many tensors is refused before reading, in `config`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from . import semantics
from .config import MoteConfig, load_config
from .errors import InputError
from .model import HFVisionTower, MoteForConditionalGeneration, QuantizedEmbedding, QuantizedLinear, TernaryLinear
from .quantization import QuantSpec, part_of
from .rope import rope_frequencies
from .trits import pack_trits

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = "model.safetensors.index.json"
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def load_model(model_dir: str | Path, quantization: QuantSpec | None = None) -> MoteForConditionalGeneration:
    """Validate and load a model directory into an eval-mode fp32 reference model with packed routed experts.

    With `quantization` (`--quantize`), the chosen full-precision linears and the embedding are quantized as they
    are read (`QuantizedLinear` / `QuantizedEmbedding`: int8 values + scales), so their fp32 copies never exist
    together: this model is the reference that holds the same quantized weights as the artifact.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: not a directory")
    cfg = load_config(model_dir)
    files = _tensor_files(model_dir)
    with torch.device("meta"):
        model = MoteForConditionalGeneration(cfg)
    state, file_names = _canonical_names(_index_tensors(files), cfg)
    state = _unfuse_experts(state, cfg)
    _drop_unused(state, model)
    _mark_prequantized(model, state)
    quantized = quantize_modules(model, quantization, state, file_names, model_dir) if quantization else {}
    expected = model.state_dict()
    for module_name, module in quantized.items():    # the files hold the float weight; it is quantized as read
        del expected[f"{module_name}.qweight"], expected[f"{module_name}.qscale"]
        expected[f"{module_name}.weight"] = torch.empty(module.out_features, module.in_features, device="meta")
    missing = [k for k in expected if k not in state]
    if missing:
        raise InputError(f"{model_dir}: missing tensor '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    ternary = {name: m for name, m in model.named_modules() if isinstance(m, TernaryLinear)}
    # Read, check and convert one tensor at a time; a routed expert's weight is packed as soon as its parts are in.
    weights, pending = {}, {}
    for name in list(state):
        lazy, where = state.pop(name)
        shown = file_names.get(name, name)             # errors name the tensor as the file does
        if name not in expected:
            raise InputError(f"{where}: unexpected tensor '{shown}' for this config")
        tensor = lazy.read()
        _check_tensor(shown, tensor, expected[name], where)
        weight = tensor.to(expected[name].dtype).reshape(expected[name].shape)
        del tensor
        if weight.is_floating_point() and not _all_finite(weight):
            raise InputError(f"{where}: tensor '{shown}' contains NaN or Inf")
        module_name, _, leaf = name.rpartition(".")
        if module_name in quantized and leaf == "weight":
            module = quantized[module_name]
            q, scale = _quantized_rows(weight, module.bits, module.group_size)
            weights[f"{module_name}.qweight"], weights[f"{module_name}.qscale"] = q, scale
            del weight
            continue
        module = ternary.get(module_name)
        if module is None:
            weights[name] = weight
            continue
        parts = pending.setdefault(module_name, {})
        parts[leaf] = weight
        if "weight" in parts and (module.weight_scale is None or "weight_scale" in parts):
            weights.update(_packed(module_name, module, pending.pop(module_name)))
    for module in ternary.values():
        module.set_packed(torch.empty(module.out_features, (module.in_features + 3) // 4, dtype=torch.uint8,
                                      device="meta"),
                          torch.empty(module.out_features if module.per_channel else 1, device="meta"))
    model.load_state_dict(weights, assign=True, strict=True)
    model.inv_freq = rope_frequencies(cfg)[0]   # a non-persistent buffer (not in the files), built on meta above
    return model.eval()


QUANTIZE_ROWS = 4096   # rows quantized at a time: the quantizer's float temporaries stay small (a vocabulary is 150k)


def _quantized_rows(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`semantics.quantize_weight` a block of rows at a time (its groups never span rows, so the result is the same):
    a 151936 x 2048 embedding would otherwise hold four 1.2 GB float temporaries at once."""
    out, k = weight.shape
    q = torch.empty(out, k, dtype=torch.int8)
    scale = torch.empty(out, k // group_size)
    for start in range(0, out, QUANTIZE_ROWS):
        rows = slice(start, start + QUANTIZE_ROWS)
        q[rows], scale[rows] = semantics.quantize_weight(weight[rows], bits, group_size)
    return q, scale


def quantize_modules(model, spec: QuantSpec, state, file_names, model_dir: Path) -> dict[str, QuantizedLinear]:
    """Swap the modules `spec` quantizes for their quantized form (on meta; filled as the tensors are read).

    A tied output head gets its own module, read from the embedding's tensor, when either side is quantized: the
    token embedding is another program, and the two may be quantized differently. A group that does not divide a
    module's input width is refused before any tensor is read."""
    cfg = model.config
    if cfg.tie_word_embeddings and (spec.bits_of("embed") or spec.bits_of("lm_head")):
        with torch.device("meta"):
            model.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        embed = "model.embed_tokens.weight"
        if embed in state:
            state["lm_head.weight"] = state[embed]
            file_names["lm_head.weight"] = file_names.get(embed, embed)
    out = {}
    for name, module in list(model.named_modules()):
        bits = spec.bits_of(part_of(name))
        if bits is None or not (isinstance(module, nn.Linear) or (name == "model.embed_tokens")):
            continue
        k = module.embedding_dim if isinstance(module, nn.Embedding) else module.in_features
        group = spec.group_size(bits, k)
        if k % group:
            raise InputError(f"{model_dir}: --quantize group {group} does not divide the input width {k} of "
                             f"'{name}' (use group=channel, or a group that divides {k})")
        with torch.device("meta"):
            if isinstance(module, nn.Embedding):
                new = QuantizedEmbedding(module.num_embeddings, module.embedding_dim, bits, group)
            else:
                new = QuantizedLinear(module.in_features, module.out_features, module.bias is not None, bits, group)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        out[name] = new
    return out


def _packed(module_name: str, module: TernaryLinear, parts: dict) -> dict[str, torch.Tensor]:
    """A routed-expert projection's checked weight (latent float, or int8 trits + scale) -> packed codes + scale."""
    if "weight_scale" in parts:
        trits, scale = parts["weight"], parts["weight_scale"]
    else:
        trits, scale = semantics.ternarize(parts["weight"], module.per_channel)
    return {f"{module_name}.packed_trits": pack_trits(trits), f"{module_name}.trit_scale": scale.reshape(-1).clone()}


def _tensor_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = set(weight_map.values())
            files = sorted(model_dir / f for f in names)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise InputError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from None
        for name in sorted(names):
            if Path(name).name != name or not name.endswith(".safetensors"):
                raise InputError(f"{index}: shard '{name}' must be a .safetensors file name inside the model directory")
        for f in files:
            if not f.is_file():
                raise InputError(f"{index}: shard '{f.name}' does not exist")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise InputError(f"{model_dir / pickles[0]}: pickle checkpoints are refused (loading one runs arbitrary "
                         f"code); convert it to .safetensors")
    raise InputError(f"{model_dir}: no *.safetensors weights found")


def _open(f: Path):
    """Read tensors with pread(2), each into its own buffer, not as views of one memory map of the file: a view
    keeps every page of the file it touched resident until the file's last tensor is freed, so converting a
    single-file 3.5 GB bf16 checkpoint to fp32 would peak at fp32 + the whole file (10.1 GiB instead of 6.9 GiB for
    the Qwen2.5-0.5B-shaped MoTE of tools/scale_check.py)."""
    try:
        return safe_open(str(f), framework="pt", backend="pread")
    except TypeError:                 # safetensors < 0.8 has no `backend`: memory-mapped (correct, more memory)
        return safe_open(str(f), framework="pt")


class _Lazy:
    """One tensor (or one expert's slice of a fused tensor) of a safetensors file, read only when asked."""

    def __init__(self, path: Path, name: str, index: tuple = ()):
        self.path, self.name, self.index = path, name, index

    def part(self, *index) -> "_Lazy":
        return _Lazy(self.path, self.name, index)

    def shape(self) -> list[int]:
        with _open(self.path) as handle:
            return list(handle.get_slice(self.name).get_shape())

    def read(self) -> torch.Tensor:
        try:
            with _open(self.path) as handle:
                if not self.index:
                    return handle.get_tensor(self.name)
                return handle.get_slice(self.name)[self.index].contiguous()
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            why = (str(e).splitlines() or [type(e).__name__])[0]
            raise InputError(f"{self.path}: tensor '{self.name}' is not readable ({why})") from None


def _index_tensors(files: list[Path]) -> dict[str, tuple[_Lazy, Path]]:
    """Every tensor name of the files (headers only: no tensor is read here)."""
    state: dict[str, tuple[_Lazy, Path]] = {}
    for f in files:
        try:
            with _open(f) as handle:
                for name in handle.keys():
                    if name in state:
                        raise InputError(f"{f}: tensor '{name}' is also in {state[name][1].name}")
                    state[name] = (_Lazy(f, name), f)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            why = (str(e).splitlines() or [type(e).__name__])[0]
            raise InputError(f"{f}: not a readable safetensors file ({why})") from None
    return state


# LLaVA checkpoints name the language model, tower and projector in the transformers 4.x layout
# (`language_model.model.*`, `vision_tower.vision_model.*`), the 5.x in-memory one (`model.language_model.*`,
# `model.vision_tower.*`) or as 5.x saves them (`language_model.model.*`, `vision_tower.*`); transformers reads all
# three (conversion_mapping.py, "llava" and "CLIPVisionModel"). Ours: `model.*`, `lm_head.*`, `vision_tower.*`,
# `multi_modal_projector.*`.
_LLAVA_PREFIXES = [
    (re.compile(r"^(language_model\.)?lm_head\."), "lm_head."),
    (re.compile(r"^(language_model\.model|model\.language_model|language_model)\."), "model."),
    (re.compile(r"^(model\.)?vision_tower\.(vision_model\.)?"), "vision_tower."),
    (re.compile(r"^(model\.)?multi_modal_projector\."), "multi_modal_projector."),
]


def _canonical_names(state, cfg: MoteConfig):
    """Rename a LLaVA checkpoint's tensors to our module names; returns (state, {our name: the file's name})."""
    if cfg.source_format != "llava":
        return state, {}
    out, file_names = {}, {}
    for name, value in state.items():
        new = name
        for pattern, replacement in _LLAVA_PREFIXES:
            if pattern.match(name):
                new = pattern.sub(replacement, name, count=1)
                break
        if new in out:
            raise InputError(f"{value[1]}: tensors '{file_names[new]}' and '{name}' are the same weight '{new}'")
        out[new], file_names[new] = value, name
    return out, file_names


def _drop_unused(state, model) -> None:
    """Tensors a LLaVA vision tower holds that LLaVA's output never depends on (later layers, post-norm, SigLIP
    head): transformers loads and never runs them, we do not load them."""
    if isinstance(model.vision_tower, HFVisionTower):
        for name in model.vision_tower.unused_tensor_names(list(state), "vision_tower."):
            del state[name]


def _unfuse_experts(state, cfg: MoteConfig):
    """transformers 5.x stores experts fused: gate_up_proj [E, 2I, d] (gate rows first), down_proj [E, d, I]."""
    fused = {k: v for k, v in state.items() if _FUSED.match(k)}
    if not fused:
        return state
    out = {k: v for k, v in state.items() if k not in fused}
    e_n, inter, d = cfg.moe.num_experts, cfg.moe.expert_intermediate_size, cfg.hidden_size
    for name, (tensor, where) in fused.items():
        prefix, kind = _FUSED.match(name).groups()
        want = (e_n, 2 * inter, d) if kind == "gate_up_proj" else (e_n, d, inter)
        shape = tensor.shape()
        if tuple(shape) != want:
            raise InputError(f"{where}: tensor '{name}' has shape {shape}, expected {list(want)}")
        for e in range(e_n):
            parts = ({"gate_proj": tensor.part(e, slice(0, inter)), "up_proj": tensor.part(e, slice(inter, 2 * inter))}
                     if kind == "gate_up_proj" else {"down_proj": tensor.part(e)})
            for proj, part in parts.items():
                key = f"{prefix}.{e}.{proj}.weight"
                if key in out:
                    raise InputError(f"{where}: tensor '{name}' and tensor '{key}' (in {out[key][1].name}) both hold "
                                     f"the weights of expert {e}")
                out[key] = (part, where)
    return out


def _mark_prequantized(model, state) -> None:
    """A routed-expert projection with a `weight_scale` tensor is pre-quantized: switch its module to int8 trits."""
    for name, module in model.named_modules():
        if isinstance(module, TernaryLinear) and f"{name}.weight_scale" in state:
            scale_shape = (module.out_features, 1) if module.per_channel else ()
            module.set_prequantized(torch.empty(module.out_features, module.in_features, dtype=torch.int8, device="meta"),
                                    torch.empty(scale_shape, device="meta"))


def _check_tensor(name, tensor, expected, where) -> None:
    if name.endswith(".weight_scale"):
        if tensor.dtype not in FLOAT_DTYPES:
            raise InputError(f"{where}: tensor '{name}' has dtype {_dt(tensor)}, expected a float scale")
        if tensor.numel() != expected.numel():
            raise InputError(f"{where}: tensor '{name}' has shape {list(tensor.shape)}, expected "
                             f"{list(expected.shape) or 'a scalar'} ({expected.numel()} values)")
        if not torch.isfinite(tensor).all() or (tensor <= 0).any():
            raise InputError(f"{where}: tensor '{name}' has non-positive or non-finite scales")
        return
    if tuple(tensor.shape) != tuple(expected.shape):
        raise InputError(f"{where}: tensor '{name}' has shape {list(tensor.shape)}, expected {list(expected.shape)}")
    if expected.dtype == torch.int8:
        if tensor.dtype != torch.int8:
            raise InputError(f"{where}: tensor '{name}' (pre-quantized trits) has dtype {_dt(tensor)}, expected int8")
        bad = (tensor < -1) | (tensor > 1)
        if bad.any():
            raise InputError(f"{where}: tensor '{name}' has {int(bad.sum())} values outside {{-1, 0, 1}} "
                             f"(e.g. {int(tensor[bad][0])}); pre-quantized trits must be ternary")
        return
    if tensor.dtype not in FLOAT_DTYPES:
        raise InputError(f"{where}: tensor '{name}' has dtype {_dt(tensor)}, expected float32, float16 or bfloat16")
    # NaN/Inf is checked after the conversion to fp32 (see load_model), where it is cheap: _all_finite.


def _all_finite(t: torch.Tensor) -> bool:
    """A sum is finite iff every element is, unless the sum itself overflows: then look element by element."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def save_model(model: MoteForConditionalGeneration, model_dir: str | Path, prequantize: bool = False) -> None:
    """Write config.json + model.safetensors (byte-identical for the same model).

    With `prequantize`, routed experts are stored as int8 trits + `weight_scale` instead of latent float weights;
    packed experts (a loaded model) are always stored so, their latent weights being gone.
    """
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        tensors[name] = t.detach().contiguous().clone()
    for name, module in model.named_modules():
        if isinstance(module, TernaryLinear) and (module.packed or (prequantize and not module.prequantized)):
            tensors.pop(f"{name}.packed_trits", None)
            tensors.pop(f"{name}.trit_scale", None)
            with torch.no_grad():
                trits, scale = module.ternary_weight()
                tensors[f"{name}.weight"] = trits.to(torch.int8).contiguous()
                tensors[f"{name}.weight_scale"] = scale.detach().reshape(-1).contiguous()
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    (model_dir / "config.json").write_text(json.dumps(model.config.to_json_dict(), indent=2, sort_keys=True) + "\n")
    save_file(dict(sorted(tensors.items())), str(model_dir / "model.safetensors"), metadata={"format": "pt"})
