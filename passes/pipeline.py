"""The pass pipeline: the one place that says which rewrites run, in which order.

Every target runs exactly this list; targets then lower the `mote::` ops it leaves (passes are target-free).
After the list, `check_moe_fused` and `check_quantized` make sure it did what the targets (and their reports) rely on.
"""
from __future__ import annotations

from .check_moe_fused import check_moe_fused
from .check_quantized import check_quantized
from .fuse_moe_block import fuse_moe_block
from .fuse_quantized_linear import fuse_quantized_linear
from .fuse_ternary_linear import fuse_ternary_linear
from .program import op_histogram
from .remove_dead_code import remove_dead_code
from .ternarize_expert_weights import ternarize_expert_weights
from .verify_numerics import check_numerics, run_program

PIPELINE = [
    ternarize_expert_weights,   # float/int8 routed-expert weights -> packed trits + scales (unpack_trits in graph)
    fuse_ternary_linear,        # Q8(x) . T^T * s_x * s_w            -> mote.ternary_linear
    fuse_quantized_linear,      # linear(x, dequantize(Q, S))         -> mote.quantized_linear (--quantize; also gathers)
    fuse_moe_block,             # shared + router + top-k + experts  -> mote.moe_ffn
    remove_dead_code,           # dangling nodes and unused constants
]


def run_pipeline(programs: dict, moe_layers: tuple[int, ...], verify: bool = True):
    """Run PIPELINE on each ExportedProgram in place; check numerics on its example inputs before vs after, then
    that each of `moe_layers` (the config's MoE layers) became one mote.moe_ffn (PipelineError if not).

    Returns (programs, log) where log[name] has the op histograms before/after, rewrite counts and max abs diff,
    and log["text_decoder"]["moe_ffn_layers"] the layers found fused.
    """
    log = {}
    for name, ep in programs.items():
        inputs = ep.example_inputs[0]
        expected = run_program(ep, inputs) if verify else None
        entry = {"ops_before": dict(op_histogram(ep)), "rewrites": {}}
        for p in PIPELINE:
            entry["rewrites"][p.__name__] = p(ep)
        entry["ops_after"] = dict(op_histogram(ep))
        if verify:
            entry["max_abs_diff"] = check_numerics(name, expected, run_program(ep, inputs))
        log[name] = entry
    fused = check_moe_fused(programs, tuple(moe_layers))
    log["text_decoder"]["moe_ffn_layers"] = fused
    for name, count in check_quantized(programs).items():
        log[name]["quantized_ops"] = count
    return programs, log
