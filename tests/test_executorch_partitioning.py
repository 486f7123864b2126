"""targets/executorch/partitioning.py: ExecuTorch's delegation kept linear in the graph size, with the same result.

- the in-place order repair: a graph whose node was moved ahead of its input becomes ordered again, keeping the node
  objects and the original order wherever the dependencies allow;
- a .pte lowered with and without it delegates the same ops and computes bit-identical outputs in ExecuTorch's
  runtime.
"""
import operator

import torch

from mote.targets.executorch.partitioning import is_topologically_ordered, stable_topological_relink


def _graph():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(operator.add, (x, 1))
    b = g.call_function(operator.mul, (a, 2))
    c = g.call_function(operator.neg, (x,))
    d = g.call_function(operator.sub, (b, c))
    g.output(d)
    return g, (x, a, b, c, d)


def test_relink_restores_order_in_place_and_stably():
    g, (x, a, b, c, d) = _graph()
    assert is_topologically_ordered(g)
    x.append(b)                           # b (uses a) now comes before a: what inserting a submodule can leave
    assert [n.name for n in g.nodes][:3] == ["x", "mul", "add"]
    assert not is_topologically_ordered(g)
    stable_topological_relink(g)
    assert is_topologically_ordered(g)
    # same node objects; a before b; c and d keep their places
    assert list(g.nodes)[:5] == [x, a, b, c, d]
    g.lint()


def test_relink_leaves_an_ordered_graph_unchanged():
    g, nodes = _graph()
    stable_topological_relink(g)
    assert tuple(list(g.nodes)[:5]) == nodes


def test_pte_with_linear_partitioning_matches_executorch_as_shipped(tmp_path):
    from mote.export.programs import KVCacheStyle, export_programs
    from mote.passes.pipeline import run_pipeline
    from mote.targets.executorch import PteRunner, delegation_summary, to_pte
    from mote.tools.make_random_model import random_config, random_model

    model = random_model(random_config(layers=2, hidden=64, expert_intermediate=48, top_k=2, vision=False), 3)
    outputs, summaries = [], []
    for fast in (False, True):
        programs, _ = run_pipeline(export_programs(model, 32, KVCacheStyle.STATE), model.config.moe.moe_layers)
        edge, et = to_pte(programs, model, 32, fast_partitioning=fast)
        path = tmp_path / f"fast{fast}.pte"
        with open(path, "wb") as f:
            et.write_to_file(f)
        summaries.append(delegation_summary(edge))
        runner = PteRunner(path, 32)
        torch.manual_seed(0)
        embeds = torch.randn(1, 5, 64)
        prefill = runner.text_decoder(embeds, torch.tensor([0]))
        step = runner.text_decoder(embeds[:, :1], torch.tensor([5]))
        outputs.append((prefill, step))
    assert summaries[0] == summaries[1]
    assert summaries[1]["text_decoder"]["xnnpack_delegates"] > 0
    for a, b in zip(*outputs):
        assert torch.equal(a, b)
