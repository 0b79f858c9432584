"""What one training step of the Triton backend allocates, counted on CPU without running a kernel.

    python -m bench.allocations SHAPE DTYPE [none]   # e.g. ptb_awd fp16; "none": no regularizer

A machine without a GPU cannot measure the benchmarks' peak memory, but what the launchers allocate does
not depend on what the kernels compute: under Triton's interpreter with every kernel launch skipped, the
step runs at the benchmark's full size in seconds to minutes, and every storage created during it is
counted until it is freed. Prints the peak bytes above what existed before the step (weights, input,
output gradient: what the GPU benchmarks' peak leaves out too) and the largest storages alive at that
peak. An allocation count, not a GPU measurement: the CUDA caching allocator rounds blocks up, and
cuBLAS may add workspace.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
import weakref

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import fused_rnn  # noqa: E402


class StorageCounter(TorchDispatchMode):
    """Counts the bytes of every storage an op creates while the mode is on, until it is freed. The
    fused_rnn custom ops run their Python implementation inside the mode, so their buffers count too."""

    def __init__(self, existing=()):
        super().__init__()
        self.live = {id(t.untyped_storage()): (0, "existing") for t in existing}
        self.current = self.peak = 0
        self.at_peak: list[tuple[int, str]] = []

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fused_rnn":
            from torch._library.custom_ops import OPDEFS

            with self:
                out = OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._count(func, tensor)
        return out

    def _count(self, func, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self.live or storage.nbytes() == 0:
            return
        frames = [f for f in traceback.extract_stack(limit=30) if "/fused_rnn/" in f.filename]
        where = f"{frames[-1].filename.rsplit('/fused_rnn/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
        self.live[key] = (storage.nbytes(), f"{func.__name__} {tuple(tensor.shape)} {tensor.dtype} at {where}")
        self.current += storage.nbytes()
        weakref.finalize(storage, self._free, key)
        if self.current > self.peak:
            self.peak = self.current
            self.at_peak = sorted(self.live.values(), reverse=True)


@contextlib.contextmanager
def kernels_skipped():
    """Every interpreted Triton launch returns at once; and the backward's in-place reuse of the reserve,
    which it refuses under a dispatch mode, is allowed as in an eager run without one."""
    from triton.runtime.interpreter import InterpretedFunction

    from fused_rnn.triton import ops

    run, dispatch_mode = InterpretedFunction.run, ops._get_current_dispatch_mode
    InterpretedFunction.run = lambda self, *args, **kwargs: None
    ops._get_current_dispatch_mode = lambda: None
    # the skipped kernels' outputs hold whatever their memory held: denormal garbage made a GEMM on a
    # dropped input 20 times slower than on numbers (110 against 5 us on CI's CPU), a cost no GPU pays
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        InterpretedFunction.run, ops._get_current_dispatch_mode = run, dispatch_mode
        torch.set_flush_denormal(False)


def training_step_peak(model: torch.nn.Module, x: torch.Tensor) -> StorageCounter:
    """The StorageCounter of one forward + backward of model on x (after one uncounted warm-up step, which
    also makes the output gradient)."""
    grad = None

    def step():
        nonlocal grad
        out, _ = model(x, seed=1)
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)
        model.zero_grad(set_to_none=True)
        x.grad = None

    with kernels_skipped():
        step()
        counter = StorageCounter(existing=[*model.parameters(), x, grad])
        with counter:
            step()
    return counter


def main(shape_name: str, dtype_name: str, regularizers: str = "all") -> None:
    from bench.providers import DTYPES, SHAPES_BY_NAME, regularizer_kwargs

    shape, dtype = SHAPES_BY_NAME[shape_name], DTYPES[dtype_name]
    kwargs = regularizer_kwargs(shape) if regularizers == "all" else {}
    model = fused_rnn.LSTM(
        shape.input_size, shape.hidden_size, shape.num_layers, backend="triton", dtype=dtype, **kwargs
    )
    x = torch.randn(shape.seq_len, shape.batch, shape.input_size, dtype=dtype, requires_grad=True)
    counter = training_step_peak(model, x)
    print(f"{shape_name} {dtype_name} {regularizers}: peak {counter.peak / 2**20:.1f} MiB above weights, input and "
          f"output gradient (Triton launchers, kernels not run, CPU)")
    for size, what in counter.at_peak[:12]:
        if size:
            print(f"  {size / 2**20:8.1f} MiB  {what}")


if __name__ == "__main__":
    main(*sys.argv[1:])
