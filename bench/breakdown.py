"""Where a training step's time goes: the GPU time of every kernel in one forward + backward (torch.profiler),
beside the step's wall time, for the benchmark providers side by side.

    python -m bench.breakdown [--shapes ptb_awd,h512,long_h768] [--dtype fp16] [--providers fused_rnn,nn_lstm]
                              [--mode fwdbwd] [--steps 5] [--top 12] [--host]

Per provider and shape: wall ms a step (after warm-up, synchronised), the summed kernel time a step and
the kernel count a step, then the kernels that took the most (ms a step, launches a step). Wall time well
above the kernel sum is time the GPU waited for the host. With --host, for fused_rnn's providers, the
host's time until a step returned and the host time of the Triton backend's calls (HOST_CALLS, each
inclusive of what it calls, so the rows overlap). On CPU it runs the tiny shape, to test itself.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import importlib
import sys
import time

import torch

from .providers import DTYPES, PROVIDERS_BY_NAME, SHAPES_BY_NAME, Shape, build_step, make_input

TINY = Shape("tiny", 3, 2, 4, 8, 1, ("cpu",))
# (module, attribute) of the Triton backend's calls whose host time --host reports
HOST_CALLS = (
    ("fused_rnn.triton.ops", "layer"),
    ("fused_rnn.triton.ops", "dropout"),
    ("fused_rnn.triton.launch", "layer_forward"),
    ("fused_rnn.triton.launch", "layer_backward"),
    ("fused_rnn.triton.launch", "feature_dropout"),
    ("fused_rnn.triton.launch", "dropped_features"),
    ("fused_rnn.triton.launch", "packed_dropout"),
    ("fused_rnn.triton.launch", "dropped_weight"),
    ("fused_rnn.triton.launch", "step_parameters"),
    ("fused_rnn.triton.launch", "dropout_parameters"),
    ("fused_rnn.triton.launch", "recurrence_plan"),
    ("triton.runtime.jit", "JITFunction.run"),
)


def synchronizer(device: torch.device):
    """A call that waits for the device's work (nothing to wait for on CPU)."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def kernel_times(step, steps: int, device: torch.device) -> tuple[float, dict[str, tuple[float, int]]]:
    """(wall seconds a step, {kernel name: (GPU seconds a step, launches a step)}) over `steps` steps."""
    activity = torch.profiler.ProfilerActivity.CUDA if device.type == "cuda" else torch.profiler.ProfilerActivity.CPU
    sync = synchronizer(device)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall = (time.perf_counter() - start) / steps
    with torch.profiler.profile(activities=[activity]) as profile:
        for _ in range(steps):
            step()
        sync()
    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for event in profile.events():
        on_device = event.device_type == torch.autograd.DeviceType.CUDA
        if on_device != (device.type == "cuda"):
            continue
        if not on_device and event.cpu_parent is not None:
            continue  # on CPU: top-level ops only, so nothing counts twice
        entry = totals[event.name]
        entry[0] += event.device_time if on_device else event.cpu_time
        entry[1] += 1
    # microseconds -> seconds, per step
    return wall, {name: (us / steps / 1e6, count / steps) for name, (us, count) in totals.items()}


@contextlib.contextmanager
def host_timers():
    """Wrap each of HOST_CALLS that can be imported with a wall-clock timer for the duration; yields
    {"module.attribute": [seconds, calls]}."""
    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    patched = []
    for module_name, path in HOST_CALLS:
        try:
            owner = importlib.import_module(module_name)
        except ImportError:
            continue
        *parents, attribute = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        original = getattr(owner, attribute)
        label = f"{module_name.rsplit('.', 1)[-1]}.{path}"

        def timed(*args, _original=original, _entry=totals[label], **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                _entry[0] += time.perf_counter() - start
                _entry[1] += 1

        setattr(owner, attribute, functools.wraps(original)(timed))
        patched.append((owner, attribute, original))
    try:
        yield totals
    finally:
        for owner, attribute, original in reversed(patched):
            setattr(owner, attribute, original)


def host_times(step, steps: int, device: torch.device) -> tuple[float, dict[str, tuple[float, float]]]:
    """(host seconds until a step returned, {call: (host seconds a step, calls a step)}) over `steps` steps."""
    sync = synchronizer(device)
    returned = 0.0
    with host_timers() as totals:
        for _ in range(steps):
            sync()
            start = time.perf_counter()
            step()
            returned += time.perf_counter() - start
        sync()
    return returned / steps, {label: (seconds / steps, calls / steps) for label, (seconds, calls) in totals.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="ptb_awd,h512,long_h768")
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--providers", default="fused_rnn,nn_lstm")
    parser.add_argument("--mode", default="fwdbwd", choices=("fwdbwd", "fwd"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--host", action="store_true", help="also the host's time in the Triton backend's calls")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    shapes = [SHAPES_BY_NAME[name] for name in args.shapes.split(",")] if device.type == "cuda" else [TINY]
    print(f"bench.breakdown: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch "
          f"{torch.__version__}, {dtype}, {args.mode}, {args.steps} steps", flush=True)
    for shape in shapes:
        x = make_input(shape, dtype, device)
        for name in args.providers.split(","):
            built = PROVIDERS_BY_NAME[name].build(shape, dtype, device)
            step = build_step(built, shape, x, args.mode)
            for _ in range(2):
                step()
            wall, kernels = kernel_times(step, args.steps, device)
            busy = sum(seconds for seconds, _ in kernels.values())
            launches = sum(count for _, count in kernels.values())
            print(f"\n## {shape.name} ({shape.describe()}), {name} {built.info}: wall {wall * 1e3:.3f} ms, "
                  f"kernels {busy * 1e3:.3f} ms in {launches:.0f} launches a step", flush=True)
            print("| kernel | ms a step | launches a step |\n|---|---:|---:|")
            ranked = sorted(kernels.items(), key=lambda item: -item[1][0])
            for kernel, (seconds, count) in ranked[: args.top]:
                print(f"| {kernel[:90]} | {seconds * 1e3:.3f} | {count:.0f} |")
            rest = ranked[args.top:]
            if rest:
                print(f"| ({len(rest)} others) | {sum(s for _, (s, _) in rest) * 1e3:.3f} | "
                      f"{sum(c for _, (_, c) in rest):.0f} |", flush=True)
            if args.host and name.startswith("fused_rnn"):
                returned, calls = host_times(step, args.steps, device)
                print(f"\nhost: {returned * 1e3:.3f} ms a step until it returned\n"
                      "| host call | ms a step | calls a step |\n|---|---:|---:|")
                for label, (seconds, count) in sorted(calls.items(), key=lambda item: -item[1][0]):
                    if count:
                        print(f"| {label} | {seconds * 1e3:.3f} | {count:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
