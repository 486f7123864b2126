"""Pass: clean-up. Drops nodes whose results nobody uses and constants no node reads any more.

Before:  x -> abs -> mean      (dangling, e.g. left by a rewrite)        W_unused (param, in the state dict)
After:   (gone)                                                          (gone from graph, signature, state dict)

Side-effecting ops (in-place KV-cache writes) are never removed: FX treats mutating ops as impure.
"""
from __future__ import annotations

from .program import remove_unused_constants


def remove_dead_code(ep) -> int:
    before = len(ep.graph.nodes)
    ep.graph.eliminate_dead_code()
    removed = remove_unused_constants(ep)
    ep.graph_module.recompile()
    return before - len(ep.graph.nodes) + len(removed)
