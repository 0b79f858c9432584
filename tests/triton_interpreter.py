"""Speed-ups of Triton's interpreter for the suite (conftest installs them): each leaves what a kernel computes
as it was, bit for bit, and is left out where Triton's interpreter is not laid out as it expects."""

from __future__ import annotations

import inspect
import os

import numpy as np


def install() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton.language  # noqa: F401
        from triton.runtime import interpreter  # noqa: F401
    except ImportError:
        return
    patch_triton_language_once_a_launch()
    philox_rounds_by_the_reference()


def patch_triton_language_once_a_launch() -> None:
    """Triton's interpreter patches triton.language for a launch, and again at every call of a @triton.jit
    function inside the kernel (Triton 3.9: `inspect.getmembers` of the modules the function sees, about 0.7 ms
    a call): with the kernels' helpers called per tile and step, that was a fifth of the interpreted suite's
    time. Here a call inside a launch patches only where no call of the launch has patched the modules it sees
    (`triton.language`, as our kernels and helpers, or `triton.language.core`, as Triton's own @jit functions
    like tl.zeros): its patches would be the ones in place."""
    import triton.language as tl
    from triton.runtime import interpreter

    patch_lang = getattr(interpreter, "_patch_lang", None)
    launch = getattr(getattr(interpreter, "GridExecutor", None), "__call__", None)
    if patch_lang is None or launch is None or not hasattr(interpreter, "_LangPatchScope"):
        return
    languages = (tl, tl.core)
    seen_by: dict = {}  # function -> the indices in `languages` of the modules its globals hold
    running: list = []  # per launch running: the set of modules patched since it started

    def run(self, *args, **kwargs):
        running.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            running.pop()

    def patch_once(fn):
        seen = seen_by.get(fn)
        if seen is None:
            seen = seen_by[fn] = frozenset(i for i, lang in enumerate(languages)
                                           if any(value is lang for value in fn.__globals__.values()))
        if running and seen <= running[-1]:
            return interpreter._LangPatchScope()  # nothing to restore
        scope = patch_lang(fn)
        if running:
            running[-1].update(seen)
        return scope

    interpreter.GridExecutor.__call__ = run
    interpreter._patch_lang = patch_once


# Triton's own interpreted philox_impl, where philox_rounds_by_the_reference replaced it (for the tests that compare)
tritons_philox_impl = None


def philox_rounds_by_the_reference() -> None:
    """tl.philox's ten rounds (triton.language.random.philox_impl) on 32-bit words, computed on whole arrays by
    the reference's Philox (fused_rnn.philox.philox4x32): interpreted, each of a round's six operations went
    through Triton's type checks and broadcasts, and the rounds took 40% of an interpreted layer's time with
    every regularizer on. The words are what Triton's rounds give, their shapes and types included (after ten
    rounds every word has mixed in every input: a block wherever one input is); 64-bit words, other round
    counts and anything unexpected still go to Triton's. test_philox checks both against each other and
    against Philox4x32-10's known answers."""
    global tritons_philox_impl
    import torch
    import triton.language as tl
    from triton.language import random as tl_random
    from triton.runtime import interpreter

    from fused_rnn import philox

    original = getattr(tl_random, "philox_impl", None)
    function = getattr(original, "fn", None)
    TensorHandle = getattr(interpreter, "TensorHandle", None)  # noqa: N806
    if (function is None or TensorHandle is None or not hasattr(tl, "block_type")
            or list(inspect.signature(function).parameters) != ["c0", "c1", "c2", "c3", "k0", "k1", "n_rounds"]):
        return
    tritons_philox_impl = original

    def philox_impl(c0, c1, c2, c3, k0, k1, n_rounds=tl_random.N_ROUNDS_DEFAULT):
        words = (c0, c1, c2, c3, k0, k1)
        if (tl.core._unwrap_if_constexpr(n_rounds) != philox.PHILOX_ROUNDS
                or any(not isinstance(word, tl.tensor) or word.dtype != tl.uint32 for word in words)):
            return original(c0, c1, c2, c3, k0, k1, n_rounds)
        # a scalar's data: shape (1,); int64 holds every uint32, as philox4x32 wants
        results = philox.philox4x32(*(torch.from_numpy(word.handle.data.astype(np.int64)) for word in words))
        block = any(word.type.is_block() for word in words)
        return tuple(
            tl.tensor(TensorHandle(data, tl.uint32), tl.block_type(tl.uint32, list(data.shape)) if block else tl.uint32)
            for data in (result.numpy().astype(np.uint32) for result in results)
        )

    tl_random.philox_impl = philox_impl
