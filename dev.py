"""Set up a virtual environment and run the tests or the benchmarks: `python dev.py test|bench [pytest args]`.

The environment lives in .venv and sees the system's packages, so a machine that already has torch
(say, a CUDA build) keeps it; where no torch is importable, torch==2.13.0 is installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
TORCH = "torch==2.13.0"


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run(*command: str) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def set_up(requirements: str) -> str:
    python = venv_python()
    if not python.exists():
        venv.EnvBuilder(system_site_packages=True, with_pip=True).create(VENV)
    python = str(python)
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    if subprocess.run([python, "-c", "import torch"], cwd=ROOT, capture_output=True).returncode != 0:
        run(*pip, TORCH)
    run(*pip, "-r", f"requirements/{requirements}.txt")
    run(*pip, "--no-deps", "-e", ".")
    # the system's torch, where there is one, is kept: say which one the run uses
    run(python, "-c", "import torch; print('torch', torch.__version__)")
    return python


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("test", "bench"):
        print(__doc__)
        return 2
    what, extra = argv[0], argv[1:]
    python = set_up(what)
    if what == "test":
        # one test at a time to each worker as it finishes one: xdist otherwise hands out contiguous quarters of
        # the collection, which put every minutes-long test (conftest.STARTED_FIRST) on one worker; the slowest
        # tests listed at the end, for keeping CI's time in view
        command = [python, "-m", "pytest", "-n", "2", "--maxschedchunk", "1", "--durations=15", "tests", *extra]
    else:
        command = [python, "-m", "pytest", "bench", *extra]
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
