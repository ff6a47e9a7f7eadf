"""Builds and loads ``native_entry.cpp`` (the entry point's remembered calls in C++).

Built at first use with the system's C++ compiler against the installed torch's headers, into
a cache directory keyed by the source, torch and Python; later processes load the built
module.  No ninja or CUDA toolkit is needed: the source declares the few driver calls it makes.
When anything fails the reason is kept in ``why_not()`` and the entry point stays in Python.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

_SRC = Path(__file__).with_name("native_entry.cpp")
_NAME = "fused_qkv_native"
_module: Optional[ModuleType] = None
_why = ""  # why there is no module ("" before the first try and once it loaded)
_tried = False


def cache_dir() -> Path:
    """Where built modules go: ``$FUSED_QKV_CACHE_DIR`` or ``~/.cache/fused_qkv``."""
    root = os.environ.get("FUSED_QKV_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "fused_qkv"


def _flags() -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    inc = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    libs = [f"-L{p}" for p in library_paths()] + [f"-Wl,-rpath,{p}" for p in library_paths()]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return (["-O2", "-shared", "-fPIC", "-std=c++17", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"] +
            inc + libs + ["-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python", "-ldl"])


@functools.lru_cache(maxsize=None)
def _compiler() -> tuple[str, str]:
    """(path, version line) of the C++ compiler."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++ / g++ / $CXX)")
    done = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    return cxx, (done.stdout.splitlines() or [""])[0]


def _target() -> Path:
    """The module's path: keyed by everything the binary depends on (a torch rebuilt under the
    same version string differs in its git version)."""
    src = _SRC.read_bytes()
    parts = (torch.__version__, str(torch.version.git_version), sys.version, *_compiler(),
             " ".join(_flags()))
    tag = hashlib.sha256(src + "\0".join(parts).encode()).hexdigest()[:16]
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    return cache_dir() / f"{_NAME}-{tag}{suffix}"


def build(target: Path, lock_fd: Optional[int] = None) -> None:
    """Compile into ``target``.  The compiler's shell writes a temporary file and renames it
    (a reader never sees half a file), so that a build outlives a process that exits
    meanwhile, and holds ``lock_fd`` (the build lock) until it is done."""
    cxx = _compiler()[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    cmd = " ".join(shlex.quote(x) for x in [cxx, str(_SRC), "-o", str(tmp)] + _flags())
    script = (f"{cmd} && chmod 755 {shlex.quote(str(tmp))} && "
              f"mv -f {shlex.quote(str(tmp))} {shlex.quote(str(target))} || "
              f"{{ rc=$?; rm -f {shlex.quote(str(tmp))}; exit $rc; }}")
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=900,
                          pass_fds=(lock_fd,) if lock_fd is not None else ())
    if done.returncode:
        raise RuntimeError(f"{cxx} failed: {done.stderr.strip()[-2000:]}")


def _built(target: Path) -> ModuleType:
    """Import ``target``, building it first when it is missing or does not import.  A file
    lock next to it lets one process build while the others (an engine's workers) wait; a
    built module is imported without it (the cache may be read-only)."""
    if target.exists():
        try:
            return _import(target)
        except ImportError:  # a broken or foreign file under our name: build it again
            pass
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():  # another process built it meanwhile
            try:
                return _import(target)
            except ImportError:
                target.unlink()
        build(target, lock.fileno())
        return _import(target)


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(_NAME, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load() -> Optional[ModuleType]:
    """The built module, building it on the first call of the process; None when it cannot
    be built or loaded (``why_not()`` says why) or ``FUSED_QKV_NATIVE=0``."""
    global _module, _why, _tried
    if _tried:
        return _module
    _tried = True
    if os.environ.get("FUSED_QKV_NATIVE", "1") == "0":
        _why = "FUSED_QKV_NATIVE=0"
        return None
    try:
        _module = _built(_target())
    except Exception as e:  # no compiler, no headers, a read-only home...: stay in Python
        _why = f"{type(e).__name__}: {e}"
        _module = None
    return _module


def why_not() -> str:
    """Why ``load()`` gave None ("" when it did not, or was not called yet)."""
    return _why
