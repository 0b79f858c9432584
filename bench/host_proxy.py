"""The host's time of a training step, measured without a GPU.

    python -m bench.host_proxy [--layers 1] [--loop persistent] [--steps 300] [--repeats 7]

At the small benchmark shapes a GPU waits for the host: fused_rnn's kernels take a fraction of a step,
and the step's time is the host's (bench/README.md, "Host time without a GPU"). This runs the benchmark's training step
(providers.build_step: forward, backward of a fixed gradient, gradients set to None) at a tiny size on CPU
tensors, the Triton backend under Triton's interpreter with every kernel's run skipped: every host call
around a launch runs (checks, plans, parameter sends, allocations, the launchers' argument binding,
autograd), no kernel does any work. Beside it, nn.LSTM's step at the same size, whose host work is what
cuDNN's is less its kernels. It prints the best of `repeats` means over `steps` steps of each.

On the H100 benchmarked at de30c8a, small_h256 fp16 forward + backward took 1.50 ms with nn.LSTM,
host-bound; this proxy's nn.LSTM on the 2-core CI VM took 261-291 us, 5.4 times less. Where a step is
host-bound, its time on that GPU's host is about 5.4 times the proxy's here. (fused_rnn there: 4.07 ms;
the proxy of de30c8a, 705-718 us, sent launch parameters at every launch on CPU, which a GPU did not.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# the interpreter is chosen when Triton is first imported
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

SIZE = dict(seq_len=20, batch=4, features=16)
LOOPS = ("persistent", "resident", "steps")


def step_time(step, steps: int, repeats: int) -> float:
    """Seconds a step: the best of `repeats` means over `steps` steps, after warm-up steps."""
    for _ in range(max(steps // 10, 5)):
        step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def measure(layers: int, loop: str, steps: int, repeats: int) -> dict[str, float]:
    """{provider: seconds a step} of fused_rnn's Triton backend with every regularizer and with none (kernels
    skipped), and of nn.LSTM, at SIZE with `layers` layers."""
    from fused_rnn import backends

    from .allocations import kernels_skipped
    from .providers import Built, Shape, build_step, make_input, regularizer_kwargs
    from .tune import recurrence

    if not backends.triton_interpreted():
        raise RuntimeError("bench.host_proxy needs Triton's interpreter: run it where TRITON_INTERPRET=1 was set "
                           "before Triton was imported (python -m bench.host_proxy sets it)")
    import fused_rnn

    shape = Shape("host_proxy", SIZE["seq_len"], SIZE["batch"], SIZE["features"], SIZE["features"], layers, ("cpu",))
    x = make_input(shape, torch.float32, torch.device("cpu"))

    def timed(module: torch.nn.Module) -> float:
        step = build_step(Built(module, lambda x: module(x)[0], {}), shape, x, "fwdbwd")
        return step_time(step, steps, repeats)

    times = {}
    with kernels_skipped(), recurrence(loop, None):
        for name, kwargs in (("fused_rnn (triton, every regularizer)", regularizer_kwargs(shape)),
                             ("fused_rnn (triton, none)", {})):
            torch.manual_seed(0)
            times[name] = timed(fused_rnn.LSTM(shape.input_size, shape.hidden_size, layers, backend="triton", **kwargs))
    torch.manual_seed(0)
    times["nn.LSTM (CPU)"] = timed(torch.nn.LSTM(shape.input_size, shape.hidden_size, layers))
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--loop", default="persistent", choices=LOOPS, help="the time loop whose launches run")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # nn.LSTM's tiny products gain nothing from threads, and vary less without
    try:
        times = measure(args.layers, args.loop, args.steps, args.repeats)
    finally:
        torch.set_num_threads(threads)
    print(f"bench.host_proxy: T={SIZE['seq_len']} B={SIZE['batch']} I=H={SIZE['features']} layers={args.layers}, "
          f"{args.loop} loop, kernels skipped; torch {torch.__version__}; best of {args.repeats} x {args.steps} steps")
    print("| provider | us a training step |\n|---|---:|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds * 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
