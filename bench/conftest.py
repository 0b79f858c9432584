"""pytest-benchmark settings for `pytest bench`, the order benchmarks run in, and where results go.

Separate from tests/conftest.py on purpose: that one fills torch.empty with NaN, which would skew timings.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

import pytest
import torch

import fused_rnn

from .providers import DTYPES, MODES, PROVIDERS_BY_NAME, SHAPES_BY_NAME

ROOT = Path(__file__).resolve().parent.parent
# the groups the targets are stated on come first, so a run cut short by a time limit has them
TARGET_SHAPES = ("ptb_awd", "h512", "long_h768")
STAT_FIELDS = ("min", "max", "mean", "stddev", "median", "iqr", "q1", "q3", "rounds", "iterations", "ops")


def pytest_addoption(parser):
    group = parser.getgroup("fused_rnn benchmarks")
    group.addoption(
        "--bench-jsonl",
        default=None,
        help="append each result to this JSON-lines file as soon as it is measured (kept if a time limit ends the run)",
    )
    group.addoption(
        "--bench-warmup",
        type=int,
        default=2,
        help="untimed calls before measuring, absorbing Triton and torch.compile compilation (default 2)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # before pytest-benchmark reads its options: defaults that suit these benchmarks, unless given
    given = " ".join(str(arg) for arg in config.invocation_params.args)
    if "--benchmark-columns" not in given:
        config.option.benchmark_columns = ["median", "iqr", "min", "rounds"]
    if "--benchmark-sort" not in given:
        config.option.benchmark_sort = "name"
    if "--benchmark-min-rounds" not in given:
        # medians of few rounds are at the mercy of a busy machine
        config.option.benchmark_min_rounds = 10
    if "--benchmark-group-by" not in given:
        config.option.benchmark_group_by = "group"
    # WeightDrop hands cuDNN a weight outside its flattened buffer, as AWD-LSTM does; cuDNN then warns each call
    config.addinivalue_line("filterwarnings", "ignore:RNN module weights are not part of single contiguous chunk")
    # the one-cycle profile that tells which kernel nn.LSTM dispatches to
    config.addinivalue_line("filterwarnings", "ignore:Warning. Profiler clears events at the end of each cycle")


def _priority(item) -> tuple:
    params = item.callspec.params
    device, shape, mode = params["device"], params["shape"], params["mode"]
    return (
        device == "cpu" and torch.cuda.is_available(),
        not (mode == "fwdbwd" and shape in TARGET_SHAPES),
        list(SHAPES_BY_NAME).index(shape),
        MODES.index(mode),
        list(DTYPES).index(params["dtype"]),
        list(PROVIDERS_BY_NAME).index(params["provider"]),
    )


def pytest_collection_modifyitems(config, items):
    axes = {"mode", "device", "shape", "dtype", "provider"}
    speed = [item for item in items if hasattr(item, "callspec") and axes <= set(item.callspec.params)]
    checks = [item for item in items if item not in speed]
    items[:] = checks + sorted(speed, key=_priority)


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@pytest.fixture(scope="session")
def environment() -> dict:
    """Versions and machine, recorded with every result."""
    # BENCH_COMMIT: set by gpu_check.sh, for a copy of the tree without its .git
    commit = os.environ.get("BENCH_COMMIT") or _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "fused_rnn": fused_rnn.__version__,
        "commit": commit,
        "commit_dirty": None if dirty is None else bool(dirty),  # None: no git here to tell
        "cpu": f"{_cpu_name()} ({os.cpu_count()} cores)",
        "mkldnn": torch.backends.mkldnn.is_available(),
    }
    try:
        info["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


@pytest.fixture(scope="session")
def record(request):
    """record(benchmark): append one result to --bench-jsonl, in the shape of pytest-benchmark's JSON entries."""
    path = request.config.getoption("--bench-jsonl")

    def write(benchmark) -> None:
        if path is None or benchmark.stats is None:
            return
        stats = benchmark.stats.stats
        entry = {
            "group": benchmark.group,
            "name": benchmark.name,
            "fullname": benchmark.fullname,
            "params": benchmark.params,
            "stats": {field: getattr(stats, field) for field in STAT_FIELDS if hasattr(stats, field)},
            "extra_info": benchmark.extra_info,
            "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        with open(path, "a") as out:
            out.write(json.dumps(entry, default=str) + "\n")

    return write
