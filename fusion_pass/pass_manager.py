"""The Inductor post-grad pass object: stable uuid, never breaks a compile, records a report."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from . import attention_prep
from .options import FusionOptions
from .report import Report

log = logging.getLogger("fusion_pass")

_SOURCES = sorted(Path(__file__).parent.glob("*.py"))


def _source_hash() -> str:
    h = hashlib.sha256()
    for p in _SOURCES:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    kdir = Path(__file__).parent.parent / "kernels"
    for p in sorted(kdir.glob("*.py")):  # the op's schema is part of what the pass emits
        h.update(p.read_bytes())
    return h.hexdigest()


_HASH = _source_hash()


class FusionPass(CustomGraphPass):
    """Post-grad pass fusing QKV split + per-head RMSNorm + RoPE + paged KV-cache write.

    Use as ``torch.compile(m, options={"post_grad_custom_post_pass": FusionPass()})`` or via
    :func:`fusion_pass.make_backend`.

    Args:
        options: a :class:`~fusion_pass.FusionOptions`; or give its fields as keywords
            (``FusionPass(allow_cpu=True, fuse_cache=False)``).

    Attributes:
        options: the :class:`~fusion_pass.FusionOptions` in use.
        report: a :class:`~fusion_pass.Report` accumulating what every compiled graph showed
            (each candidate chain, what was fused, why the rest was not).

    Calling it on a post-grad ``torch.fx.Graph`` rewrites the graph in place; it never raises
    (an exception is logged, recorded in ``report.errors``, and the graph is restored).  Logs
    go to the ``fusion_pass`` logger: one INFO line per graph, one DEBUG line per candidate.
    Inductor's FX graph cache stays on: ``uuid()`` hashes the options and the pass's sources;
    on a cache hit the pass does not run (the cached code is already fused), so nothing is
    reported: use :func:`fusion_pass.explain` to see the report.
    """

    def __init__(self, options: Optional[FusionOptions] = None, **kwargs):
        self.options = options if options is not None else FusionOptions(**kwargs)
        self.report = Report()

    def __call__(self, graph: torch.fx.Graph) -> None:
        before = None
        try:
            before = _snapshot(graph)
            n = attention_prep.run(graph, self.options, self.report)
            # One INFO line per compiled graph, with this graph's counts.
            log.info("%s; %d fused op call(s) inserted", self.report.summary(
                graph=self.report.graphs - 1), n)
        except Exception as e:  # never break a compile: restore the graph, log, go on
            self.report.errors.append(f"{type(e).__name__}: {e}")
            # with the traceback: a bare assert in torch says nothing by itself
            log.warning("fusion_pass failed on a graph, left unfused: %s: %s",
                        type(e).__name__, e, exc_info=True)
            if before is not None:
                _restore(graph, before)

    def uuid(self) -> str:
        # module switches that change what the pass emits, besides the options
        from kernels import triton_kernel

        from . import inductor_launch
        return (f"fusion_pass-{_HASH[:16]}-{self.options}-int32={triton_kernel._INDEX32}-"
                f"switch={inductor_launch.SWITCH_T}-cap={inductor_launch.INT32_BELOW_CAP}")


def _snapshot(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A copy of the graph (nodes and meta) to restore if the pass fails halfway."""
    new = torch.fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new


def _restore(graph: torch.fx.Graph, saved: torch.fx.Graph) -> None:
    """Put ``saved``'s nodes back into ``graph``.  A rewrite that failed halfway may have left
    a cycle, so every node first drops its inputs (no node then has a user) and is erased."""
    nodes = list(graph.nodes)
    for n in nodes:
        n.args, n.kwargs = (), {}
    for n in reversed(nodes):
        graph.erase_node(n)
    out = graph.graph_copy(saved, {})
    graph.output(out)
