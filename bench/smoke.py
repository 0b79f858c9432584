"""One small training step of the Triton backend in one time-loop mode, for the GPU check to run first.

    python -m bench.smoke MODE [DEVICE] [DTYPE]   # MODE: steps | persistent | resident | auto (FUSED_RNN_RECURRENCE)
                                                  # DTYPE: fp16 (default) | tf32 (float32, TF32 products)

auto runs at the H512 benchmark's layer (B=64 H=512), where its resident forward splits the row tiles
among programs (launch.recurrence_plan) and its backward runs persistent.

A persistent or resident kernel whose grid barrier never completes hangs its process; bench/gpu_check.sh
runs this under a time limit per mode, and runs its tests and benchmarks without a mode that hung or
failed. Prints one line: the mode, the forward and backward loops that ran, seconds, and the largest
difference from the reference (float64, the same masks) relative to the reference's largest value.
Exit code 0 when the step ran in that mode (no launch fell back to another loop) and its results are
finite and within 1e-2 of the reference's scale.
"""

from __future__ import annotations

import os
import sys
import time

import torch

import fused_rnn
from fused_rnn.triton import launch

# B=16 H=256: every mode has a plan here (resident: 64 programs of 4 units); fp16 products
SIZES = dict(seq_len=20, batch=16, inputs=64, hidden=256)
AUTO_SIZES = dict(seq_len=20, batch=64, inputs=64, hidden=512)
REGULARIZERS = dict(recurrent_dropout=0.1, weight_dropout=0.2, update_dropout=0.1, cell_dropout=0.05,
                    zoneout_h=0.1, zoneout_c=0.1)
# fp16 or TF32 products (a 10-bit mantissa either way) over 20 steps against float64: about 1e-3 of the
# signal; a broken kernel is off by O(1)
TOLERANCE = 1e-2
DTYPES = {"fp16": torch.float16, "tf32": torch.float32}


def step(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().requires_grad_()
    out, (h_n, c_n) = model(x, seed=3)
    loss = out.float().square().sum() + h_n.float().sum() + c_n.float().sum()
    grads = torch.autograd.grad(loss, [x, *model.parameters()])
    return [t.double() for t in (out, h_n, c_n, *grads)]


def main(mode: str, device: torch.device, dtype_name: str = "fp16") -> int:
    os.environ["FUSED_RNN_RECURRENCE"] = mode
    dtype = DTYPES[dtype_name]
    if dtype == torch.float32:
        torch.backends.cudnn.allow_tf32 = True  # launch.dot_precision: TF32 where cuDNN would use it
    torch.manual_seed(0)
    s = AUTO_SIZES if mode == "auto" else SIZES
    model = fused_rnn.LSTM(s["inputs"], s["hidden"], bidirectional=True, backend="triton", device=device,
                           dtype=dtype, **REGULARIZERS)
    reference = fused_rnn.LSTM(s["inputs"], s["hidden"], bidirectional=True, backend="reference", device=device,
                               dtype=torch.float64, **REGULARIZERS)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(s["seq_len"], s["batch"], s["inputs"], device=device).to(dtype)
    start = time.perf_counter()
    results = step(model, x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    # after the step: a launch the GPU refused has fallen back, and the plans say to what
    precision = launch.dot_precision(dtype, device)
    loops = [launch.recurrence_plan(device, precision, dtype.itemsize, s["batch"], s["hidden"], s["hidden"], forward).kind
             for forward in (True, False)]
    refused = launch._persistent_refused + launch._resident_refused
    expected = step(reference, x.double())
    worst = max(((r - e).abs().max() / e.abs().max().clamp_min(1e-30)).item() for r, e in zip(results, expected))
    finite = all(torch.isfinite(r).all().item() for r in results)
    fell_back = mode != "steps" and (refused or mode not in (*loops, "auto"))
    ok = finite and worst <= TOLERANCE and not fell_back
    print(f"smoke {mode} {dtype_name}: loops {loops[0]} forward, {loops[1]} backward, {seconds:.1f}s (compilation included), "
          f"largest relative difference {worst:.2e}{'' if finite else ', NOT FINITE'}"
          f"{', FELL BACK: ' + '; '.join(refused) if fell_back else ''}: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], torch.device(sys.argv[2] if len(sys.argv) > 2 else "cuda"), *sys.argv[3:4]))
