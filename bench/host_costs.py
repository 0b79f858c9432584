"""What the host pays for each kind of call a training step of the Triton backend makes, in us a call.

    python -m bench.host_costs [DEVICE]   # cuda (default where there is one) or cpu

Where a step is host-bound (bench.breakdown: wall well above the kernels' sum), its time is the sum of
such calls. This times each one alone, a few thousand times, on the device's host: an ATen allocation,
a fill, a view, a GEMM's launch, one of the Triton backend's kernel launches straight to the compiled
kernel (launch.RepeatedLaunch) and through launch.launch_specialised (its key, then the same), an
autograd.Function's apply, a custom op's dispatch, launch.recurrence_plan, and a whole training step of
one H512 layer with every regularizer and without, beside nn.LSTM's, until each returns (nothing waited
for), and when fused_rnn's step reaches each of its milestones (MILESTONES: its layer's forward launcher and
its recurrence's cooperative launch, the engine's call of the layer's backward, the backward's launcher and
its recurrence's launch), in steps started with the GPU's queue drained and in steps one after another. The
GPU's queue is drained between rows, never inside one. Under the interpreter (CPU) the kernel rows run the
interpreter's launch and are not what a GPU's host pays.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

CALLS = 2000
STEPS = 30


def per_call(fn, calls: int = CALLS, sync=lambda: None) -> float:
    """Median over 5 rounds of the mean us a call of fn() over `calls` calls."""
    for _ in range(min(calls, 50)):
        fn()
    sync()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
        sync()
    return statistics.median(rounds)


# (label, owner, attribute, when): a step's milestones, each the first time `owner.attribute` is entered
# ("call") or returns ("return"), or the last time it returns ("last return")
MILESTONES = (
    ("layer_forward", "launch", "layer_forward", "call"),
    ("forward recurrence launch", "launch", "_launch_persistent", "call"),
    ("its return", "launch", "_launch_persistent", "return"),
    ("layer_forward's return", "launch", "layer_forward", "return"),
    ("backward()", "autograd", "backward", "call"),
    ("layer's backward", "ops", "backward", "call"),
    ("layer_backward", "launch", "layer_backward", "call"),
    ("recurrence launched", "launch", "_launch_persistent", "last return"),
)


def milestones(step, steps: int, sync, drained: bool = True) -> tuple[float, ...]:
    """Median us from a training step's start until each of MILESTONES, then until its return: its layer's
    forward launcher called, the forward recurrence's persistent or resident launch called and returned (a
    cooperative launch, whose host cost no other row shows), the launcher returned, torch.autograd.backward
    called, the layer's autograd backward (ops) called, launch.layer_backward called, its last persistent or
    resident launch returned (the backward's recurrence). A milestone a step does not reach (a plan of a
    launch per step has no persistent launch) reads 0. A step whose backward recurrence takes most of the
    GPU's time lasts about the time to that launch plus the recurrence: the host's time before it is what
    the GPU waits for.

    drained: each step starts with the GPU's queue drained, as the benchmarks' steps do; else the steps
    follow one another as a training loop's do, the queue drained only before the first, so that where a
    call waits for the GPU (a synchronising call, a full launch queue), the step's marks after it move."""
    from fused_rnn.triton import launch, ops

    owners = {"launch": launch, "autograd": torch.autograd, "ops": ops._LayerFunction}
    patched = {(owner, attribute) for _, owner, attribute, _ in MILESTONES}
    originals = {key: owners[key[0]].__dict__[key[1]] for key in patched}
    marks: dict[tuple[str, str, str], float] = {}

    def marked(key):
        original = originals[key]
        function = original.__func__ if isinstance(original, staticmethod) else original

        def call(*args, **kwargs):
            marks.setdefault((*key, "call"), time.perf_counter())
            result = function(*args, **kwargs)
            now = time.perf_counter()
            marks.setdefault((*key, "return"), now)
            marks[(*key, "last return")] = now
            return result

        return staticmethod(call) if isinstance(original, staticmethod) else call

    rows = []
    try:
        for key in patched:
            setattr(owners[key[0]], key[1], marked(key))
        sync()
        for _ in range(steps + 3):
            if drained:
                sync()
            marks.clear()
            start = time.perf_counter()
            step()
            end = time.perf_counter()
            at = [marks.get((owner, attribute, when)) for _, owner, attribute, when in MILESTONES]
            rows.append(tuple(0.0 if mark is None else (mark - start) * 1e6 for mark in (*at, end)))
    finally:
        for key, original in originals.items():
            setattr(owners[key[0]], key[1], original)
    # the first steps warm up
    return tuple(statistics.median(column) for column in zip(*rows[3:]))


