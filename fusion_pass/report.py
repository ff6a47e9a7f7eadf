"""What the pass saw: every candidate chain, what was fused, and why the rest was not."""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

log = logging.getLogger("fusion_pass")


@dataclasses.dataclass
class Candidate:
    graph: int  # index of the compiled graph in this report
    name: str  # e.g. "q:view_3 + k:view_7"
    forms: dict  # step -> form matched: split, norm, rope, cache
    status: str  # "fused", "fused-partial" (no cache write), "rejected"
    reason: Optional[str] = None  # for rejections (and partial fusions: why not more)
    guard: Optional[str] = None  # the guard that failed
    op: Optional[str] = None  # the fused op call inserted

    def line(self) -> str:
        forms = ", ".join(f"{k}={v}" for k, v in self.forms.items() if v)
        tail = f" -> {self.op}" if self.op else ""
        why = f" ({self.guard}: {self.reason})" if self.reason else ""
        return f"[graph {self.graph}] {self.status:13} {self.name}: {forms}{tail}{why}"


@dataclasses.dataclass
class Report:
    """Accumulates over every graph the pass sees.  ``print(report)`` gives a table."""

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
        return [c for c in self.candidates if c.status.startswith("fused")]

    @property
    def rejected(self) -> list:
        return [c for c in self.candidates if c.status == "rejected"]

    def summary(self) -> str:
        full = sum(c.status == "fused" for c in self.candidates)
        part = sum(c.status == "fused-partial" for c in self.candidates)
        return (f"fusion_pass: {self.graphs} graph(s), {len(self.candidates)} candidate(s): "
                f"{full} fused with cache write, {part} fused without, "
                f"{len(self.rejected)} rejected, {len(self.errors)} error(s)")

    def __str__(self) -> str:
        lines = [self.summary()]
        lines += ["  " + c.line() for c in self.candidates]
        lines += [f"  error: {e}" for e in self.errors]
        return "\n".join(lines)

    def clear(self) -> None:
        self.candidates.clear()
        self.errors.clear()
        self.graphs = 0
