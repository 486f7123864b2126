"""The canonical packed-trit storage of DESIGN.md section 4, written once (the loader, the `mote::` op kernels and
the targets' re-packing all use it).

2-bit codes `code = trit + 2` (1, 2, 3 = -1, 0, +1; code 0 is never produced), four per byte, lowest bits first
along the input dimension; the input dimension is zero-padded (code 2) to a multiple of 4. This is ONNX Runtime's
MatMulNBits/QMoE 2-bit layout with its default zero point 2, and Core ML's 2-bit palettisation with the LUT
[0, -s, 0, +s].
"""
from __future__ import annotations

import sys

import torch

ZERO_CODE = 2

# byte -> its four trits, lowest bits first: one gather decodes a whole weight (no per-element shifts). Public:
# targets that decode in their own graph gather in this table too.
TRITS_OF_BYTE = torch.tensor([[((b >> (2 * j)) & 3) - ZERO_CODE for j in range(4)] for b in range(256)],
                             dtype=torch.float32)
_CODES_OF_BYTE = (TRITS_OF_BYTE + ZERO_CODE).to(torch.uint8)


def pack_trits(trits: torch.Tensor) -> torch.Tensor:
    """Trits [..., K] (any dtype, values in {-1,0,1}) -> uint8 [..., ceil(K/4)]."""
    codes = (trits + ZERO_CODE).to(torch.uint8)
    pad = (-codes.shape[-1]) % 4
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad), value=ZERO_CODE)
    if sys.byteorder != "little":
        c = codes.reshape(*codes.shape[:-1], -1, 4)
        return c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)
    # Four codes as one little-endian int32 (code j in bits 8j..8j+1): move each to bits 2j..2j+1 in one pass over
    # a quarter as many elements (3x faster than combining four strided byte views; the loader packs ~1 B weights).
    v = codes.contiguous().view(torch.int32)
    return ((v & 0x03) | ((v >> 6) & 0x0C) | ((v >> 12) & 0x30) | ((v >> 18) & 0xC0)).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [..., ceil(K/4)] -> 2-bit codes uint8 [..., K]."""
    codes = torch.nn.functional.embedding(packed.to(torch.int32), _CODES_OF_BYTE)
    return codes.reshape(*packed.shape[:-1], -1)[..., :k]


def unpack(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [..., ceil(K/4)] -> float32 trits [..., K]."""
    trits = torch.nn.functional.embedding(packed.to(torch.int32), TRITS_OF_BYTE)
    return trits.reshape(*packed.shape[:-1], -1)[..., :k]
