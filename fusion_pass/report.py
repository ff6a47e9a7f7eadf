"""What the pass saw: every candidate chain, what was fused, and why the rest was not.

A :class:`Report` is filled by :class:`~fusion_pass.FusionPass` (``FusionPass().report``,
``backend.report``) and by :func:`fusion_pass.explain`.  It is both text and data::

    print(report)            # summary line + aligned table (graph, candidate, status, ...)
    report.candidates        # list of Candidate
    report.fused, report.rejected, report.counts, report.to_dicts()
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

log = logging.getLogger("fusion_pass")

#: The chain's steps, in the order the table shows them.
STEPS = ("split", "norm", "rope", "cache")
#: Column titles of :meth:`Report.table`.
COLUMNS = ("graph", "candidate", "status") + STEPS + ("op / reason",)


@dataclasses.dataclass
class Candidate:
    """One candidate chain (or a lone cache write) the pass looked at in one graph.

    Attributes:
        graph: index of the compiled graph (in the order the pass saw them; one per
            Dynamo graph, so a graph break gives a second index).
        name: the FX nodes the chain ends in, e.g. ``"q:cat k:cat_1"`` (rotated Q and K).
        forms: step -> the form matched, for ``split`` (projection columns per head),
            ``norm``, ``rope`` (style, rotary dim, where cos/sin come from) and ``cache``
            (layout and slot form); ``None`` where the step was absent or not decoded.
        status: ``"fused"`` (whole chain, with the cache write when there is one),
            ``"fused-partial"`` (fused without the cache write; ``reason`` says why) or
            ``"rejected"`` (left unfused; ``guard`` and ``reason`` say why).
        reason: why it was rejected, or why a partial fusion stopped short, with the values
            that failed (e.g. ``"eps differs on Q (1e-05) and K (1e-06)"``).
        guard: the check that failed: a guard of :mod:`fusion_pass.guards` (``eps``,
            ``head_dim``, ``device``, ...), or ``match``/``order``/``pairing``/``cache``/
            ``rewrite`` for chains that are not this op or could not be rewritten, or
            ``dynamic`` for a graph (``name`` ``"graph"``) where nothing matched while int
            arguments were symbolic (:mod:`fusion_pass.dynamic_sizes`).
        op: the fused call inserted: ``fused_qkv_inductor_kernel (Inductor launch)`` when
            Inductor's code launches the Triton kernel itself (CUDA, the default), else the
            custom op, ``fused_qkv.split_norm_rope_cache`` or ``fused_qkv.split_norm_rope``.
    """

    graph: int
    name: str
    forms: dict
    status: str
    reason: Optional[str] = None
    guard: Optional[str] = None
    op: Optional[str] = None

    def line(self) -> str:
        """One free-form line (the DEBUG log line)."""
        forms = ", ".join(f"{k}={v}" for k, v in self.forms.items() if v)
        tail = f" -> {self.op}" if self.op else ""
        why = f" ({self.guard}: {self.reason})" if self.reason else ""
        return f"[graph {self.graph}] {self.status:13} {self.name}: {forms}{tail}{why}"

    def why(self) -> str:
        """``"guard: reason"``, or ``""`` when nothing failed."""
        if not self.reason:
            return ""
        return f"{self.guard}: {self.reason}" if self.guard else self.reason

    def outcome(self) -> str:
        """The table's last column: the op inserted and/or why not (more)."""
        if self.op and self.reason:  # fused-partial: what stayed unfused, and why
            return f"{self.op} ({self.guard or 'rest'} not fused: {self.reason})"
        return self.op or self.why()

    def row(self) -> tuple:
        """The table row: one string per :data:`COLUMNS` entry (``-`` for a missing step)."""
        steps = tuple(str(self.forms.get(s) or "-") for s in STEPS)
        return (str(self.graph), self.name, self.status) + steps + (self.outcome() or "-",)

    def to_dict(self) -> dict:
        """Flat, JSON-friendly dict: graph, candidate, status, split, norm, rope, cache, op,
        guard, reason (and any other form the matcher recorded)."""
        d = {"graph": self.graph, "candidate": self.name, "status": self.status}
        d.update({s: self.forms.get(s) for s in STEPS})
        d.update({k: v for k, v in self.forms.items() if k not in STEPS})
        d.update(op=self.op, guard=self.guard, reason=self.reason)
        return d


