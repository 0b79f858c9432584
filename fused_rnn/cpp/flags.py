"""Compiler flags of the C++ extension, shared by the just-in-time build (loader.py) and setup.py.

The kernels use ATen's Vectorized (and SLEEF's exp), which picks its instruction set from the CPU_CAPABILITY
macros at compile time: we build for the capability torch itself dispatches to on this machine.
"""

from __future__ import annotations

import os
import sys

_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


def cpu_capability() -> str:
    """AVX512, AVX2 or DEFAULT: $FUSED_RNN_CPU_CAPABILITY, else what torch's own kernels use here."""
    wanted = os.environ.get("FUSED_RNN_CPU_CAPABILITY")
    if not wanted:
        import torch

        wanted = torch.backends.cpu.get_cpu_capability()
    return wanted if wanted in _ISA_FLAGS else "DEFAULT"


def _openmp() -> list[str]:
    # Apple's clang has no -fopenmp; the kernels then run on one thread.
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def compile_flags(capability: str) -> list[str]:
    flags = ["-O3", f"-DCPU_CAPABILITY={capability}", *_openmp()]
    if capability in _ISA_FLAGS:
        flags += [f"-DCPU_CAPABILITY_{capability}", *_ISA_FLAGS[capability]]
    return flags


def link_flags() -> list[str]:
    return _openmp()
