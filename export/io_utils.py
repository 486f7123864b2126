"""The byte-level vocabulary of the shipped example (and of random test models).

It needs no download: tokens 0..255 are bytes, then BOS, EOS, PAD and the image placeholder. The example trains on
`encode` directly; everything else tokenizes through `byte_tokenizer_json` with the tokenizers library
(`export.tokenizer`), which gives the same ids.
"""
from __future__ import annotations

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
