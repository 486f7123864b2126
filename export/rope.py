"""Rotary-embedding frequencies for the RoPE types we implement, restating transformers' `modeling_rope_utils`.

Returns (inv_freq [head_dim / 2], attention_scaling): cos and sin are multiplied by `attention_scaling` (1.0 except
for YaRN). All types here are static within the exported context, so the frequencies are constants:

- default: theta ** (-2i / d);
- linear: default / factor;
- dynamic (NTK): transformers rescales theta only once a position reaches `max_position_embeddings`; our KV cache
  is at most that long (`--max-seq-len` <= max_position_embeddings), so within it dynamic equals its initial
  frequencies, computed exactly as transformers does at init;
- yarn: interpolated / extrapolated frequencies with a linear ramp, and the attention factor;
- llama3: wavelength-banded scaling.
"""
from __future__ import annotations

import math

import torch

from .config import MoteConfig


def _default(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim))


def rope_frequencies(cfg: MoteConfig) -> tuple[torch.Tensor, float]:
    r, dim = cfg.rope, cfg.head_dim
    if r.rope_type == "default":
        return _default(r.theta, dim), 1.0
    if r.rope_type == "linear":
        return _default(r.theta, dim) / r.factor, 1.0
    if r.rope_type == "dynamic":
        seq_len = cfg.max_position_embeddings
        base = r.theta * ((r.factor * seq_len / cfg.max_position_embeddings) - (r.factor - 1)) ** (dim / (dim - 2))
        return _default(base, dim), 1.0
    if r.rope_type == "yarn":
        return _yarn(cfg)
    if r.rope_type == "llama3":
        return _llama3(cfg), 1.0
    raise ValueError(f"rope_type {r.rope_type!r}")     # config.py refuses other types before we get here


def _yarn(cfg: MoteConfig) -> tuple[torch.Tensor, float]:
    r, dim, base = cfg.rope, cfg.head_dim, cfg.rope.theta
    factor = r.factor if r.factor is not None else cfg.max_position_embeddings / r.original_max_position_embeddings

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = r.attention_factor
    if attention_factor is None:
        if r.mscale and r.mscale_all_dim:
            attention_factor = float(get_mscale(factor, r.mscale) / get_mscale(factor, r.mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = r.beta_fast or 32, r.beta_slow or 1

    def correction_dim(num_rotations):
        return (dim * math.log(r.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001                                   # transformers: prevent a singular ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, attention_factor


def _llama3(cfg: MoteConfig) -> torch.Tensor:
    r = cfg.rope
    inv_freq = _default(r.theta, cfg.head_dim)
    old_context = r.original_max_position_embeddings
    low_wavelen, high_wavelen = old_context / r.low_freq_factor, old_context / r.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / r.factor, inv_freq)
    smooth = (old_context / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)
