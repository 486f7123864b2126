"""Numerics check of DESIGN.md section 6: a target's runner against the PyTorch reference, program by program.

Greedy decoding is compared token by token with teacher forcing on the reference tokens: both runtimes see the
same inputs at every step, so the logits stay comparable for the SQNR, and the target's argmax at each step is
exactly what its own free-running greedy decode would produce as long as all earlier tokens matched.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .generate import greedy_generate, prompt_embeds
from .tokenizer import Prompt

SQNR_CAP_DB = 300.0   # identical outputs have infinite SQNR; JSON has no infinity, so report the cap


@dataclasses.dataclass
class Tolerance:
    min_sqnr_db: float
    need_identical_greedy: bool = True


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.double(), test.double()
    noise = (ref - test).pow(2).sum().item()
    signal = ref.pow(2).sum().item()
    if noise == 0.0:
        return SQNR_CAP_DB
    return min(SQNR_CAP_DB, 10.0 * math.log10(max(signal, 1e-300) / noise))


def _stats(ref: torch.Tensor, test: torch.Tensor) -> dict:
    test = torch.as_tensor(test).to(torch.float32).reshape(ref.shape)
    return {"sqnr_db": round(sqnr_db(ref, test), 2), "max_abs_err": float((ref - test).abs().max())}


@torch.no_grad()
def compare(reference, target, prompt: Prompt, pixel_values: torch.Tensor | None, n_tokens: int = 32) -> dict:
    """Per-program numerics of `target` vs `reference` (both runners, see export.generate) on one prompt."""
    report = {}
    tokens, image = list(prompt.ids), prompt.special.image
    if pixel_values is not None:
        report["vision_encoder"] = _stats(reference.vision_encoder(pixel_values), target.vision_encoder(pixel_values))
    text = torch.tensor([[t for t in tokens if t != image]], dtype=torch.long)
    report["token_embedding"] = _stats(reference.token_embedding(text), target.token_embedding(text))

    ref_tokens, ref_logits = greedy_generate(reference, tokens, pixel_values, n_tokens, prompt.special,
                                             stop_at_eos=False)
    # Teacher-forced run of the target on the reference's inputs (reference embeddings, reference tokens).
    target.reset()
    embeds = prompt_embeds(reference, tokens, pixel_values, image)
    got = [target.text_decoder(embeds, torch.tensor([0], dtype=torch.long))[:, -1]]
    pos = embeds.shape[1]
    for tok in ref_tokens[:-1]:
        emb = reference.token_embedding(torch.tensor([[tok]], dtype=torch.long))
        got.append(target.text_decoder(emb, torch.tensor([pos], dtype=torch.long))[:, -1])
        pos += 1
    ref_all = torch.cat(ref_logits, 0)
    got_all = torch.cat([torch.as_tensor(g).reshape(1, -1).float() for g in got], 0)
    stats = _stats(ref_all, got_all)
    target_tokens = got_all.argmax(-1).tolist()
    matched = 0
    for a, b in zip(ref_tokens, target_tokens):
        if a != b:
            break
        matched += 1
    stats["greedy_match"] = f"{matched}/{len(ref_tokens)}"
    stats["reference_tokens"] = ref_tokens
    report["text_decoder"] = stats
    return report


def passed(report: dict, tol: Tolerance) -> tuple[bool, str]:
    for program, stats in report.items():
        if stats["sqnr_db"] < tol.min_sqnr_db:
            return False, f"{program}: SQNR {stats['sqnr_db']:.1f} dB < {tol.min_sqnr_db} dB"
        if "greedy_match" in stats and tol.need_identical_greedy:
            m, n = stats["greedy_match"].split("/")
            if m != n:
                return False, f"{program}: greedy tokens diverge after {m}/{n}"
    return True, "ok"
