"""Which implementation runs a forward: availability, the "auto" choice and its fallback warning."""

from __future__ import annotations

import os
import sys
import warnings

import torch

from .regularizers import check_mode

BACKENDS = ("auto", "triton", "cpp", "reference")
_CPP_DTYPES = (torch.float32, torch.float64)


def check_backend_name(backend) -> str:
    return check_mode("backend", backend, BACKENDS)


_loaded: dict = {}  # backend name -> its module, or the reason it cannot be loaded (a str)


def _triton_module():
    if "triton" not in _loaded:
        try:
            import triton  # noqa: F401
        except ImportError as error:
            if error.name == "triton":
                _loaded["triton"] = f"Triton is not installed ({error}); install it with `pip install triton`"
            else:  # Triton is there, something it imports is not (its interpreter needs numpy)
                _loaded["triton"] = f"Triton failed to import ({type(error).__name__}: {error})"
        else:
            from . import triton as triton_backend

            _loaded["triton"] = triton_backend
    return _loaded["triton"]


def _cpp_module():
    if "cpp" not in _loaded:
        from .cpp import loader

        reason = loader.load_error()
        if reason is None:
            from . import cpp as cpp_backend

            _loaded["cpp"] = cpp_backend
        else:
            _loaded["cpp"] = reason
    return _loaded["cpp"]


def torch_func_transform_active() -> bool:
    """Whether a torch.func transform (grad, jvp, vmap, ...) is running the calling code."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `backend` cannot run tensors of this device and dtype here; None when it can."""
    if backend == "reference":
        return None
    if backend == "triton":
        if device.type == "cpu" and not triton_interpreted():
            return "the Triton backend runs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before import)"
        if device.type not in ("cpu", "cuda"):
            return f"the Triton backend runs CUDA tensors, got a {device.type} tensor"
        found = _triton_module()
        return found if isinstance(found, str) else None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the C++ backend runs CPU tensors, got a {device.type} tensor"
        if dtype not in _CPP_DTYPES:
            return f"the C++ backend runs float32 and float64, got {dtype}"
        found = _cpp_module()
        return found if isinstance(found, str) else None
    raise ValueError(f"unknown backend {backend!r}")


_warned: set = set()


def _warn_fallback(wanted: str, reason: str) -> None:
    """One warning per (backend, reason) and process."""
    if (wanted, reason) not in _warned:
        _warned.add((wanted, reason))
        warnings.warn(
            f"fused_rnn: the {wanted} backend is unavailable ({reason}); using the reference backend",
            stacklevel=_caller_stacklevel(),
        )


def _caller_stacklevel() -> int:
    """The stacklevel of a warnings.warn called here that names the caller's line: the first frame outside
    this package and torch (nn.Module's call machinery), counted from the function that warns."""
    skipped = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))
    frame, level = sys._getframe(2), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skipped):
        frame, level = frame.f_back, level + 1
    return level


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs: the one asked for, or for "auto" the fastest available here."""
    if backend != "auto":
        reason = unavailable_reason(backend, device, dtype)
        if reason is not None:
            raise RuntimeError(f"fused_rnn: backend={backend!r} is not available here: {reason}")
        return backend
    if device.type not in ("cpu", "cuda"):
        # no fused backend exists for other devices (meta, mps, ...): nothing is missing, so no warning
        return "reference"
    wanted = "triton" if device.type == "cuda" else "cpp"
    if device.type == "cpu" and dtype not in _CPP_DTYPES:
        return "reference"
    reason = unavailable_reason(wanted, device, dtype)
    if reason is None:
        return wanted
    _warn_fallback(wanted, reason)
    return "reference"


def module(backend: str):
    """The module implementing a resolved backend (reference, triton or cpp)."""
    if backend == "reference":
        from . import reference

        return reference
    if backend == "triton":
        return _triton_module()
    if backend == "cpp":
        return _cpp_module()
    raise ValueError(f"unknown backend {backend!r}")
