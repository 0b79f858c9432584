"""Time one layer's forward and backward loops of the Triton backend in each way it can run them, beside
cuDNN's, to choose the defaults with: GPU time per step, by loop kind and warps, at the benchmark shapes.

    python -m bench.tune [--shapes long_h768,h512,ptb_awd] [--dtype fp16] [--modes steps,persistent,resident]
                         [--variants "resident w4,..." | all] [--no-reference] [--reps 5] [--jsonl FILE]

Each line printed is one measurement (also appended to --jsonl as it is made, so a time limit keeps what
ran). The rows (the kF/kB and BxH variants only where --variants names them, or is all):
- cudnn: nn.LSTM, one layer, no regularizer; "backward" is its forward + backward minus its forward.
- steps / persistent / resident (FUSED_RNN_RECURRENCE) with 4 or 8 warps for the persistent and
  resident launches (and 2 for the resident ones): launch.layer_forward and launch.layer_backward alone,
  every recurrence regularizer on, which include the input projection and the weight GEMMs after the
  loop, as cuDNN's times do.
- steps / persistent kF/kB: the same with the products' K tiles of the forward F and the backward B deep
  (FUSED_RNN_BLOCK_K; the other variants run launch.block_depth's); steps BxH: the backward's per-step
  tiles of B rows and H units (FUSED_RNN_STEP_TILE; the forward's, and the others, launch.tile_sizes').
- persistent / resident load: their grid barriers poll with acquire loads (FUSED_RNN_BARRIER=load).
- persistent / resident where-used: each step input and setting loaded where it is used, not ahead
  (FUSED_RNN_LOAD_AHEAD=0: the kernels as they were before loading ahead).
- steps / resident unpadded: the GEMMs' operands as they are, rows not padded to whole 16 bytes
  (FUSED_RNN_GEMM_PADDING=0; launch.gemm_row_elements): where a layer's sizes are no multiple of 8 (PTB).
- resident stored W~: with weight drop, the resident kernels load a W~ made by a launch before
  (FUSED_RNN_WEIGHT_DROP_LOADED=0), where by default the small slabs drop W_hh as they load it
  (launch.weight_drop_loaded; the small_h256 layer's, forward and backward).
- barrier: a launch of the resident plan's programs that does nothing but one grid barrier per step,
  the floor under a persistent step; "barrier load" polls with acquire loads (GPU only).
The plan column is the loop that ran (a refused launch falls back, and says so); its programs, row tile
and unit tile. "host ms": until the call returned, before the GPU finished; close to the total, the GPU
waited for the host's launches (a launch per step), not for its own work. On CPU (under
TRITON_INTERPRET=1) the script runs the tiny shape only, to test itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
import typing

import torch
import triton
import triton.language as tl

from fused_rnn.regularizers import Regularizers
from fused_rnn.triton import launch
from fused_rnn.triton.kernels import grid_barrier

from .providers import DTYPES, EVERY_REGULARIZER, SHAPES_BY_NAME, Shape

TINY = Shape("tiny", 3, 2, 5, 8, 1, ("cpu",))
RECURRENCE = Regularizers(**{**EVERY_REGULARIZER, "dropout": 0.0})
# (name, FUSED_RNN_RECURRENCE, num_warps of persistent and resident launches or None, other environment
# variables). Defaults (launch.persistent_options): persistent 4 warps (8 in float32 before 4567233); resident
# forwards 4 below 64 product columns, else 8; resident backwards launch.resident_warps; K tiles
# launch.block_depth; per-step tiles launch.tile_sizes.
VARIANTS = (
    ("steps", "steps", None, {}),
    ("persistent w4", "persistent", 4, {}),
    ("persistent w8", "persistent", 8, {}),
    ("resident w8", "resident", 8, {}),
    ("resident w4", "resident", 4, {}),
    # a product tile of one row of MMA tiles is computed whole by every warp (fused_rnn/triton/README.md,
    # "Measured on the H200"): fewer warps, less of it done twice
    ("resident w2", "resident", 2, {}),
) + tuple(
    (f"{mode} k{forward}/{backward}", mode, None, {"FUSED_RNN_BLOCK_K": f"{forward},{backward}"})
    for mode in ("steps", "persistent")
    for forward, backward in ((32, 32), (64, 64), (32, 64), (64, 128), (32, 256))
) + tuple(
    # the backward's tiles only: the forward's spilled registers at these in the sm_90 compile (and at PTB in
    # 16-bit the forward runs resident); 32 x 64 spilled in the backward's too
    (f"steps {tile}", "steps", None, {"FUSED_RNN_STEP_TILE": f",{tile}"}) for tile in ("16x32", "32x32", "16x64")
) + tuple(
    (f"{mode} load", mode, None, {"FUSED_RNN_BARRIER": "load"}) for mode in ("persistent", "resident")
) + tuple(
    (f"{mode} where-used", mode, None, {"FUSED_RNN_LOAD_AHEAD": "0"}) for mode in ("persistent", "resident")
) + tuple(
    # the GEMMs' operands as they are, rows not padded to 16 bytes (launch.gemm_row_elements): at PTB's 1150
    (f"{mode} unpadded", mode, None, {"FUSED_RNN_GEMM_PADDING": "0"}) for mode in ("steps", "resident")
) + (
    # weight drop from a W~ made by a launch before, where the default drops W_hh as the slabs load (small slabs)
    ("resident stored W~", "resident", None, {"FUSED_RNN_WEIGHT_DROP_LOADED": "0"}),
)


@triton.jit(do_not_specialize=["steps"])
def barrier_loop_kernel(arrivals_ptr, steps, POLL_LOADS: tl.constexpr):
    expected = 0
    for _ in range(steps):
        expected += tl.num_programs(0)
        grid_barrier(arrivals_ptr, expected, POLL_LOADS)


@contextlib.contextmanager
def recurrence(mode: str, warps: int | None, environment: dict | None = None):
    """FUSED_RNN_RECURRENCE=mode, persistent launches with `warps` warps and the other environment
    variables given, for the duration."""
    environment = {"FUSED_RNN_RECURRENCE": mode, **(environment or {})}
    saved = {name: os.environ.get(name) for name in environment}
    saved_options = launch.persistent_options
    os.environ.update(environment)

    def options(device, plan):
        chosen = saved_options(device, plan)
        if warps is not None and chosen:
            chosen = {**chosen, "num_warps": warps}
        return chosen

    launch.persistent_options = options
    # a refusal rules a kind out for the process: each variant starts afresh
    launch._persistent_refused.clear()
    launch._resident_refused.clear()
    try:
        yield
    finally:
        launch.persistent_options = saved_options
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Timing(typing.NamedTuple):
    """Median seconds of a call until the GPU finished its work (total), and until it returned (host): where
    the two are close, the host enqueueing launches is what the GPU waits for."""

    total: float
    host: float

    def __sub__(self, other: "Timing") -> "Timing":
        return Timing(self.total - other.total, self.host - other.host)


def timed(fn, prepare, reps: int, device: torch.device) -> Timing:
    """fn()'s Timing over reps calls after one warm-up, prepare() run untimed before each."""
    prepare()
    fn()
    totals, hosts = [], []
    for _ in range(reps):
        prepare()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        hosts.append(time.perf_counter() - start)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        totals.append(time.perf_counter() - start)
    return Timing(statistics.median(totals), statistics.median(hosts))


