"""ExecuTorch 1.5.1's delegation step, made linear in the graph size.

Where the lowering time went (tools/scale_bench.py, Qwen2.5-0.5B shape): `to_backend` turns each XNNPACK partition
into a submodule with `create_submodule_from_nodes`, and that function then re-sorts the *whole* graph with
`torch.fx.passes.tools_common.legalize_graph`: a new Graph, every node copied, the GraphModule recompiled to Python
source. Once per partition. Our decoder has about 17 partitions and 200 nodes per layer, so the step is
O(layers^2): 12 s at 4 layers, 46 s at 8, and most of the 10 minutes at 24.

`linear_partitioning()` replaces that re-sort, for the duration of one lowering, by an in-place repair:
- one pass checks whether every node's inputs come before it (after inserting a submodule they almost always do);
- only if not, the nodes are relinked in a stable topological order (no copies, no recompile);
- each graph module is recompiled once, after all of its partitions exist.
The graph's contents are unchanged, only the work to keep it ordered; tests/test_executorch_partitioning.py checks
that the .pte built with and without it computes bit-identical outputs.
"""
from __future__ import annotations

import heapq
from contextlib import contextmanager

import torch


def is_topologically_ordered(graph: torch.fx.Graph) -> bool:
    seen = set()
    for node in graph.nodes:
        if any(i not in seen for i in node.all_input_nodes):
            return False
        seen.add(node)
    return True


def stable_topological_relink(graph: torch.fx.Graph) -> None:
    """Reorder `graph` in place so that every node follows its inputs, keeping the current order wherever the
    dependencies allow (Kahn's algorithm, ready nodes taken by their current position). Nodes are moved, not
    copied, so every reference to them stays valid."""
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    pending = {n: len(set(n.all_input_nodes)) for n in nodes}
    ready = [position[n] for n in nodes if pending[n] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        node = nodes[heapq.heappop(ready)]
        order.append(node)
        for user in node.users:
            pending[user] -= 1
            if pending[user] == 0:
                heapq.heappush(ready, position[user])
    if len(order) != len(nodes):
        raise RuntimeError("the partitioned graph has a cycle")
    anchor = graph._root    # the sentinel before the first node: relink each node after the previous one
    for node in order:
        if node._prev is not anchor:
            anchor.append(node)
        anchor = node


def _keep_ordered(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    if not is_topologically_ordered(gm.graph):
        stable_topological_relink(gm.graph)
    return gm


@contextmanager
def linear_partitioning():
    """Within the block, ExecuTorch's `to_backend` keeps each graph ordered in place and recompiles it once."""
    from executorch.exir import lowered_backend_module
    from executorch.exir.backend import backend_api

    create_partitions = backend_api._create_partitions_in_graph_module

    def create_partitions_then_recompile(tagged_graph_module, *args, **kwargs):
        result = create_partitions(tagged_graph_module, *args, **kwargs)
        tagged_graph_module.graph.lint()
        tagged_graph_module.recompile()
        return result

    saved = lowered_backend_module.legalize_graph
    lowered_backend_module.legalize_graph = _keep_ordered
    backend_api._create_partitions_in_graph_module = create_partitions_then_recompile
    try:
        yield
    finally:
        lowered_backend_module.legalize_graph = saved
        backend_api._create_partitions_in_graph_module = create_partitions
