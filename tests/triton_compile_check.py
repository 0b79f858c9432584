"""Compile every Triton kernel configuration the backend launches, for a GPU this machine need not have.

Run as a script, in a process without TRITON_INTERPRET: `python tests/triton_compile_check.py 90 [--tuning]`
(--tuning: the tuning variables' variants too, which bench.tune launches on the GPU check's machine).
The launchers run on CPU tensors with each kernel's launch replaced by a recorder, across every
dtype, precision, tile size and structural option they can choose; each distinct specialization the
JIT would compile is then compiled for GPUTarget("cuda", arch, 32) and checked by ptxas: no register
spills (in a persistent or resident kernel, none inside a loop: a spill before its step loop runs once
a launch), shared memory within the architecture's limit. Prints one JSON object per line.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Triton prints ptxas's own report (registers, spills) of each compile when this is set; an empty
# cache of our own makes every kernel really compile
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fused_rnn_compile_check_")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from fused_rnn import philox  # noqa: E402
from fused_rnn.regularizers import Regularizers  # noqa: E402
from fused_rnn.triton import kernels, launch  # noqa: E402

SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}  # bytes per block with opt-in
EVERY_REGULARIZER = Regularizers(
    recurrent_dropout=0.2, weight_dropout=0.3, update_dropout=0.1, cell_dropout=0.1, zoneout_h=0.1, zoneout_c=0.1
)


# what resident plans are sized against, per architecture: SMs and shared memory of the A100; of the
# H100 SXM and PCIe (132 and 114 SMs: a layer can need larger unit tiles on the smaller one)
GPU_LIMITS = {
    80: (launch.GpuLimits(108, 166912),),
    90: (launch.GpuLimits(132, 232448), launch.GpuLimits(114, 232448)),
}
# the benchmarks' layers (batch, hidden): the resident kernels' slabs and operands at the sizes that matter
BENCHMARK_LAYERS = ((80, 1150), (64, 512), (16, 768), (8, 256), (64, 1024))


def record_launches(arch: int, tuning: bool = True) -> list[tuple[JITFunction, tuple, dict]]:
    """Drive the launchers through every configuration they can take; return each kernel launch. tuning: also
    with the tuning variables' variants (FUSED_RNN_BARRIER=load, FUSED_RNN_LOAD_AHEAD=0), which only
    bench.tune sets, on the GPU check's machine."""
    launches = []
    for name in dir(kernels):
        kernel = getattr(kernels, name)
        if isinstance(kernel, JITFunction) and name.endswith("_kernel"):
            kernel.run = lambda *args, grid, warmup, _kernel=kernel, **kwargs: launches.append((_kernel, args, kwargs))
    # what the launchers choose on a GPU, for tensors that live on this machine's CPU
    cuda = torch.device("cuda")
    gpu_precision = launch.dot_precision
    launch.dot_precision = lambda dtype, device: gpu_precision(dtype, cuda)
    gpu_options = launch.persistent_options
    launch.persistent_options = lambda device, plan: gpu_options(cuda, plan)
    limits = list(GPU_LIMITS[arch])
    launch.gpu_limits = lambda device: limits[0]
    gpu_plan = launch.recurrence_plan
    launch.recurrence_plan = lambda device, *sizes, **options: gpu_plan(cuda, *sizes, **options)
    seed = 1234
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for dtype in dtypes:
        for tf32 in ((True, False) if dtype == torch.float32 else (True,)):
            torch.backends.cudnn.allow_tf32 = tf32
            for mode in ("steps", "persistent", "resident"):
                os.environ["FUSED_RNN_RECURRENCE"] = mode
                launch.persistent_programs = lambda device, tiles, _on=mode != "steps": 8 if _on else 0
                launch._plans.clear()  # chosen with the persistent_programs replaced before
                for batch in (1, 20):  # each tile height launch.tile_sizes picks
                    for proj in (0, 3):
                        for packed in (False, True):
                            drive_layer(dtype, batch, 6, proj, packed, seed)
                if mode == "resident":
                    for gpu in GPU_LIMITS[arch]:
                        limits[0] = gpu
                        for batch, hidden in BENCHMARK_LAYERS:
                            drive_layer(dtype, batch, hidden, 0, False, seed)
        for locked in (False, True):
            launch.feature_dropout(torch.zeros(3, 2, 5, dtype=dtype), seed, philox.KIND_INPUT, 0, 0.5, locked)
    if not tuning:
        return launches
    # grid barriers that poll with acquire loads (FUSED_RNN_BARRIER=load, inline PTX): each loop that has them
    os.environ["FUSED_RNN_BARRIER"] = "load"
    launch.persistent_programs = lambda device, tiles: 8
    launch._plans.clear()
    for mode, proj in (("persistent", 3), ("resident", 0)):
        os.environ["FUSED_RNN_RECURRENCE"] = mode
        drive_layer(torch.float16, 20, 6, proj, False, seed)
    del os.environ["FUSED_RNN_BARRIER"]
    # each input and setting loaded where it is used (FUSED_RNN_LOAD_AHEAD=0, for tuning): the loops that
    # load ahead by default, at the benchmarks' layers too
    os.environ["FUSED_RNN_LOAD_AHEAD"] = "0"
    for dtype in (torch.float16, torch.bfloat16):
        for mode in ("persistent", "resident"):
            os.environ["FUSED_RNN_RECURRENCE"] = mode
            drive_layer(dtype, 20, 6, 0, True, seed)
        for gpu in GPU_LIMITS[arch]:
            limits[0] = gpu
            for batch, hidden in BENCHMARK_LAYERS:
                drive_layer(dtype, batch, hidden, 0, False, seed)
    del os.environ["FUSED_RNN_LOAD_AHEAD"]
    return launches


