"""The host's time of a training step, measured without a GPU.

    python -m bench.host_proxy [--layers 1] [--loop persistent] [--steps 300] [--repeats 7] [--instructions]

At the small benchmark shapes a GPU waits for the host: fused_rnn's kernels take a fraction of a step,
and the step's time is the host's (bench/README.md, "Host time without a GPU"). This runs the benchmark's training step
(providers.build_step: forward, backward of a fixed gradient, gradients set to None) at a tiny size on CPU
tensors, the Triton backend under Triton's interpreter with every kernel's run skipped: every host call
around a launch runs (checks, plans, parameter sends, allocations, the launchers' argument binding,
autograd), no kernel does any work. Beside it, nn.LSTM's step at the same size, whose host work is what
cuDNN's is less its kernels. It prints the best of `repeats` means over `steps` steps of each, or, with
--instructions, the instructions a step executes, counted by valgrind's callgrind: a count that the VM's
load does not move, to compare two builds by (a few minutes a provider).

On the H100 benchmarked at de30c8a, small_h256 fp16 forward + backward took 1.50 ms with nn.LSTM,
host-bound; this proxy's nn.LSTM on the 2-core CI VM took 261-291 us, 5.4 times less. Where a step is
host-bound, its time on that GPU's host is about 5.4 times the proxy's here. (fused_rnn there: 4.07 ms;
the proxy of de30c8a, 705-718 us, sent launch parameters at every launch on CPU, which a GPU did not.)
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
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


PROVIDERS = {
    "every": "fused_rnn (triton, every regularizer)",
    "none": "fused_rnn (triton, none)",
    "nn": "nn.LSTM (CPU)",
}
# steps of the two runs whose instruction counts are subtracted (--instructions): start-up and imports cancel
COUNTED_STEPS = (20, 220)
REPOSITORY = pathlib.Path(__file__).resolve().parent.parent  # where `python -m bench.host_proxy` runs


def training_steps(layers: int, loop: str) -> dict[str, object]:
    """{provider key: its training step} (PROVIDERS) at SIZE with `layers` layers, to be called inside
    kernels_skipped() and recurrence(loop, None)."""
    from fused_rnn import backends

    from .providers import Built, Shape, build_step, make_input, regularizer_kwargs

    if not backends.triton_interpreted():
        raise RuntimeError("bench.host_proxy needs Triton's interpreter: run it where TRITON_INTERPRET=1 was set "
                           "before Triton was imported (python -m bench.host_proxy sets it)")
    import fused_rnn

    shape = Shape("host_proxy", SIZE["seq_len"], SIZE["batch"], SIZE["features"], SIZE["features"], layers, ("cpu",))
    x = make_input(shape, torch.float32, torch.device("cpu"))
    steps = {}
    for key, kwargs in (("every", regularizer_kwargs(shape)), ("none", {})):
        torch.manual_seed(0)
        module = fused_rnn.LSTM(shape.input_size, shape.hidden_size, layers, backend="triton", **kwargs)
        steps[key] = build_step(Built(module, lambda x, m=module: m(x)[0], {}), shape, x, "fwdbwd")
    torch.manual_seed(0)
    module = torch.nn.LSTM(shape.input_size, shape.hidden_size, layers)
    steps["nn"] = build_step(Built(module, lambda x: module(x)[0], {}), shape, x, "fwdbwd")
    return steps


def measure(layers: int, loop: str, steps: int, repeats: int) -> dict[str, float]:
    """{provider: seconds a step} of fused_rnn's Triton backend with every regularizer and with none (kernels
    skipped), and of nn.LSTM, at SIZE with `layers` layers."""
    from .allocations import kernels_skipped
    from .tune import recurrence

    with kernels_skipped(), recurrence(loop, None):
        return {PROVIDERS[key]: step_time(step, steps, repeats) for key, step in training_steps(layers, loop).items()}


def run_steps(provider: str, layers: int, loop: str, steps: int) -> None:
    """`steps` training steps of one provider, nothing else: what --instructions counts under callgrind."""
    from .allocations import kernels_skipped
    from .tune import recurrence

    with kernels_skipped(), recurrence(loop, None):
        step = training_steps(layers, loop)[provider]
        for _ in range(steps):
            step()


def collected_instructions(valgrind_output: str) -> int:
    """The instruction count callgrind reports on exit ("Collected : N")."""
    found = re.search(r"Collected\s*:\s*(\d+)", valgrind_output)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output: {valgrind_output[-500:]!r}")
    return int(found.group(1))


def instructions_a_step(provider: str, layers: int, loop: str) -> float:
    """Instructions a training step of `provider` executes, counted by callgrind in two runs of COUNTED_STEPS
    steps and subtracted. Unlike a time, this does not move with the VM's load: repeated counts agree within
    2%, where wall times of one build varied by 25% in one session."""
    if shutil.which("valgrind") is None:
        raise RuntimeError("bench.host_proxy --instructions needs valgrind (callgrind) on the PATH")
    counts = []
    for steps in COUNTED_STEPS:
        command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m",
                   "bench.host_proxy", "--run-steps", str(steps), "--provider", provider, "--layers", str(layers),
                   "--loop", loop]
        done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPOSITORY)
        counts.append(collected_instructions(done.stderr))
    return (counts[1] - counts[0]) / (COUNTED_STEPS[1] - COUNTED_STEPS[0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--loop", default="persistent", choices=LOOPS, help="the time loop whose launches run")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--instructions", action="store_true",
                        help="count each provider's instructions a step under callgrind instead of timing it (minutes)")
    parser.add_argument("--run-steps", type=int, help=argparse.SUPPRESS)  # a child of --instructions
    parser.add_argument("--provider", choices=tuple(PROVIDERS), default="every", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # nn.LSTM's tiny products gain nothing from threads, and vary less without
    try:
        if args.run_steps is not None:
            run_steps(args.provider, args.layers, args.loop, args.run_steps)
            return 0
        if args.instructions:
            counts = {name: instructions_a_step(key, args.layers, args.loop) for key, name in PROVIDERS.items()}
        else:
            times = measure(args.layers, args.loop, args.steps, args.repeats)
    finally:
        torch.set_num_threads(threads)
    setting = (f"T={SIZE['seq_len']} B={SIZE['batch']} I=H={SIZE['features']} layers={args.layers}, {args.loop} loop, "
               f"kernels skipped; torch {torch.__version__}")
    if args.instructions:
        steps = COUNTED_STEPS[1] - COUNTED_STEPS[0]
        print(f"bench.host_proxy: {setting}; callgrind, runs of {COUNTED_STEPS[1]} and {COUNTED_STEPS[0]} steps "
              f"subtracted ({steps} steps)")
        print("| provider | thousand instructions a training step |\n|---|---:|")
        for name, count in counts.items():
            print(f"| {name} | {count / 1e3:.0f} |")
        return 0
    print(f"bench.host_proxy: {setting}; best of {args.repeats} x {args.steps} steps")
    print("| provider | us a training step |\n|---|---:|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds * 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
