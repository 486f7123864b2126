"""Check: every quantized weight became a `mote.quantized_linear` / `mote.quantized_embedding` operand.

Not a rewrite: the graphs are unchanged. After PIPELINE with `--quantize`, no `mote.dequantize_weight` may be left:
a target would have to lower a float matrix computed from int8 values, and the artifact would not hold what the
report says. Anything left stops the export with one line (PipelineError, exit 1) naming the weight and why the
pass missed it, e.g.

    model.layers.0.self_attn.q_proj.qweight: quantized weight was not fused (it is read by permute, not by a linear
    or an embedding)
"""
from __future__ import annotations

from mote.export.errors import PipelineError

from .fuse_quantized_linear import missed
from .ops import QUANTIZED_OPS
from .program import spec_for


def check_quantized(programs: dict) -> dict[str, int]:
    """{program: quantized ops} after the pipeline; PipelineError at the first dequantized weight left."""
    counts = {}
    for name, ep in programs.items():
        for dq, why in missed(ep):
            spec = spec_for(ep, dq.args[0]) if dq.args[0].op == "placeholder" else None
            weight = spec.target.removeprefix("model.") if spec is not None else dq.args[0].name
            raise PipelineError(f"{name}: {weight}: quantized weight was not fused ({why})")
        counts[name] = sum(1 for n in ep.graph.nodes if n.op == "call_function" and n.target in QUANTIZED_OPS)
    return counts