def drive_layer(dtype: torch.dtype, batch: int, hidden: int, proj: int, packed: bool, seed: int) -> None:
    seq_len, inputs = 3, 5
    real_hidden = proj or hidden
    make = lambda *shape: torch.zeros(*shape, dtype=dtype)  # noqa: E731
    x, h0, c0 = make(seq_len, batch, inputs), make(batch, real_hidden), make(batch, hidden)
    w_ih, w_hh, bias = make(4 * hidden, inputs), make(4 * hidden, real_hidden), make(4 * hidden)
    w_hr = make(proj, hidden) if proj else None
    lengths = torch.full((batch,), seq_len, dtype=torch.int64) if packed else None
    for training in (True, False):
        ints, floats = launch.step_parameters(EVERY_REGULARIZER, training, x.device, dtype)
        # the layer's own input and output dropouts too (the paired dropout of x and dx)
        flags = launch.Recurrence.of(EVERY_REGULARIZER, training, (0.2, 0.3), locked=batch > 1)
        for reverse in (False, True):
            out, h_n, c_n, xg, rs, cs, hpre = launch.layer_forward(
                x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, seed, ints, floats, flags, 0, reverse
            )
            launch.layer_backward(
                out.to(dtype), h_n.to(dtype), c_n.to(dtype), x, w_ih, w_hh, w_hr, lengths, seed, ints, floats, flags,
                0, reverse, xg, rs, cs, hpre, xg,
            )


def specialize(kernel: JITFunction, args: tuple, kwargs: dict, backend) -> tuple:
    """What the JIT would compile for these arguments on the target: (signature, constexprs, attrs, options)."""
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options


def ptxas_report(log: str) -> dict:
    """Registers and spills from the ptxas log Triton printed while compiling."""
    registers = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {
        "registers": max(map(int, registers)) if registers else None,
        "spill_stores": sum(int(stores) for stores, _ in spills),
        "spill_loads": sum(int(loads) for _, loads in spills),
        "ptxas_log_found": bool(registers),
    }


CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def is_time_loop_kernel(kernel: JITFunction) -> bool:
    """The persistent and resident kernels: every step of a layer-direction in one launch."""
    return kernel.__name__.endswith(("_persistent_kernel", "_resident_kernel"))


