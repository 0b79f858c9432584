"""Every Triton kernel configuration the backend can launch compiles for sm_80 and sm_90, without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend is not installed")

SCRIPT = Path(__file__).with_name("triton_compile_check.py")


@pytest.mark.parametrize("arch", [80, 90])
def test_every_kernel_configuration_compiles(arch):
    # a process of its own: the suite runs Triton's interpreter, which compiles nothing
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, str(SCRIPT), str(arch)], capture_output=True, text=True, env=env, timeout=1500)
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines and lines[-1].get("summary"), f"the compile check did not finish:\n{run.stderr[-5000:]}"
    failures = [line for line in lines if not line.get("summary") and not line["ok"]]
    assert not failures, "\n".join(f"{f['kernel']} {f['signature']} {f['constexprs']}: {f['problems']}" for f in failures)
    assert lines[-1]["compiled"] >= 40, "fewer kernel configurations than the backend launches were compiled"
    assert run.returncode == 0