def render_table(rows, columns=COLUMNS, indent: str = "  ") -> str:
    """Rows of strings -> an aligned text table with a header and a rule."""
    rows = [tuple(columns)] + [tuple(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]

    def fmt(r):
        return indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()

    rule = indent + "  ".join("-" * w for w in widths)
    return "\n".join([fmt(rows[0]), rule] + [fmt(r) for r in rows[1:]])


@dataclasses.dataclass
class Report:
    """Accumulates over every graph the pass sees.  ``print(report)`` gives a table.

    Attributes:
        candidates: every :class:`Candidate`, in the order seen.
        graphs: how many graphs the pass ran on (an FX-graph-cache hit does not run it).
        errors: exceptions the pass caught (the graph was then left as it was).
    """

    candidates: list = dataclasses.field(default_factory=list)
    graphs: int = 0
    errors: list = dataclasses.field(default_factory=list)

    def new_graph(self) -> int:
        self.graphs += 1
        return self.graphs - 1

    def add(self, cand: Candidate) -> None:
        self.candidates.append(cand)
        log.debug("%s", cand.line())

    @property
    def fused(self) -> list:
        """Candidates fused, with or without the cache write."""
        return [c for c in self.candidates if c.status.startswith("fused")]

    @property
    def rejected(self) -> list:
        return [c for c in self.candidates if c.status == "rejected"]

    @property
    def counts(self) -> dict:
        """``graphs``, ``candidates``, ``fused`` (= ``fused_with_cache`` + ``fused_partial``),
        ``fused_with_cache``, ``fused_partial``, ``rejected``, ``errors``."""
        full = sum(c.status == "fused" for c in self.candidates)
        part = sum(c.status == "fused-partial" for c in self.candidates)
        return {"graphs": self.graphs, "candidates": len(self.candidates),
                "fused": full + part, "fused_with_cache": full, "fused_partial": part,
                "rejected": len(self.rejected), "errors": len(self.errors)}

    def summary(self, graph: Optional[int] = None) -> str:
        """One line of counts: over every graph, or (``graph=i``) over graph ``i`` only."""
        if graph is not None:
            cands = [c for c in self.candidates if c.graph == graph]
            full = sum(c.status == "fused" for c in cands)
            part = sum(c.status == "fused-partial" for c in cands)
            rej = sum(c.status == "rejected" for c in cands)
            return (f"fusion_pass: graph {graph}: {len(cands)} candidate(s): {full} fused with "
                    f"cache write, {part} fused without, {rej} rejected")
        n = self.counts
        return (f"fusion_pass: {n['graphs']} graph(s), {n['candidates']} candidate(s): "
                f"{n['fused_with_cache']} fused with cache write, {n['fused_partial']} fused "
                f"without, {n['rejected']} rejected, {n['errors']} error(s)")

    def table(self) -> str:
        """The candidates as an aligned table (``COLUMNS``); ``""`` when there are none."""
        if not self.candidates:
            return ""
        return render_table([c.row() for c in self.candidates])

    def to_dicts(self) -> list:
        """The candidates as flat dicts (see :meth:`Candidate.to_dict`)."""
        return [c.to_dict() for c in self.candidates]

    def __str__(self) -> str:
        lines = [self.summary()]
        if self.candidates:
            lines.append(self.table())
        lines += [f"  error: {e}" for e in self.errors]
        return "\n".join(lines)

    def clear(self) -> None:
        self.candidates.clear()
        self.errors.clear()
        self.graphs = 0
