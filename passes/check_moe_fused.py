"""Check: every MoE layer the config declares is one `mote.moe_ffn`, and no routed expert is left outside it.

Not a rewrite: the graphs are unchanged. After PIPELINE, with `moe_layers = (1, 3)` in the config:

    text_decoder:  mote.moe_ffn(..., router = model.model.layers.1.mlp.gate.weight, ...)     layer 1: one op
                   mote.moe_ffn(..., router = model.model.layers.3.mlp.gate.weight, ...)     layer 3: one op
    every program: every routed-expert constant (an FQN with `.experts.`) is a packed-code or scale operand of a
                   mote.moe_ffn; so no float or int8 expert weight, no per-expert `...mlp.experts.N....`
                   constant and no mote.unpack_trits / mote.ternary_linear of a routed expert is left

Anything else stops the export with one line (PipelineError, exit 1) naming the first layer and what did not
match, e.g.

    model.layers.1.mlp: MoE block was not fused into mote::moe_ffn (routed experts left as 12
    mote.ternary_linear ops; fuse_moe_block did not run on it)

A target reports what its lowering of mote.moe_ffn stores and reads; a block that was never fused must not reach
it, or the report would describe a rewrite that is not in the artifact.
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch

from mote.export.errors import PipelineError

from .fuse_moe_block import why_not_fused
from .match import is_op
from .ops import MoeFfnArgs
from .program import CONSTANT_KINDS, spec_for

MOE_FFN = torch.ops.mote.moe_ffn.default
UNFUSED_OPS = (torch.ops.mote.unpack_trits.default, torch.ops.mote.ternary_linear.default)
ROUTED = ".experts."               # every routed-expert constant, as loaded and as the passes name them
# export.programs wraps the model as `self.model`: program FQNs are the model's own with this prefix.
PROGRAM_PREFIX = "model."
_MLP = re.compile(r"^(?P<module>.*\blayers\.(?P<layer>\d+)\.mlp)(\.|$)")


def _mlp(path: str) -> tuple[str, int | None]:
    """FQN or module path -> (the MoE module as the model names it, its layer index); unknown: (path, None)."""
    m = _MLP.match(path)
    if m is None:
        return path, None
    return m["module"].removeprefix(PROGRAM_PREFIX), int(m["layer"])


def _module_of(node) -> str:
    """The innermost module a traced node came from (torch.export's nn_module_stack)."""
    stack = list(node.meta.get("nn_module_stack", {}).values())
    return stack[-1][0] if stack else ""


def _leftovers(ep) -> dict[str, dict[str, set]]:
    """Routed-expert constants not read as mote.moe_ffn operands, by MoE module: {module: {what: {items}}}.

    What reads them names the leftover: a mote.unpack_trits / mote.ternary_linear op (counted once per op), or,
    read by anything else or nothing, the constant itself by dtype (a float or int8 weight, or a scale).
    """
    out = defaultdict(lambda: defaultdict(set))
    for node in ep.graph.nodes:
        spec = spec_for(ep, node) if node.op == "placeholder" else None
        if spec is None or spec.kind not in CONSTANT_KINDS or ROUTED not in spec.target:
            continue
        stray = [u for u in node.users if not (is_op(u, MOE_FFN) and node in MoeFfnArgs.of(u).routed_operands())]
        if node.users and not stray:
            continue
        module = _mlp(spec.target)[0]
        mote_readers = [u for u in stray if is_op(u, *UNFUSED_OPS)]
        for u in mote_readers:
            out[module][f"{u.target.name().replace('::', '.')} ops"].add(u)
        if not mote_readers:
            value = node.meta["val"]
            kind = "weights" if value.dim() >= 2 else "scales"
            out[module][f"{str(value.dtype).removeprefix('torch.')} {kind}"].add(spec.target)
    return out


def _describe(left: dict[str, set]) -> str:
    """'12 mote.unpack_trits ops, 12 float32 scales': the ops first, they say which rewrite stopped short."""
    order = sorted(left.items(), key=lambda kv: (not kv[0].startswith("mote."), kv[0]))
    return ", ".join(f"{len(items)} {what}" for what, items in order)


def _why_unfused(ep, layer: int) -> str:
    """Why the block of `layer` was not fused: the matcher's first failed check at its top-k node(s)."""
    topks = [n for n in ep.graph.nodes if is_op(n, torch.ops.aten.topk.default) and _mlp(_module_of(n))[1] == layer]
    if not topks:
        return "no top-k routing found in this layer"
    reasons = [why_not_fused(ep, t) for t in topks]
    missed = next((r for r in reasons if r is not None), None)
    return f"fuse_moe_block: {missed}" if missed else "its pattern matches, so fuse_moe_block did not run on it"


def check_moe_fused(programs: dict, moe_layers: tuple[int, ...]) -> list[int]:
    """Raise PipelineError unless every declared MoE layer is exactly one fused op and no routed expert is left.

    Returns the layers whose block is a mote.moe_ffn (read from the text_decoder's router constants).
    """
    decoder = programs.get("text_decoder")
    if decoder is None:
        raise PipelineError("no text_decoder program to check the MoE layers in")
    fused = defaultdict(list)
    for node in decoder.graph.nodes:
        if is_op(node, MOE_FFN):
            module, layer = _mlp(spec_for(decoder, node.args[5]).target)   # the router weight's FQN
            fused[layer].append(module)
    leftovers = defaultdict(dict)
    for ep in programs.values():
        for module, left in _leftovers(ep).items():
            for what, items in left.items():
                leftovers[module].setdefault(what, set()).update(items)

    problems = []   # (module, one line)
    for layer in moe_layers:
        ops = fused.get(layer, [])
        module = next((m for m in [*ops, *leftovers] if _mlp(m)[1] == layer), f"layer {layer}")
        if not ops:
            left = leftovers.get(module)
            problems.append((module, f"{module}: MoE block was not fused into mote::moe_ffn ("
                             + (f"routed experts left as {_describe(left)}; " if left else "")
                             + f"{_why_unfused(decoder, layer)})"))
        elif len(ops) > 1:
            problems.append((module, f"{module}: {len(ops)} mote::moe_ffn ops for one MoE block"))
        elif module in leftovers:
            problems.append((module, f"{module}: fused into mote::moe_ffn, but routed experts are left as "
                             f"{_describe(leftovers[module])}"))
    for layer in sorted(set(fused) - set(moe_layers), key=str):
        problems.append((fused[layer][0], f"{fused[layer][0]}: a mote::moe_ffn in a layer the config does not "
                         "declare as MoE"))
    named = {m for m, _ in problems}
    for module, left in sorted(leftovers.items()):
        if module not in named and _mlp(module)[1] not in moe_layers:
            problems.append((module, f"{module}: routed experts left as {_describe(left)} outside any MoE layer the "
                             "config declares"))
    if problems:
        more = [m for m, _ in problems[1:]]
        raise PipelineError(problems[0][1] + (f"; also {', '.join(more)}" if more else ""))
    return sorted(fused)
