"""``fusion_pass.explain``: compile a model once with the pass and say what was fused, and why not.

    report = fusion_pass.explain(model, *example_inputs)
    print(report)                 # summary + table: graph, candidate, status, split, norm, ...
    report.rejected[0].guard      # "eps"
    report.rejected[0].reason     # "eps differs on Q (1e-05) and K (1e-06)"
    report.to_dicts()             # one flat dict per candidate
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch
from torch.utils import _pytree as pytree

from .backend import make_backend
from .options import FusionOptions
from .report import Report

_FUSION_FIELDS = {f.name for f in dataclasses.fields(FusionOptions)}


@dataclasses.dataclass
class ExplainReport(Report):
    """A :class:`~fusion_pass.Report` of one :func:`explain` run, plus what it was run on.

    Attributes (besides ``candidates``, ``graphs``, ``errors``, ``fused``, ``rejected``,
    ``counts``, ``summary()``, ``table()``, ``to_dicts()`` of :class:`~fusion_pass.Report`):
        target: the name of the model or function compiled.
        allow_cpu: whether CPU graphs were allowed to be rewritten.
        cloned_inputs: whether the example inputs were cloned before the run.
        notes: hints when the result needs one (no graph, no candidate, autograd on).
    """

    target: str = ""
    allow_cpu: bool = False
    cloned_inputs: bool = True
    notes: list = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        head = f"fusion_pass.explain({self.target}): " + self.summary()[len("fusion_pass: "):]
        lines = [head]
        if self.candidates:
            lines.append(self.table())
        lines += [f"  error: {e}" for e in self.errors]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def explain(model: Callable, *example_inputs, allow_cpu: Optional[bool] = None,
            example_kwargs: Optional[dict] = None, clone_inputs: bool = True,
            **compile_kwargs) -> ExplainReport:
    """Compile ``model`` with a fresh :class:`~fusion_pass.FusionPass`, run it once on the
    example inputs, and report every candidate chain: what was fused into which op call,
    and for each rejection the guard and the values that failed it.

    Args:
        model: an ``nn.Module`` or a function (a ``torch.compile``-d one is unwrapped).
        *example_inputs: positional inputs for one call, as the model would be called.
        allow_cpu: rewrite CPU graphs too.  Default: ``True`` when every example tensor (and
            every parameter/buffer of a module) is on the CPU, else ``False`` (the pass's
            default: CUDA only).
        example_kwargs: keyword inputs for the call.
        clone_inputs: run on copies of the example tensors, so that what the model writes
            in place (KV caches) does not land in the caller's tensors.  The copies keep
            shapes, strides, storage offsets, aliasing between inputs (e.g. K and V halves
            of one cache tensor) and ``torch._dynamo.mark_dynamic`` marks.  Tensors the
            model holds itself (parameters, buffers, a cache kept as an attribute) are not
            copied: the run writes them as the model would.  ``False`` saves the memory of
            the copies.
        **compile_kwargs: ``torch.compile`` arguments (``dynamic``, ``fullgraph``, ``mode``,
            ``options`` for Inductor settings), and :class:`~fusion_pass.FusionOptions`
            fields (``fuse_cache``, ``fuse_norm``).  ``backend`` is not accepted: explain
            compiles with Inductor and the pass.

    The compile really runs the pass: ``torch._dynamo.reset()`` is called first (and again
    at the end, so nothing compiled here is reused later), and Inductor's FX graph cache and
    AOT autograd cache are off for this compile (a cache hit would skip the pass).  The
    fused op runs on CPU as its reference (or the Triton kernel under
    ``TRITON_INTERPRET=1``), so explain works without a GPU.  Exceptions of the model or
    of the compile propagate; exceptions inside the pass are in ``report.errors``.

    Returns:
        :class:`ExplainReport`: ``print(report)`` shows a table; ``report.candidates`` are
        :class:`~fusion_pass.Candidate` records, ``report.counts`` the counts,
        ``report.to_dicts()`` flat dicts.
    """
    if "backend" in compile_kwargs:
        raise TypeError("explain() compiles with Inductor and the fusion pass: do not pass "
                        "backend=")
    fusion = {k: compile_kwargs.pop(k) for k in list(compile_kwargs) if k in _FUSION_FIELDS}
    mode = compile_kwargs.pop("mode", None)
    inductor_options = dict(compile_kwargs.pop("options", None) or {})
    if mode not in (None, "default"):
        from torch._inductor import list_mode_options

        inductor_options = {**list_mode_options(mode), **inductor_options}
    kwargs = dict(example_kwargs or {})
    fn = getattr(model, "_orig_mod", model)  # unwrap an already compiled module/function

    tensors = [x for x in pytree.tree_leaves((example_inputs, kwargs))
               if isinstance(x, torch.Tensor)]
    if isinstance(fn, torch.nn.Module):
        held = list(fn.parameters()) + list(fn.buffers())
    else:
        held = []
    if allow_cpu is None:
        allow_cpu = all(t.device.type == "cpu" for t in tensors + held)

    args, kwargs = (clone_tensors((example_inputs, kwargs)) if clone_inputs
                    else (example_inputs, kwargs))
    backend = make_backend(inductor_options=inductor_options, allow_cpu=allow_cpu, **fusion)
    torch._dynamo.reset()
    try:
        with torch._inductor.config.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            compiled = torch.compile(fn, backend=backend, **compile_kwargs)
            compiled(*args, **kwargs)
    finally:
        torch._dynamo.reset()

    seen = backend.fusion_pass.report
    report = ExplainReport(candidates=list(seen.candidates), graphs=seen.graphs,
                           errors=list(seen.errors), target=_name_of(fn),
                           allow_cpu=allow_cpu, cloned_inputs=clone_inputs)
    report.notes = _notes(report, tensors + held)
    return report


def _name_of(fn: Any) -> str:
    if isinstance(fn, torch.nn.Module):
        return type(fn).__name__
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def _notes(report: ExplainReport, tensors: list) -> list:
    notes = []
    if report.graphs == 0:
        notes.append("the pass saw no graph (nothing was compiled by Inductor)")
    elif not report.candidates:
        notes.append("no candidate: no rotary embedding (the anchor of every chain) was "
                     "found in the post-grad graph(s)")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        notes.append("autograd was on and tensors require grad: a training graph returns the "
                     "cache mutations as outputs, so cache writes are not fused; run explain "
                     "under torch.no_grad() / torch.inference_mode() as serving code does")
    if not report.allow_cpu and any(t.device.type == "cpu" for t in tensors):
        notes.append("allow_cpu=False: CPU graphs are rejected by the device guard")
    return notes


def clone_tensors(tree):
    """Copy every tensor of a pytree, keeping sizes, strides, storage offsets, aliasing
    (tensors sharing a storage share the copy of it) and Dynamo's dynamic-dim marks."""
    storages = {}

    def copy(t):
        if not isinstance(t, torch.Tensor):
            return t
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided \
                or t.device.type == "meta":
            new = t.clone()
        else:
            st = t.untyped_storage()
            key = (t.device, st.data_ptr(), st.nbytes())
            if key not in storages:
                storages[key] = st.clone()
            new = torch.empty(0, dtype=t.dtype, device=t.device)
            new.set_(storages[key], t.storage_offset(), t.size(), t.stride())
            new.requires_grad_(t.requires_grad)
            if isinstance(t, torch.nn.Parameter):
                new = torch.nn.Parameter(new, requires_grad=t.requires_grad)
        for k, v in getattr(t, "__dict__", {}).items():
            if k.startswith("_dynamo"):  # mark_dynamic / mark_static / maybe_mark_dynamic
                setattr(new, k, v.copy() if hasattr(v, "copy") else v)
        return new

    return pytree.tree_map(copy, tree)