def main(argv: list[str]) -> int:
    device = torch.device(argv[0] if argv else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        from .allocations import kernels_skipped

        with kernels_skipped():
            return measure(device)
    return measure(device)


def measure(device: torch.device) -> int:
    import torch.nn.functional as F

    import fused_rnn
    from fused_rnn import philox
    from fused_rnn.triton import kernels, launch, ops

    from .providers import SHAPES_BY_NAME, Built, Shape, build_step, make_input, regularizer_kwargs

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    # small tensors: the host's cost, not the GPU's, is what each row shows
    x = torch.randn(8, 4, 64, device=device, dtype=dtype)
    w = torch.randn(256, 64, device=device, dtype=dtype)
    seed = launch.seed_tensor(1, device)
    ints, floats = launch.dropout_parameters(0.1, device, dtype)
    out = torch.empty_like(x)
    numel = x[0].numel()
    blocks = launch.cdiv(numel, launch.ELEMENTWISE_BLOCK)
    arguments = (seed, x, out, x, out, ints, floats, 0, 0, philox.KIND_INPUT, 0, numel, blocks, 1, 0)
    grid = (x.shape[0] * blocks,)
    constexprs = dict(BLOCK=launch.ELEMENTWISE_BLOCK, PAIRED=False)
    repeated = launch.RepeatedLaunch(kernels.packed_dropout_kernel, grid, **constexprs)

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, grad):
            return grad

    leaf = x.clone().requires_grad_()
    call_seed = torch.tensor(1, dtype=torch.int64)  # a call's seed, as functional.lstm passes it: on the CPU
    rows = {
        "python call of an empty function": lambda: None,
        "torch.empty [8, 4, 64]": lambda: torch.empty(8, 4, 64, device=device, dtype=dtype),
        "torch.empty_like": lambda: torch.empty_like(x),
        "torch.zeros(1, int32)": lambda: torch.zeros(1, dtype=torch.int32, device=device),
        "Tensor.view": lambda: x.view(32, 64),
        "Tensor.select": lambda: x[0],
        "Tensor.contiguous (already)": lambda: x.contiguous(),
        "Tensor.to(float32)": lambda: x.to(torch.float32),
        "F.linear [32, 64] x [256, 64]": lambda: F.linear(x, w),
        "torch.full((1,), seed, int64)": lambda: torch.full((1,), 7, dtype=torch.int64, device=device),
        "Triton launch, compiled (RepeatedLaunch: the launcher itself, no hooks)": lambda: repeated(*arguments),
        # Triton's runner, which builds the hooks' metadata and passes the hook chains (the interpreter has none)
        "Triton launch, compiled, through Triton's runner": lambda: (
            repeated.compiled(*arguments, *repeated.trailing) if repeated.compiled is not None else repeated(*arguments)),
        "Triton launch, launch_specialised": lambda: launch.launch_specialised(
            kernels.packed_dropout_kernel, grid, *arguments, **constexprs),
        "autograd.Function.apply (identity)": lambda: Identity.apply(leaf),
        "ops.dropout, eager (apply + launch)": lambda: ops.dropout(leaf, call_seed, philox.KIND_INPUT, 0, 0.1, False),
        "ops.feature_dropout custom op (dispatch + launch)": lambda: ops.feature_dropout(
            leaf, call_seed, philox.KIND_INPUT, 0, 0.1, False),
        "launch.recurrence_plan (kept)": lambda: launch.recurrence_plan(device, "default", 2, 64, 512, 512),
        "launch.choose_plan": lambda: launch.choose_plan(device, "default", 2, 64, 512, 512),
    }
    print(f"bench.host_costs: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"torch {torch.__version__}, {dtype}; us a call, median of 5 rounds of {CALLS}")
    print("| call | us |\n|---|---:|")
    for name, fn in rows.items():
        print(f"| {name} | {per_call(fn, sync=sync):.2f} |", flush=True)

    shape = SHAPES_BY_NAME["h512"] if device.type == "cuda" else Shape("tiny", 3, 2, 4, 8, 1, ("cpu",))
    inputs = make_input(shape, dtype, device)
    models = {
        # the Triton backend's (auto's on CUDA; on CPU, its host calls with the kernels skipped)
        "fused_rnn, every regularizer": fused_rnn.LSTM(shape.input_size, shape.hidden_size, shape.num_layers,
                                                       device=device, dtype=dtype, backend="triton",
                                                       **regularizer_kwargs(shape)),
        "fused_rnn, none": fused_rnn.LSTM(shape.input_size, shape.hidden_size, shape.num_layers, device=device,
                                          dtype=dtype, backend="triton"),
        "nn.LSTM": torch.nn.LSTM(shape.input_size, shape.hidden_size, shape.num_layers, device=device, dtype=dtype),
    }
    print(f"\n{shape.name}: a training step's host time until it returned (the GPU may still run), and with the "
          f"GPU waited for; median of 5 rounds of {STEPS}")
    print("| provider | host us | synchronised us |\n|---|---:|---:|")
    steps = {}
    for name, model in models.items():
        step = build_step(Built(model, lambda x, model=model: model(x)[0], {}), shape, inputs, "fwdbwd")
        returned = per_call(step, STEPS, sync)

        def synchronised(step=step):
            step()
            sync()

        print(f"| {name} | {returned:.0f} | {per_call(synchronised, STEPS):.0f} |", flush=True)
        if name.startswith("fused_rnn"):
            steps[name] = step
    labels = [label for label, *_ in MILESTONES] + ["returned"]
    for drained, when in ((True, "each started with the GPU's queue drained"),
                          (False, "one after another, as in training, the queue drained before the first")):
        print(f"\n{shape.name}: host us from a training step's start until each milestone (host_costs.milestones) "
              f"and until it returned; steps {when}; median of {STEPS}")
        print("| provider | " + " | ".join(labels) + " |\n|---|" + "---:|" * len(labels))
        for name, step in steps.items():
            times = milestones(step, STEPS, sync, drained)
            print("| " + " | ".join([name, *(f"{us:.0f}" for us in times)]) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
