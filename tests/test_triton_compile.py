"""Every Triton kernel configuration the backend can launch compiles for sm_80 and sm_90, without a GPU: with
the suite's Triton, and for sm_90 with the one the H100 of the GPU check runs, which alone also compiles the
tuning variables' variants (bench.tune's, run on that machine)."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend is not installed")

SCRIPT = Path(__file__).with_name("triton_compile_check.py")

# The Triton of the GPU check's H100 (its image's; bench/README.md). Its register allocation is not the
# suite's: on 2026-11-28 three kernel configurations that compiled cleanly with 3.9 spilled registers with
# it, one inside the T=1024 resident backward's step loop.
DEVICE_TRITON = "3.6.0"


def device_triton() -> Path:
    """A folder holding Triton DEVICE_TRITON alone, installed there once (pip --target), which the check's
    process finds before the suite's Triton; torch stays the suite's."""
    from fused_rnn.cpp.loader import cache_base

    folder = cache_base() / f"triton-{DEVICE_TRITON}"
    if (folder / "triton" / "__init__.py").exists():
        return folder
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        pytest.skip(f"Triton {DEVICE_TRITON}'s wheels are for x86-64 Linux")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps", "--target",
         str(folder), f"triton=={DEVICE_TRITON}"], capture_output=True, text=True, timeout=900,
    )
    if install.returncode != 0:
        reason = f"Triton {DEVICE_TRITON} could not be installed: {install.stderr[-2000:]}"
        # CI requires the Triton backend, and with it this check
        if "triton" in os.environ.get("FUSED_RNN_REQUIRE_BACKENDS", "").split(","):
            pytest.fail(reason)
        pytest.skip(reason)
    return folder


@pytest.mark.parametrize("arch, triton_version", [(80, None), (90, None), (90, DEVICE_TRITON)])
def test_every_kernel_configuration_compiles(arch, triton_version):
    # a process of its own: the suite runs Triton's interpreter, which compiles nothing
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if triton_version is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(device_triton()), env.get("PYTHONPATH"))))
    # the tuning variables' variants where bench.tune runs them: the GPU check's H100, with its Triton
    tuning = ["--tuning"] if triton_version == DEVICE_TRITON and arch == 90 else []
    run = subprocess.run([sys.executable, str(SCRIPT), str(arch), *tuning], capture_output=True, text=True, env=env,
                         timeout=1500)
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines and lines[-1].get("summary"), f"the compile check did not finish:\n{run.stderr[-5000:]}"
    if triton_version is not None:
        assert lines[-1]["triton"] == triton_version, f"the check ran Triton {lines[-1]['triton']}"
    failures = [line for line in lines if not line.get("summary") and not line["ok"]]
    assert not failures, "\n".join(f"{f['kernel']} {f['signature']} {f['constexprs']}: {f['problems']}" for f in failures)
    assert lines[-1]["compiled"] >= 40, "fewer kernel configurations than the backend launches were compiled"
    assert run.returncode == 0
