"""Greedy generation over the three programs, for any runtime.

A *runner* exposes the three programs as the deployed artifact does, with the KV cache kept inside the runner:

    runner.vision_encoder(pixel_values) -> image_embeds [1, N, d]
    runner.token_embedding(tokens [1,T]) -> embeds [1, T, d]
    runner.text_decoder(embeds [1,T,d], input_pos [1]) -> logits [1, T, vocab]
    runner.reset()                                        (empties the cache)

`EagerRunner` is the PyTorch reference; each target provides its own runner over its real runtime, and the same
`greedy_generate` drives both, so token-by-token agreement compares the runtimes and nothing else.
"""
from __future__ import annotations

import torch

from .errors import InputError
from .model import MoteForConditionalGeneration
from .tokenizer import SpecialIds


class EagerRunner:
    def __init__(self, model: MoteForConditionalGeneration, max_seq_len: int):
        self.model, self.max_seq_len = model.eval(), max_seq_len
        self.reset()

    def reset(self):
        self.k, self.v = self.model.new_cache(self.max_seq_len)

    @torch.no_grad()
    def vision_encoder(self, pixel_values):
        return self.model.encode_image(pixel_values)

    @torch.no_grad()
    def token_embedding(self, tokens):
        return self.model.embed(tokens)

    @torch.no_grad()
    def text_decoder(self, embeds, input_pos):
        logits, self.k, self.v = self.model.decode(embeds, input_pos, self.k, self.v)
        return logits


def prompt_embeds(runner, tokens: list[int], pixel_values: torch.Tensor | None,
                  image_token_id: int | None) -> torch.Tensor:
    """Embeddings of the prompt ids, each image placeholder id replaced by the whole image's embeddings."""
    parts, start = [], 0
    for i, tok in enumerate(tokens + [None]):
        is_image = tok is not None and tok == image_token_id
        if is_image or tok is None:
            if i > start:
                parts.append(runner.token_embedding(torch.tensor([tokens[start:i]], dtype=torch.long)))
            if is_image:
                if pixel_values is None:
                    raise ValueError("the prompt has an image placeholder but no image was given")
                parts.append(runner.vision_encoder(pixel_values))
            start = i + 1
    return torch.cat(parts, dim=1)


def greedy_generate(runner, tokens: list[int], pixel_values: torch.Tensor | None, max_new_tokens: int,
                    special: SpecialIds, stop_at_eos: bool = True) -> tuple[list[int], list[torch.Tensor]]:
    """Prefill the prompt ids in one call, then decode one token per call until one of `special.eos` (none known:
    until max_new_tokens). Returns (new tokens, logits per step)."""
    runner.reset()
    embeds = prompt_embeds(runner, list(tokens), pixel_values, special.image)
    if embeds.shape[1] > runner.max_seq_len:
        raise InputError(f"the prompt takes {embeds.shape[1]} positions (text + image) but the KV cache holds "
                         f"{runner.max_seq_len}; use a shorter prompt or export with a larger --max-seq-len")
    pos = 0
    logits = runner.text_decoder(embeds, torch.tensor([pos], dtype=torch.long))[:, -1]
    pos += embeds.shape[1]
    out, all_logits = [], [logits]
    for _ in range(max_new_tokens):
        tok = int(torch.argmax(logits, dim=-1)[0])
        out.append(tok)
        if (stop_at_eos and tok in special.eos) or len(out) == max_new_tokens or pos >= runner.max_seq_len:
            break
        emb = runner.token_embedding(torch.tensor([[tok]], dtype=torch.long))
        logits = runner.text_decoder(emb, torch.tensor([pos], dtype=torch.long))[:, -1]
        all_logits.append(logits)
        pos += 1
    return out, all_logits
