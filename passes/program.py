"""Small, shared ExportedProgram surgery for the passes: constants in and out, keeping the graph signature, the
state dict and the placeholders consistent (the three must always agree for torch.export and every backend).
"""
from __future__ import annotations

import operator
from collections import Counter

import torch
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

CONSTANT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def spec_for(ep: ExportedProgram, node: torch.fx.Node) -> InputSpec | None:
    for spec in ep.graph_signature.input_specs:
        if isinstance(spec.arg, TensorArgument) and spec.arg.name == node.name:
            return spec
    return None


def constant_value(ep: ExportedProgram, node: torch.fx.Node) -> torch.Tensor | None:
    """The tensor behind a parameter / buffer / lifted-constant placeholder, else None."""
    if node.op != "placeholder":
        return None
    spec = spec_for(ep, node)
    if spec is None or spec.kind not in CONSTANT_KINDS:
        return None
    if spec.kind == InputKind.CONSTANT_TENSOR or (spec.kind == InputKind.BUFFER and not spec.persistent):
        return ep.constants[spec.target]
    return ep.state_dict[spec.target]


def add_constant(ep: ExportedProgram, fqn: str, value: torch.Tensor) -> torch.fx.Node:
    """Add a persistent buffer `fqn` holding `value`; returns its placeholder node."""
    graph = ep.graph
    specs = ep.graph_signature.input_specs
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    # Insert after the last parameter/buffer so the canonical order (params, buffers, constants, inputs) holds.
    idx = max((i for i, s in enumerate(specs) if s.kind in (InputKind.PARAMETER, InputKind.BUFFER)), default=-1) + 1
    name = "b_" + fqn.replace(".", "_")
    existing = {n.name for n in graph.nodes}
    assert name not in existing, f"constant {fqn} already exists"
    anchor = placeholders[idx] if idx < len(placeholders) else None
    ctx = graph.inserting_before(anchor) if anchor is not None else graph.inserting_after(placeholders[-1])
    with ctx:
        node = graph.placeholder(name)
    fake_mode = detect_fake_mode([n.meta.get("val") for n in placeholders])
    node.meta["val"] = fake_mode.from_tensor(value, static_shapes=True) if fake_mode else value
    specs.insert(idx, InputSpec(kind=InputKind.BUFFER, arg=TensorArgument(name=node.name), target=fqn, persistent=True))
    ep.state_dict[fqn] = value
    return node


def call(graph: torch.fx.Graph, op, args: tuple, before: torch.fx.Node) -> torch.fx.Node:
    """Insert `op(*args)` before `before`, with its fake value computed from the args' fake values."""
    with graph.inserting_before(before):
        node = graph.call_function(op, args)
    vals = [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args]
    fake_mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    with fake_mode:
        node.meta["val"] = op(*vals)
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in before.meta:
            node.meta[key] = before.meta[key]
    return node


def remove_unused_constants(ep: ExportedProgram) -> list[str]:
    """Drop placeholders of parameters / buffers / constants that nothing uses any more (and their storage)."""
    removed = []
    mutated = {s.target for s in ep.graph_signature.output_specs if s.target}
    for node in list(ep.graph.nodes):
        if node.op != "placeholder" or node.users:
            continue
        spec = spec_for(ep, node)
        if spec is None or spec.kind not in CONSTANT_KINDS or spec.target in mutated:
            continue
        ep.graph.erase_node(node)
        ep.graph_signature.input_specs.remove(spec)
        ep.state_dict.pop(spec.target, None)
        ep.constants.pop(spec.target, None)
        removed.append(spec.target)
    return removed


def replace_call(graph: torch.fx.Graph, node: torch.fx.Node, op, args: tuple) -> torch.fx.Node:
    """Replace `node` by `op(*args)`, inserted where it was (see `call`)."""
    new = call(graph, op, args, node)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def finish_rewrite(ep: ExportedProgram) -> None:
    """After a rewrite: drop the nodes and the constants nothing reads any more, and regenerate the code."""
    ep.graph.eliminate_dead_code()
    remove_unused_constants(ep)
    ep.graph_module.recompile()


def eliminate_dead_code(ep: ExportedProgram) -> None:
    ep.graph.eliminate_dead_code()
    ep.graph_module.recompile()


def op_histogram(ep: ExportedProgram) -> Counter:
    """Op types of the graph (what the pass tests compare before and after)."""
    return Counter(_op_name(n.target) for n in ep.graph.nodes if n.op == "call_function" and n.target is not operator.getitem)


def _op_name(target) -> str:
    name = getattr(target, "_name", None) or getattr(target, "__name__", str(target))
    return name.replace("::", ".").replace(".default", "")
