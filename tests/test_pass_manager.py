"""FusionPass's own contract: a failure inside the pass never breaks the compile.  The graph
comes back exactly as it was, even when the rewrite left a cycle, and the log says why."""
import logging
import operator

import pytest
import torch

import fusion_pass
from fusion_pass import attention_prep, graph_util


def _graph() -> torch.fx.Graph:
    def f(x, y):
        a = x + y
        b = a * 2
        return b - x, a
    return torch.fx.symbolic_trace(f).graph


def _cycle_then_fail(graph, opts, report):
    """What a rewrite that breaks halfway can leave: a new node, and a cycle a -> b -> a."""
    a = next(n for n in graph.nodes if n.target is operator.add)
    b = next(n for n in graph.nodes if n.target is operator.mul)
    with graph.inserting_after(b):
        graph.call_function(operator.neg, (b,))
    a.args = (a.args[0], b)
    assert b in a.all_input_nodes and a in b.all_input_nodes
    raise AssertionError()  # bare, like the asserts inside torch


def _shape(g: torch.fx.Graph) -> list:
    """Ops, targets and argument positions (node names may take a suffix on restore)."""
    order = {n: i for i, n in enumerate(g.nodes)}
    return [(n.op, str(n.target), torch.fx.node.map_arg(n.args, lambda a: order[a]))
            for n in g.nodes]


def test_failed_pass_restores_a_graph_left_with_a_cycle(monkeypatch, caplog):
    g = _graph()
    before = _shape(g)
    monkeypatch.setattr(attention_prep, "run", _cycle_then_fail)
    fp = fusion_pass.FusionPass()
    with caplog.at_level(logging.WARNING, logger="fusion_pass"):
        fp(g)  # must not raise
    assert _shape(g) == before
    g.lint()
    graph_util.check_acyclic(g)
    x, y = torch.randn(3), torch.randn(3)
    out = torch.fx.GraphModule(torch.nn.Module(), g)(x, y)
    torch.testing.assert_close(out, ((x + y) * 2 - x, x + y))
    assert fp.report.errors == ["AssertionError: "]
    rec = [r for r in caplog.records if "left unfused" in r.getMessage()]
    assert len(rec) == 1 and rec[0].exc_info is not None, "the warning carries no traceback"
    assert "_cycle_then_fail" in caplog.text  # the traceback names where it failed


def test_check_acyclic_names_the_cycle():
    g = _graph()
    graph_util.check_acyclic(g)
    a = next(n for n in g.nodes if n.target is operator.add)
    b = next(n for n in g.nodes if n.target is operator.mul)
    a.args = (a.args[0], b)
    with pytest.raises(RuntimeError, match=r"cycle through .*add.*mul|cycle through .*mul.*add"):
        graph_util.check_acyclic(g)


def test_check_acyclic_names_a_foreign_input():
    g, other = _graph(), _graph()
    a = next(n for n in g.nodes if n.target is operator.add)
    x_other = next(n for n in other.nodes if n.op == "placeholder")
    a.args = (x_other, a.args[1])
    with pytest.raises(RuntimeError, match="reads x, which is not in the graph"):
        graph_util.check_acyclic(g)
