"""Byte-level tokenizer, a dependency-free PNG reader/writer, and image preprocessing.

The tokenizer needs no download: tokens 0..255 are bytes, then BOS, EOS, PAD and the image placeholder.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch

from .errors import InputError

BOS, EOS, PAD, IMAGE = 256, 257, 258, 259
BYTE_VOCAB = 260


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for the 256 bytes (what a ByteLevel tokenizer.json stores)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer_json() -> dict:
    """A Hugging Face tokenizer.json for the byte-level vocabulary, so stock runners (ExecuTorch's
    MultimodalRunner, HF tokenizers) tokenize exactly like `encode`: ids 0..255 are bytes, no merges."""
    chars = _byte_to_unicode()
    specials = [("<|bos|>", BOS), ("<|eos|>", EOS), ("<|pad|>", PAD), ("<|image|>", IMAGE)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
        "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for c, i in specials],
        "pre_tokenizer": byte_level, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {chars[b]: b for b in range(256)}, "merges": []},
    }


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(tokens) -> str:
    return bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", errors="replace")


# -- PNG (8-bit RGB/RGBA/gray, non-interlaced) --------------------------------------------------------------------

def write_png(path: str | Path, rgb: torch.Tensor) -> None:
    """rgb: uint8 [H, W, 3]."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + bytes(rgb[y].contiguous().view(-1).tolist()) for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def read_png(path: str | Path) -> torch.Tensor:
    """Returns uint8 [H, W, 3]."""
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise InputError(f"{path}: not a PNG file")
    pos, idat, header = 8, b"", None
    try:
        while pos < len(data):
            (length,) = struct.unpack(">I", data[pos:pos + 4])
            kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
            pos += 12 + length
            if kind == b"IHDR":
                header = struct.unpack(">IIBBBBB", body)
            elif kind == b"IDAT":
                idat += body
            elif kind == b"IEND":
                break
        w, h, depth, color, _, _, interlace = header
        channels = {0: 1, 2: 3, 6: 4}[color]
        if depth != 8 or interlace:
            raise KeyError
        raw = zlib.decompress(idat)
    except (struct.error, KeyError, TypeError, zlib.error):
        raise InputError(f"{path}: unsupported or corrupt PNG (8-bit gray/RGB/RGBA, non-interlaced only)") from None
    stride, bpp = w * channels, channels
    out, prev = bytearray(), bytearray(stride)
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out += line
        prev = line
    img = torch.frombuffer(out, dtype=torch.uint8).view(h, w, channels).clone()
    if channels == 1:
        img = img.expand(h, w, 3)
    return img[..., :3].contiguous()


def preprocess_image(rgb: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 [H, W, 3] -> pixel_values [1, 3, S, S] in [-1, 1] (nearest resize to the tower's size)."""
    h, w, _ = rgb.shape
    x = rgb.permute(2, 0, 1).to(torch.float32)[None] / 255.0
    if (h, w) != (image_size, image_size):
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="nearest")
    return (x * 2.0 - 1.0).contiguous()