def spills_in_loops(cubin: bytes) -> int:
    """Spill instructions (STL, LDL) inside a loop of the kernel's SASS: between a backward branch and its
    target. Those run at every step or K tile; spills outside every loop (a persistent kernel's prologue,
    staging its slabs into shared memory) run once a launch."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        sass = subprocess.run([str(CUOBJDUMP), "-sass", file.name], capture_output=True, text=True, check=True).stdout
    instructions = [(int(address, 16), text.strip()) for address, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [
        (int(target, 16), address)
        for address, text in instructions
        for target in re.findall(r"BRA\s+0x([0-9a-f]+)", text)
        if int(target, 16) <= address
    ]
    return sum(
        1 for address, text in instructions
        if re.match(r"(@!?U?P[T0-9]+\s+)?(STL|LDL)\b", text) and any(start <= address <= end for start, end in loops)
    )


def slabs_before_loop(ttgir: str) -> int:
    """Tensors the compiled kernel copies into shared memory before its first loop: a resident kernel's
    slabs of W~, loaded once and kept there for every step (no step reads them from global memory)."""
    return len(re.findall(r"ttg\.local_alloc %", ttgir[: ttgir.index("scf.for")]))


def main(arch: int, tuning: bool) -> int:
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    seen = set()
    failures = 0
    for kernel, args, kwargs in record_launches(arch, tuning):
        signature, constexprs, attrs, options = specialize(kernel, args, kwargs, backend)
        key = (kernel.__name__, repr(sorted(signature.items())), repr(sorted(constexprs.items())), repr(sorted(attrs.items())))
        if key in seen:
            continue
        seen.add(key)
        config = {"kernel": kernel.__name__, "arch": arch, "signature": {k: v for k, v in signature.items() if v != "constexpr"},
                  "constexprs": {str(k): str(v) for k, v in constexprs.items()}}
        try:
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(
                    ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__
                )
            report = ptxas_report(log.getvalue())
            report["shared"] = compiled.metadata.shared
            problems = [] if report["ptxas_log_found"] else ["no ptxas report in Triton's output"]
            if "K_MAIN" in kwargs:
                report["slabs_before_loop"] = slabs_before_loop(compiled.asm["ttgir"])
                if report["slabs_before_loop"] < 1 + (kwargs["K_REST"] > 0):
                    problems.append("the resident slabs are not in shared memory before the step loop")
                plan = launch.Plan("resident", 1, kwargs["BLOCK_B"], kwargs["BLOCK_H"], k_main=kwargs["K_MAIN"],
                                   k_rest=kwargs["K_REST"], forward=kernel.__name__.startswith("forward"))
                w = args[kernel.arg_names.index("w_ptr")]
                planned = launch.resident_shared_bytes(plan, w.element_size())
                if report["shared"] > planned:
                    problems.append(f"shared memory {report['shared']} > the {planned} launch.resident_plan allowed")
            if report["spill_stores"] or report["spill_loads"]:
                # a kernel with the time loop inside spills before it once a launch; any other kernel's
                # whole body runs at every step
                if is_time_loop_kernel(kernel):
                    report["spills_in_loops"] = spills_in_loops(compiled.asm["cubin"])
                    if report["spills_in_loops"]:
                        problems.append("register spills inside a loop")
                else:
                    problems.append("register spills")
            if report["shared"] > SHARED_MEMORY_LIMIT[arch]:
                problems.append(f"shared memory {report['shared']} > {SHARED_MEMORY_LIMIT[arch]}")
            config.update(report, ok=not problems, problems=problems)
        except Exception as error:  # a compile failure is a finding, reported with the config
            config.update(ok=False, problems=[f"{type(error).__name__}: {str(error)[:2000]}"])
        failures += not config["ok"]
        print(json.dumps(config), flush=True)
    print(json.dumps({"summary": True, "arch": arch, "compiled": len(seen), "failures": failures,
                      "triton": triton.__version__}), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), "--tuning" in sys.argv[2:]))
