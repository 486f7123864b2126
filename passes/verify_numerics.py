"""Check: run a program on sample inputs before and after the pipeline and fail loudly if the numerics changed.

Not a rewrite: the graph is unchanged. The rewrites are meant to be exact (each fused op's reference kernel runs
the functions the eager model runs), so the tolerance is float rounding only.
"""
from __future__ import annotations

import torch
from torch.export.graph_signature import OutputKind

from mote.export.errors import MoteError

RTOL = ATOL = 1e-5


class PassNumericsError(MoteError):
    """A graph pass changed what the program computes: a bug in the pass, not in the input."""


@torch.no_grad()
def run_program(ep, inputs) -> list[torch.Tensor]:
    """Run `ep` on `inputs` without leaving a trace in its mutable buffers (the KV cache stays as exported)."""
    mutated = [s.target for s in ep.graph_signature.output_specs if s.kind == OutputKind.BUFFER_MUTATION]
    saved = {t: ep.state_dict[t].clone() for t in mutated if t in ep.state_dict}
    module = ep.module()
    for name, buf in module.named_buffers():   # the unlifted module may share storage with the program
        if name in saved:
            buf.copy_(saved[name])
    try:
        out = module(*inputs)
    finally:
        for t, v in saved.items():
            ep.state_dict[t].copy_(v)
    return [o.detach().clone() for o in (out if isinstance(out, (tuple, list)) else [out])]


def check_numerics(name: str, expected: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """Returns the max abs difference; raises PassNumericsError past float rounding."""
    worst = 0.0
    for i, (a, b) in enumerate(zip(expected, got)):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=RTOL, atol=ATOL):
            diff = (a - b).abs().max().item() if a.shape == b.shape else float("inf")
            raise PassNumericsError(f"graph passes changed the numerics of {name} output {i} (max abs diff {diff:.3g})")
        worst = max(worst, (a - b).abs().max().item() if a.numel() else 0.0)
    return worst
