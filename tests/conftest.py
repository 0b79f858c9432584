"""Shared fixtures: the backend under test, NaN-filled allocations, and Triton's interpreter on CPU."""

import os

import torch

# The Triton interpreter must be chosen before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fused_rnn import backends  # noqa: E402

import triton_interpreter  # noqa: E402

triton_interpreter.install()

BACKENDS = ("reference", "cpp", "triton")


def backend_device(name: str) -> torch.device:
    """Where a backend's tests run: Triton on the GPU when there is one (else its interpreter), the rest on CPU."""
    return torch.device("cuda" if name == "triton" and torch.cuda.is_available() else "cpu")


def require_backend(name: str, dtype: torch.dtype = torch.float64) -> torch.device:
    """The backend's device; a skip where it cannot run this dtype, a failure where it cannot run at all
    and FUSED_RNN_REQUIRE_BACKENDS (comma-separated names; CI sets it) says it must."""
    device = backend_device(name)
    required = name in os.environ.get("FUSED_RNN_REQUIRE_BACKENDS", "").split(",")
    missing = backends.unavailable_reason(name, device, torch.float64)
    if required and missing is not None:
        pytest.fail(f"the {name} backend is required here (FUSED_RNN_REQUIRE_BACKENDS) but unavailable: {missing}")
    reason = backends.unavailable_reason(name, device, dtype)
    if reason is not None:
        pytest.skip(f"the {name} backend is unavailable here: {reason}")
    return device


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Each backend in turn; skipped, with the reason, where it cannot run."""
    require_backend(request.param)
    return request.param


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    """Every floating-point torch.empty / empty_like / new_empty starts as NaN, so an output a kernel
    forgets to write fails the comparison instead of passing on leftover memory."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def fill(t):
        if t.is_floating_point() or t.is_complex():
            # as data: a leaf that requires grad (checkpoint's dummy) refuses an in-place op otherwise
            with torch.no_grad():
                t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: fill(new_empty(self, *a, **k)))
    yield


# Tests of several minutes each on the 2-core CI VM (d5bfdbd: the compile checks 6-8.5 min, the interpreted
# gradgradcheck of the packed bidirectional layer 3.3), every other test under a minute. Collected last, the
# compile checks ran after the rest, one worker's two of them while the other had nothing left. They start
# first, in this order: dev.py hands each worker one test at a time (--maxschedchunk 1) and keeps two queued,
# so one worker starts with the sm_90 check and the gradgradcheck, the other with the other two checks, and
# the short tests fill in around them.
STARTED_FIRST = (
    "test_triton_compile.py::test_every_kernel_configuration_compiles[90-None]",
    "test_gradcheck.py::test_gradgradcheck[triton-L1-bi-packed",
    "test_triton_compile.py::test_every_kernel_configuration_compiles",
)


def _start_rank(item) -> int:
    name = item.nodeid.rpartition("/")[2]
    return next((i for i, start in enumerate(STARTED_FIRST) if name.startswith(start)), len(STARTED_FIRST))


def pytest_collection_modifyitems(config, items):
    """Cases of the Triton backend run on the GPU where there is one: mark them `cuda`, so that the GPU
    check (`pytest -m cuda`) runs the shared parity, mask and bad-input tests there too. The longest tests
    start first (STARTED_FIRST)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "triton":
            item.add_marker(pytest.mark.cuda)
    items.sort(key=_start_rank)  # stable: every worker collects the same order
