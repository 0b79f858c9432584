"""Time and peak memory of every provider, side by side: one pytest-benchmark group per device, shape,
dtype and mode, so each table compares providers on the same work."""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch

from .providers import BASELINE, DTYPES, MODES, PROVIDERS, SHAPES_BY_NAME, build_step, make_input

CASES = [(device, shape.name) for shape in SHAPES_BY_NAME.values() for device in shape.devices]


@contextlib.contextmanager
def settings(device: torch.device, dtype: torch.dtype, threads: int | None):
    """fp32 on CUDA with TF32 matmuls, as cuDNN does by default; the shape's CPU thread count."""
    saved = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    if device.type == "cuda" and dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1:]
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def synchronized(step, device: torch.device):
    """The step, returning only when the GPU has finished it: what the timer measures."""
    if device.type != "cuda":
        return step

    def timed() -> None:
        step()
        torch.cuda.synchronize(device)

    return timed


def peak_memory(timed, device: torch.device) -> dict:
    """Bytes one step allocates above what was resident before it (weights, input): activations, masks,
    workspace and gradients. CUDA only: CPU allocations have no peak counter in torch."""
    if device.type != "cuda":
        return {"peak_bytes": None, "peak_note": "not measured on CPU"}
    torch.cuda.synchronize(device)
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    timed()
    return {"peak_bytes": torch.cuda.max_memory_allocated(device) - resident, "resident_bytes": resident}


@pytest.mark.parametrize("provider", [p.name for p in PROVIDERS])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("device,shape", CASES)
@pytest.mark.parametrize("mode", MODES)
def test_lstm(benchmark, environment, record, request, mode, device, shape, dtype, provider):
    provider = next(p for p in PROVIDERS if p.name == provider)
    shape = SHAPES_BY_NAME[shape]
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("GPU shape: no CUDA device here")
    if device not in provider.devices:
        pytest.skip(f"{provider.label} is benchmarked on {', '.join(provider.devices)} only")
    if device == "cpu" and dtype != "fp32":
        pytest.skip("CPU benchmarks run fp32 only")
    torch_device, torch_dtype = torch.device(device), DTYPES[dtype]

    with settings(torch_device, torch_dtype, shape.threads):
        torch.manual_seed(0)
        built = provider.build(shape, torch_dtype, torch_device)
        x = make_input(shape, torch_dtype, torch_device)
        timed = synchronized(build_step(built, shape, x, mode), torch_device)
        for _ in range(request.config.getoption("--bench-warmup")):
            timed()
        memory = peak_memory(timed, torch_device)

        benchmark.group = f"{shape.name} {device} {dtype} {mode}"
        benchmark.extra_info.update(
            environment,
            device=environment["gpu"] if device == "cuda" else environment["cpu"],
            device_type=device,
            shape=shape.name,
            shape_dims=shape.describe(),
            seq_len=shape.seq_len,
            batch=shape.batch,
            input_size=shape.input_size,
            hidden_size=shape.hidden_size,
            num_layers=shape.num_layers,
            dtype=dtype,
            tf32=device == "cuda" and dtype == "fp32",
            mode=mode,
            provider=provider.name,
            label=provider.label,
            baseline=provider.name == BASELINE,
            regularizers=list(provider.applies),
            threads=torch.get_num_threads() if device == "cpu" else None,
            **built.info,
            **memory,
        )
        benchmark(timed)
        record(benchmark)