class Layer:
    """One layer of a shape (its first: input_size -> hidden_size), every tensor launch.layer_forward and
    launch.layer_backward take, and a fixed output gradient."""

    def __init__(self, shape: Shape, dtype: torch.dtype, device: torch.device):
        generator = torch.Generator().manual_seed(0)
        T, B, I, H = shape.seq_len, shape.batch, shape.input_size, shape.hidden_size

        def uniform(*size):
            return ((torch.rand(size, generator=generator) * 2 - 1) / math.sqrt(H)).to(device, dtype)

        self.shape, self.dtype, self.device = shape, dtype, device
        self.x = torch.randn(T, B, I, generator=generator).to(device, dtype)
        self.w_ih, self.w_hh, self.bias = uniform(4 * H, I), uniform(4 * H, H), uniform(4 * H)
        self.h0 = torch.zeros(B, H, device=device, dtype=dtype)
        self.c0 = torch.zeros(B, H, device=device, dtype=dtype)
        self.d_out = torch.randn(T, B, H, generator=generator).to(device, dtype)
        self.d_h_n, self.d_c_n = torch.zeros_like(self.h0), torch.zeros_like(self.c0)
        self.seed = 12345
        self.ints, self.floats = launch.step_parameters(RECURRENCE, True, device, dtype)
        self.flags = launch.Recurrence.of(RECURRENCE, True)

    def forward(self):
        return launch.layer_forward(self.x, self.h0, self.c0, self.w_ih, self.w_hh, self.bias, None, None,
                                    self.seed, self.ints, self.floats, self.flags, 0, False)

    def plans(self) -> str:
        """The forward's and the backward's loop as the launcher would choose them now."""
        precision = launch.dot_precision(self.dtype, self.device)
        shape = self.shape
        chosen = []
        for forward in (True, False):
            plan = launch.recurrence_plan(self.device, precision, self.x.element_size(), shape.batch,
                                          shape.hidden_size, shape.hidden_size, forward)
            chosen.append(f"{plan.kind} {plan.programs}x{plan.block_b}x{plan.block_h}")
        return " / ".join(chosen)

    def measure(self, reps: int) -> tuple[Timing, Timing]:
        """Timings of the forward and of the backward (its gate gradients into a buffer of their own, so the
        reserve it reads stays as the forward left it)."""
        forward_time = timed(self.forward, lambda: None, reps, self.device)
        out, h_n, c_n, xg, rs, cs, hpre = self.forward()
        dgates = torch.empty_like(xg)

        def backward():
            launch.layer_backward(self.d_out, self.d_h_n, self.d_c_n, self.x, self.w_ih, self.w_hh, None, None,
                                  self.seed, self.ints, self.floats, self.flags, 0, False, xg, rs, cs, hpre, dgates)

        backward_time = timed(backward, lambda: None, reps, self.device)
        return forward_time, backward_time


