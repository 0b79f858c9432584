"""Finds, builds and loads the C++ extension in csrc/, once per process, on first use (never at import).

Order: the ahead-of-time build `fused_rnn._C` (setup.py with FUSED_RNN_BUILD_CPP=1) when it loads, else a
just-in-time build with ninja (torch.utils.cpp_extension.load) into a cache directory keyed by the torch version,
the Python version and the CPU capability: $FUSED_RNN_CACHE, else $XDG_CACHE_HOME/fused_rnn or
~/.cache/fused_rnn. `load_error()` returns None once the operators are registered, or why they cannot be.
Set FUSED_RNN_VERBOSE=1 to see the compiler.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import sys
import sysconfig
import threading
import time
from pathlib import Path

import torch

from . import flags

_NAME = "fused_rnn_cpp"
_lock = threading.Lock()
_result: list = []  # [reason or None] once tried


@torch.compiler.assume_constant_result  # torch.compile calls it (building if need be) and keeps the answer
def load_error() -> str | None:
    """None when the extension is loaded and its operators registered, else a one-line reason."""
    with _lock:
        if not _result:
            _result.append(_load())
        return _result[0]


def source_dir() -> Path | None:
    """csrc/ as installed (package data fused_rnn/csrc) or in the source tree."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "lstm.cpp").is_file():
            return candidate
    return None


def cache_base() -> Path:
    """$FUSED_RNN_CACHE, else $XDG_CACHE_HOME/fused_rnn or ~/.cache/fused_rnn: the package's cache folder."""
    root = os.environ.get("FUSED_RNN_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fused_rnn"


def cache_dir() -> Path:
    key = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{flags.cpu_capability()}"
    return cache_base() / re.sub(r"[^A-Za-z0-9_.+-]", "_", key)


def _load() -> str | None:
    aot_error = None
    spec = importlib.util.find_spec("fused_rnn._C")
    if spec is not None and spec.origin:
        try:
            torch.ops.load_library(spec.origin)
        except (OSError, RuntimeError) as error:
            # built for another torch: build just in time instead
            aot_error = f"the prebuilt fused_rnn._C does not load ({_first_line(str(error))})"
        else:
            return _register()
    reason = _build_and_load()
    if reason is not None:
        return reason if aot_error is None else f"{aot_error}; {reason}"
    return _register()


def _register() -> str | None:
    try:
        from . import ops  # noqa: F401  (fake and autograd registrations)
    except Exception as error:  # a torch without torch.library.register_autograd, ...
        return f"registering the C++ operators failed: {_first_line(str(error))}"
    return None


def _build_and_load() -> str | None:
    from torch.utils import cpp_extension

    sources = source_dir()
    if sources is None:
        return "the C++ sources (csrc/lstm.cpp) are not installed"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler found (CXX={compiler!r}); install g++ or clang++, or set CXX"
    with _scripts_on_path():
        if not cpp_extension.is_ninja_available():
            return "ninja is not installed (`pip install ninja`)"
    build_dir = cache_dir()
    capability = flags.cpu_capability()
    verbose = os.environ.get("FUSED_RNN_VERBOSE", "0") not in ("", "0")
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        with _build_lock(build_dir), _default_env("MAX_JOBS", "2"), _scripts_on_path():
            cpp_extension.load(
                name=_NAME,
                sources=[str(sources / "lstm.cpp")],
                extra_cflags=flags.compile_flags(capability),
                extra_ldflags=flags.link_flags(),
                extra_include_paths=[str(sources)],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=verbose,
            )
    except Exception as error:
        return f"building the C++ extension failed: {_compiler_error(str(error))} (build directory {build_dir}; FUSED_RNN_VERBOSE=1 shows the compiler)"
    return None


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Hold an exclusive lock on the build directory, and clear torch's lock file left by a killed build.

    torch's own lock ('lock', a plain file) is never removed when the build is killed, and every later load waits
    on it forever. Our lock is an flock, released by the OS when its holder dies: whoever holds it knows that a
    'lock' file present now is stale.
    """
    stale = build_dir / "lock"
    try:
        import fcntl
    except ImportError:  # no flock: treat a lock older than ten minutes as stale
        if stale.exists() and time.time() - stale.stat().st_mtime > 600:
            stale.unlink(missing_ok=True)
        yield
        return
    with open(build_dir / "fused_rnn.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _default_env(name: str, value: str):
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


@contextlib.contextmanager
def _scripts_on_path():
    """PATH with this Python's scripts folder last, where it is missing: `pip install ninja` puts ninja there,
    which torch runs from PATH, and a virtual environment's Python run without activating it has no such PATH."""
    scripts = sysconfig.get_path("scripts")
    path = os.environ.get("PATH", "")
    if not scripts or scripts in path.split(os.pathsep):
        yield
        return
    os.environ["PATH"] = os.pathsep.join(filter(None, (path, scripts)))
    try:
        yield
    finally:
        os.environ["PATH"] = path


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else "no message"


def _compiler_error(text: str) -> str:
    for line in text.splitlines():
        if re.search(r"\berror\b", line, re.IGNORECASE) and "Error building extension" not in line:
            return line.strip()[:300]
    return _first_line(text)
