"""Make Triton's CPU interpreter skip redundant work in our kernel's helper calls.

The interpreter patches ``triton.language`` for the interpreted run when a launch starts, and
again on every call of a nested ``@triton.jit`` helper (``inspect.getmembers`` over the
language modules, ~2 ms a call).  The fused kernel calls ~20 helpers a program, so re-patching
took a third of every interpreted launch.  A helper defined in the launched kernel's module
sees the same language modules, already patched by the launch for its whole run: skipping the
repeat changes nothing the kernel computes.  Helpers of other modules still patch as before.
Applied only where the interpreter has the hooks it relies on; otherwise nothing changes.
"""
from __future__ import annotations


class _NoScope:
    def restore(self) -> None:
        pass


def install() -> bool:
    """Wrap the interpreter's ``_patch_lang``; True if it was there to wrap."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang", None)
    if original is None or getattr(original, "_skips_repeats", False):
        return False
    active: list = []  # the globals of the launch whose patch is in force (at most one)

    def patch_lang(fn):
        glb = getattr(fn, "__globals__", None)
        if active and glb is active[0]:
            return _NoScope()  # a helper of the running kernel's module: already patched
        scope = original(fn)
        if active or glb is None or not hasattr(scope, "restore"):
            return scope
        active.append(glb)  # the launch's own patch: in force until its scope restores
        restore = scope.restore

        def restore_and_forget():
            active.clear()
            restore()
        scope.restore = restore_and_forget
        return scope

    patch_lang._skips_repeats = True
    interpreter._patch_lang = patch_lang
    return True