def cudnn_times(layer: Layer, reps: int) -> tuple[Timing, Timing]:
    shape = layer.shape
    lstm = torch.nn.LSTM(shape.input_size, shape.hidden_size, device=layer.device, dtype=layer.dtype)
    x = layer.x.detach().requires_grad_()

    def forward():
        return lstm(x)

    def forward_backward():
        out, _ = lstm(x)
        out.backward(layer.d_out)

    forward_time = timed(forward, lambda: None, reps, layer.device)
    total = timed(forward_backward, lambda: None, reps, layer.device)
    return forward_time, total - forward_time


def barrier_time(layer: Layer, reps: int, poll_loads: bool) -> tuple[Timing, int]:
    """Seconds of seq_len grid barriers among the resident forward's programs (or one program), polling with
    acquire loads or atomic adds (launch.barrier_poll_loads)."""
    plan = launch.resident_plan(launch.gpu_limits(layer.device), layer.x.element_size(), layer.shape.batch,
                                layer.shape.hidden_size) if layer.device.type == "cuda" else None
    programs = plan.programs if plan is not None else 1
    arrivals = torch.zeros(1, dtype=torch.int32, device=layer.device)
    # launched as the resident kernels are (launch.persistent_options)
    options = launch.persistent_options(layer.device, plan) if plan is not None else {}

    def run():
        barrier_loop_kernel[(programs,)](arrivals, layer.shape.seq_len, POLL_LOADS=poll_loads, **options)

    return timed(run, arrivals.zero_, reps, layer.device), programs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="long_h768,h512,ptb_awd")
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--modes", default="steps,persistent,resident",
                        help="the loop kinds to time (the GPU check leaves out one whose smoke step failed)")
    parser.add_argument("--variants", default="",
                        help="of the fused variants, these only (names as printed); 'all' for every one; "
                             "by default those of the launchers' own tiles and depths (no tuning variable)")
    parser.add_argument("--no-reference", action="store_true", help="leave out the cudnn and barrier rows")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--jsonl", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    shapes = [SHAPES_BY_NAME[name] for name in args.shapes.split(",")] if device.type == "cuda" else [TINY]
    if device.type != "cuda":
        dtype = torch.float32  # the interpreter computes half precision wrongly; this run tests the script
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(open(args.jsonl, "a")) if args.jsonl else None
        run(args, device, dtype, shapes, sink)
    return 0


