"""Small helpers over post-grad FX graphs: node predicates, walking views, fake values."""
from __future__ import annotations

import operator
from typing import Any, Iterable, Optional

import torch
from torch.fx import Graph, Node
from torch.utils._pytree import tree_map

aten = torch.ops.aten
prims = torch.ops.prims

# Ops that only re-describe memory.  Post-grad graphs show `view` as `reshape`.
VIEW_OPS = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.permute.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.slice.Tensor, aten.select.int, aten.expand.default, aten.alias.default,
    aten.transpose.int, aten.t.default,
}
SPLIT_OPS = {aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int,
             aten.chunk.default}


def is_op(n: Any, *targets) -> bool:
    return isinstance(n, Node) and n.op == "call_function" and n.target in targets


def val(n: Any):
    """The fake value of a node (or the constant itself)."""
    if isinstance(n, Node):
        return n.meta.get("val")
    return n


def tensor_val(n: Any) -> Optional[torch.Tensor]:
    v = val(n)
    return v if isinstance(v, torch.Tensor) else None


def is_view_node(n: Any) -> bool:
    """A node whose value is a view of its first input (split outputs included)."""
    if not isinstance(n, Node) or n.op != "call_function":
        return False
    if n.target in VIEW_OPS:
        return True
    if n.target is operator.getitem and is_op(n.args[0], *SPLIT_OPS):
        return True
    return False


def is_row_trim(n: Any) -> bool:
    """``x[:M]`` on a computed (non-view) tensor: the leading rows of a matmul that Inductor's
    ``pad_mm`` padded to an aligned row count (``mm(pad(h), w)[:M]``).  On CUDA it pads where
    its own benchmark says so, per shape: the slice then stands for the projection itself."""
    if not is_op(n, aten.slice.Tensor) or is_view_node(n.args[0]):
        return False
    v = tensor_val(n.args[0])
    rest = list(n.args[1:])  # slice.Tensor(self, dim=0, start=None, end=None, step=1)
    dim = rest[0] if rest else n.kwargs.get("dim", 0)
    start = rest[1] if len(rest) > 1 else n.kwargs.get("start")
    step = rest[3] if len(rest) > 3 else n.kwargs.get("step", 1)
    return v is not None and v.dim() >= 2 and dim in (0, -v.dim()) and start in (0, None) and \
        step == 1


def view_input(n: Node) -> Node:
    """The tensor a view node views."""
    if n.target is operator.getitem:
        return n.args[0].args[0]
    return n.args[0]


def is_cast(n: Any) -> bool:
    return is_op(n, prims.convert_element_type.default, aten._to_copy.default)


def same_value(a, b) -> bool:
    """Two nodes compute the same values: the same node, or the same chain of ops with the same
    extra arguments down to one shared input (post-grad graphs often repeat an unsqueeze, a
    cast or ``slot % bs`` per use instead of sharing it)."""
    if a is b:
        return True
    while isinstance(a, Node) and isinstance(b, Node) and a.target == b.target and \
            a.op == "call_function" and a.args[1:] == b.args[1:] and a.kwargs == b.kwargs:
        a, b = a.args[0], b.args[0]
        if a is b:
            return True
    return False


def fake_mode_of(graph: Graph):
    return torch._guards.detect_fake_mode(
        [n.meta.get("val") for n in graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)])


def set_fake_val(n: Node, fake_mode) -> None:
    """Compute ``meta['val']`` of a freshly inserted node by running it on fake values."""
    args, kwargs = tree_map(lambda x: x.meta["val"] if isinstance(x, Node) else x, (n.args, n.kwargs))
    with fake_mode:
        n.meta["val"] = n.target(*args, **kwargs)


def same_sym(a, b) -> bool:
    """Equal sizes, symbolically when needed."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return bool(statically_known_true(a == b))
    except Exception:
        return False


def size_arg(graph: Graph, size, providers: Iterable[Node], before: Node):
    """A value usable as a size argument in the graph: an int, or a node computing the SymInt.

    Looks for a SymInt placeholder with the same symbol first, then inserts
    ``aten.sym_size.int(p, dim)`` on a provider tensor whose dim has that size.
    """
    if isinstance(size, int):
        return size
    for n in graph.nodes:
        if n.op == "placeholder" and isinstance(n.meta.get("val"), torch.SymInt):
            if same_sym(n.meta["val"], size):
                return n
    for p in providers:
        pv = tensor_val(p)
        if pv is None:
            continue
        for dim, s in enumerate(pv.shape):
            if not isinstance(s, int) and same_sym(s, size):
                with graph.inserting_before(before):
                    node = graph.call_function(aten.sym_size.int, (p, dim))
                node.meta["val"] = s
                return node
    raise LookupError(f"no node provides size {size}")


def check_acyclic(graph: Graph) -> None:
    """Raise naming the nodes if some input is not in ``graph`` or the inputs form a cycle
    (what Inductor's topological sort would only assert, without a message)."""
    nodes = list(graph.nodes)
    pending = {n: 0 for n in nodes}  # inputs not yet seen, of each node of the graph
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in pending:
                raise RuntimeError(f"node {n.name} reads {a.name}, which is not in the graph")
            pending[n] += 1
    ready = [n for n, c in pending.items() if c == 0]
    done = 0
    while ready:
        n = ready.pop()
        done += 1
        for u in n.users:  # users and all_input_nodes are both without repeats
            if u not in pending:  # a node of another graph
                continue
            pending[u] -= 1
            if pending[u] == 0:
                ready.append(u)
    if done != len(nodes):
        stuck = [n.name for n, c in pending.items() if c > 0]
        raise RuntimeError(f"the rewrite left a cycle through {stuck[:8]}")


def depends_on(node: Node, targets: Iterable[Node]) -> bool:
    """Does ``node`` read any of ``targets``, directly or through other nodes?  Walks inputs
    only back to the earliest target: the graph is in topological order, and FX nodes compare
    by their position in it (kept up to date on insertion), so no walk numbers the graph."""
    targets = set(targets)
    first = min(targets)
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in targets:
            return True
        for a in n.all_input_nodes:
            if a not in seen and not a < first:
                seen.add(a)
                todo.append(a)
    return False