def run(args, device: torch.device, dtype: torch.dtype, shapes: list, sink) -> None:
    print(f"bench.tune: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU (interpreter)'}, "
          f"torch {torch.__version__}, Triton {triton.__version__}, {dtype}, median of {args.reps}", flush=True)
    print("| shape | variant | plan (forward / backward) | forward ms | us/step | host ms | backward ms | us/step | "
          "host ms |", flush=True)
    print("|---|---|---|---:|---:|---:|---:|---:|---:|", flush=True)

    def cells(timing: Timing | None, calls: int) -> str:
        if timing is None:
            return "- | - | -"
        return f"{timing.total * 1e3:.3f} | {timing.total * 1e6 / calls:.2f} | {timing.host * 1e3:.3f}"

    def report(shape: Shape, variant: str, plan: str, forward: Timing, backward: Timing | None):
        # the backward makes seq_len + 1 calls: the last completes dL/dh0 (kernels.backward_positions)
        steps = shape.seq_len
        print(f"| {shape.name} | {variant} | {plan} | {cells(forward, steps)} | {cells(backward, steps + 1)} |",
              flush=True)
        if sink is not None:
            sink.write(json.dumps(dict(
                shape=shape.name, dtype=str(dtype), variant=variant, plan=plan, forward_s=forward.total,
                forward_host_s=forward.host, backward_s=None if backward is None else backward.total,
                backward_host_s=None if backward is None else backward.host, seq_len=steps, device=str(device),
            )) + "\n")
            sink.flush()

    def attempt(shape: Shape, variant: str, measure) -> None:
        """Report measure()'s (plan, forward, backward); a variant that fails is reported, and the next one tried."""
        try:
            plan, forward, backward = measure()
        except Exception as error:
            print(f"| {shape.name} | {variant} | FAILED: {type(error).__name__}: {str(error)[:200]} | | | | | | |",
                  flush=True)
            return
        report(shape, variant, plan, forward, backward)

    def fused(layer: Layer, mode: str, warps: int | None, environment: dict):
        with recurrence(mode, warps, environment), torch.no_grad():
            forward, backward = layer.measure(args.reps)
            # the plans after the run: a refused launch has ruled its kind out
            return layer.plans(), forward, backward

    def barrier(layer: Layer, poll_loads: bool):
        timing, programs = barrier_time(layer, args.reps, poll_loads)
        return f"{programs} programs", timing, None

    for shape in shapes:
        layer = Layer(shape, dtype, device)
        if device.type == "cuda" and not args.no_reference:
            attempt(shape, "cudnn", lambda: ("nn.LSTM", *cudnn_times(layer, args.reps)))
        if "resident" in args.modes.split(",") and not args.no_reference:
            attempt(shape, "barrier", lambda: barrier(layer, False))
            if device.type == "cuda":
                attempt(shape, "barrier load", lambda: barrier(layer, True))
        for name, mode, warps, environment in VARIANTS:
            chosen = name in args.variants.split(",") if args.variants else not environment
            if mode not in args.modes.split(",") or not (chosen or args.variants == "all"):
                continue
            attempt(shape, name, lambda: fused(layer, mode, warps, environment))


if __name__ == "__main__":
    sys.exit(main())
