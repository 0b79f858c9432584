"""What the benchmarks compare: the shapes, the regularizer set, and every provider, defined once.

A provider builds a model for (shape, dtype, device) and `build_step` turns it into a callable that runs
one forward, or one forward + backward, the way a training loop does. Every benchmark goes through here.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import fused_rnn
from fused_rnn import backends
from fused_rnn.regularizers import PROBABILITIES

MODES = ("fwdbwd", "fwd")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    seq_len: int  # T
    batch: int  # B
    input_size: int  # I, the input of layer 0
    hidden_size: int  # H, every layer
    num_layers: int
    devices: tuple[str, ...]  # where it is benchmarked
    threads: int | None = None  # torch.set_num_threads on CPU; None keeps torch's default

    def describe(self) -> str:
        return f"T={self.seq_len} B={self.batch} I={self.input_size} H={self.hidden_size} layers={self.num_layers}"


SHAPES = (
    # AWD-LSTM on PTB: emb 400 -> 3 layers of 1150 as one stack (AWD's last layer of 400 units is not modelled)
    Shape("ptb_awd", 70, 80, 400, 1150, 3, ("cuda",)),
    Shape("h512", 100, 64, 512, 512, 1, ("cuda",)),
    # FlashRNN's figure: cuDNN fp16 on an H100 takes 2.0 ms forward, 5.2 ms forward + backward
    Shape("long_h768", 1024, 16, 768, 768, 1, ("cuda",)),
    Shape("small_h256", 50, 8, 256, 256, 1, ("cuda", "cpu")),
    # the C++ backend's target: <= 1.2x nn.LSTM, >= 3x faster than the reference, on 2 threads
    Shape("cpu_h256x2", 35, 16, 256, 256, 2, ("cpu",), threads=2),
)
SHAPES_BY_NAME = {shape.name: shape for shape in SHAPES}

# "Every regularizer on": fused_rnn.LSTM keyword arguments. Locked (AWD-style) feature dropout, so that
# the AWD wrapper below applies the same masks where cuDNN lets it. The values do not change the work done.
EVERY_REGULARIZER = dict(
    dropout_mode="locked",
    input_dropout=0.1,
    dropout=0.2,  # between layers, only with num_layers > 1
    output_dropout=0.1,
    recurrent_dropout=0.1,
    weight_dropout=0.2,
    weight_dropout_mode="element",
    update_dropout=0.1,
    update_dropout_mode="step",
    cell_dropout=0.05,
    zoneout_h=0.1,
    zoneout_c=0.1,
)
ALL_APPLIED = PROBABILITIES
AWD_APPLIED = ("input_dropout", "dropout", "output_dropout", "weight_dropout")


def regularizer_kwargs(shape: Shape) -> dict:
    kwargs = dict(EVERY_REGULARIZER)
    if shape.num_layers == 1:
        # nn.RNNBase warns about between-layer dropout with one layer; it does nothing there
        kwargs["dropout"] = 0.0
    return kwargs


def locked_dropout(x: Tensor, p: float) -> Tensor:
    """Merity's LockedDropout on [T, B, F]: one [1, B, F] mask for every step, inverted scaling."""
    if p == 0:
        return x
    mask = x.new_empty(1, x.shape[1], x.shape[2]).bernoulli_(1 - p).div_(1 - p)
    return x * mask


class AWDLSTM(nn.Module):
    """What AWD-LSTM does around cuDNN: one nn.LSTM per layer, WeightDrop on weight_hh (a fresh
    DropConnect mask per forward, passed in with torch.func.functional_call), LockedDropout on the input,
    between layers and on the output. cuDNN allows no regularizer inside the recurrence."""

    def __init__(self, shape: Shape, p_input: float, p_between: float, p_output: float, p_weight: float, **factory):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.LSTM(shape.input_size if layer == 0 else shape.hidden_size, shape.hidden_size, **factory)
            for layer in range(shape.num_layers)
        )
        self.p_input, self.p_between, self.p_output, self.p_weight = p_input, p_between, p_output, p_weight

    def forward(self, x: Tensor) -> Tensor:
        x = locked_dropout(x, self.p_input)
        for index, lstm in enumerate(self.layers):
            if index > 0:
                x = locked_dropout(x, self.p_between)
            w_hh = F.dropout(lstm.weight_hh_l0, self.p_weight, training=True)
            x, _ = functional_call(lstm, {"weight_hh_l0": w_hh}, (x,))
        return locked_dropout(x, self.p_output)


def cell_step(
    x_proj_t: Tensor,  # [B, 4H]: x_t W_ih^T + b_ih + b_hh
    h: Tensor,  # [B, H]
    c: Tensor,  # [B, H]
    w_hh: Tensor,  # [4H, H], weight-dropped and scaled
    m_rec: Tensor,  # [B, H] recurrent keep-mask, scaled
    m_upd_t: Tensor,  # [B, H] update keep-mask of this step, scaled
    m_cell: Tensor,  # [B, H] cell keep-mask, scaled
    z_h_t: Tensor,  # [B, H] bool, True: h keeps its previous value
    z_c_t: Tensor,  # [B, H] bool, True: c keeps its previous value
) -> tuple[Tensor, Tensor]:
    """One step of SPEC.md section 2, as a user writes it in PyTorch."""
    gates = x_proj_t + (h * m_rec) @ w_hh.T
    i, f, g, o = gates.chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_new = (f * c + i * (g * m_upd_t)) * m_cell
    h_new = o * torch.tanh(c_new)
    return torch.where(z_h_t, h, h_new), torch.where(z_c_t, c, c_new)


def keep_mask(shape: tuple[int, ...], p: float, like: Tensor) -> Tensor:
    """A dropout keep-mask with inverted scaling, drawn with bernoulli."""
    return like.new_empty(shape).bernoulli_(1 - p).div_(1 - p)


def zoneout_mask(shape: tuple[int, ...], p: float, like: Tensor) -> Tensor:
    return like.new_empty(shape).bernoulli_(p).bool()


def _allow_recompiles(limit: int = 64) -> None:
    """cell_step compiles once per shape, dtype and first step (h without grad) or later step; past dynamo's
    default limit of 8 it would run eagerly, and the "compiled" numbers would not be."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), limit))


class CellLoopLSTM(nn.Module):
    """What zoneout users run today: a Python loop over steps with every regularizer of SPEC.md written
    in PyTorch, masks drawn with bernoulli at each forward. The input projection is one GEMM per layer
    (kinder to the loop than nn.LSTMCell, which computes it step by step). `compiled`: the step function
    goes through torch.compile (compiling the whole unrolled loop takes minutes at T=1024)."""

    def __init__(self, shape: Shape, regularizers: dict, compiled: bool, **factory):
        super().__init__()
        # holds the parameters only
        self.weights = nn.LSTM(shape.input_size, shape.hidden_size, shape.num_layers, **factory)
        self.r = regularizers
        if compiled:
            _allow_recompiles()
        self.step = torch.compile(cell_step, dynamic=False, fullgraph=True) if compiled else cell_step

    def forward(self, x: Tensor) -> Tensor:
        r, weights = self.r, self.weights
        seq_len, batch = x.shape[:2]
        hidden = weights.hidden_size
        x = locked_dropout(x, r["input_dropout"])
        for layer in range(weights.num_layers):
            if layer > 0:
                x = locked_dropout(x, r["dropout"])
            w_ih, w_hh, b_ih, b_hh = (
                getattr(weights, f"{name}_l{layer}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            )
            w_hh = w_hh * keep_mask(w_hh.shape, r["weight_dropout"], w_hh)
            x_proj = torch.addmm(b_ih + b_hh, x.reshape(-1, x.shape[-1]), w_ih.T).view(seq_len, batch, 4 * hidden)
            m_rec = keep_mask((batch, hidden), r["recurrent_dropout"], x)
            m_cell = keep_mask((batch, hidden), r["cell_dropout"], x)
            m_upd = keep_mask((seq_len, batch, hidden), r["update_dropout"], x)
            z_h = zoneout_mask((seq_len, batch, hidden), r["zoneout_h"], x)
            z_c = zoneout_mask((seq_len, batch, hidden), r["zoneout_c"], x)
            h = c = x.new_zeros(batch, hidden)
            outputs = []
            for t in range(seq_len):
                h, c = self.step(x_proj[t], h, c, w_hh, m_rec, m_upd[t], m_cell, z_h[t], z_c[t])
                outputs.append(h)
            x = torch.stack(outputs)
        return locked_dropout(x, r["output_dropout"])


@dataclasses.dataclass
class Built:
    module: nn.Module
    forward: Callable[[Tensor], Tensor]  # [T, B, I] -> [T, B, H], in training mode
    info: dict  # what to record with the result (the backend actually used, ...)


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str  # the test id
    label: str  # for tables
    applies: tuple[str, ...]  # the regularizers it applies (SPEC.md names)
    devices: tuple[str, ...]
    build: Callable[[Shape, torch.dtype, torch.device], Built]


def rnn_kernel(forward: Callable[[Tensor], Tensor], shape: Shape, dtype: torch.dtype, device: torch.device) -> str:
    """Which implementation nn.LSTM dispatches to for this dtype and device (cuDNN, oneDNN or ATen's own),
    seen in the ops of a short training forward: cuDNN does not take every dtype."""
    x = torch.randn(2, shape.batch, shape.input_size, device=device, dtype=dtype, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        forward(x)
    ops = {event.key for event in profile.key_averages()}
    if "aten::_cudnn_rnn" in ops:
        return "cuDNN"
    if any(op.startswith("aten::mkldnn_rnn") for op in ops):
        return "oneDNN"
    return "ATen (CUDA)" if device.type == "cuda" else "ATen (CPU)"


def _nn_lstm(shape: Shape, dtype: torch.dtype, device: torch.device) -> Built:
    lstm = nn.LSTM(shape.input_size, shape.hidden_size, shape.num_layers, device=device, dtype=dtype)

    def forward(x: Tensor) -> Tensor:
        return lstm(x)[0]

    return Built(lstm, forward, {"kernel": rnn_kernel(forward, shape, dtype, device)})


def _awd_lstm(shape: Shape, dtype: torch.dtype, device: torch.device) -> Built:
    r = regularizer_kwargs(shape)
    model = AWDLSTM(
        shape, r["input_dropout"], r["dropout"], r["output_dropout"], r["weight_dropout"], device=device, dtype=dtype
    )
    return Built(model, model, {"kernel": rnn_kernel(model, shape, dtype, device)})


def _fused(backend: str, regularized: bool) -> Callable[[Shape, torch.dtype, torch.device], Built]:
    def build(shape: Shape, dtype: torch.dtype, device: torch.device) -> Built:
        kwargs = regularizer_kwargs(shape) if regularized else {}
        lstm = fused_rnn.LSTM(
            shape.input_size, shape.hidden_size, shape.num_layers, device=device, dtype=dtype, backend=backend, **kwargs
        )
        used = backends.resolve(backend, device, dtype)
        info = {"backend": used}
        if backend == "auto" and forward_loop(shape, dtype, device):
            info["forward_loop"] = forward_loop(shape, dtype, device)
            info["backward_loop"] = forward_loop(shape, dtype, device, forward=False)
        if backend == "auto" and used == "reference":
            wanted = "triton" if device.type == "cuda" else "cpp"
            info["fallback"] = backends.unavailable_reason(wanted, device, dtype) or "auto chose the reference"
        return Built(lstm, lambda x: lstm(x)[0], info)

    return build


def forward_loop(shape: Shape, dtype: torch.dtype, device: torch.device, forward: bool = True) -> str | None:
    """How the Triton backend runs this shape's forward (or backward) time loop on the GPU by default:
    "resident" (W_hh kept in shared memory) or "persistent" (W_hh read from L2 every step); None off the
    Triton backend."""
    if device.type != "cuda" or backends.resolve("auto", device, dtype) != "triton":
        return None
    from fused_rnn.triton import launch

    precision = launch.dot_precision(dtype, device)
    plan = launch.recurrence_plan(device, precision, torch.finfo(dtype).bits // 8, shape.batch, shape.hidden_size,
                                  shape.hidden_size, forward=forward)
    return plan.kind


def _fused_streaming(shape: Shape, dtype: torch.dtype, device: torch.device) -> Built:
    """fused_rnn with the forward's W_hh read from L2 at every step (FUSED_RNN_RECURRENCE=persistent) at
    the shapes where the default keeps it in shared memory: what the resident forward saves."""
    if forward_loop(shape, dtype, device) != "resident":
        pytest.skip("the default forward is not the resident one here: this would time it again")
    built = _fused("auto", True)(shape, dtype, device)

    def forward(x: Tensor) -> Tensor:
        saved = os.environ.get("FUSED_RNN_RECURRENCE")
        os.environ["FUSED_RNN_RECURRENCE"] = "persistent"
        try:
            return built.forward(x)
        finally:
            if saved is None:
                del os.environ["FUSED_RNN_RECURRENCE"]
            else:
                os.environ["FUSED_RNN_RECURRENCE"] = saved

    return Built(built.module, forward, dict(built.info, forward_loop="persistent"))


def _cell_loop(compiled: bool) -> Callable[[Shape, torch.dtype, torch.device], Built]:
    def build(shape: Shape, dtype: torch.dtype, device: torch.device) -> Built:
        model = CellLoopLSTM(shape, regularizer_kwargs(shape), compiled, device=device, dtype=dtype)
        return Built(
            model, model, {"compiled": "torch.compile(step, dynamic=False, fullgraph=True)"} if compiled else {}
        )

    return build


PROVIDERS = (
    Provider("nn_lstm", "nn.LSTM", (), ("cuda", "cpu"), _nn_lstm),
    Provider("awd_lstm", "nn.LSTM + AWD WeightDrop/LockedDropout", AWD_APPLIED, ("cuda", "cpu"), _awd_lstm),
    Provider("fused_rnn", "fused_rnn.LSTM (auto)", ALL_APPLIED, ("cuda", "cpu"), _fused("auto", True)),
    Provider("fused_rnn_noreg", "fused_rnn.LSTM (auto), no regularizer", (), ("cuda", "cpu"), _fused("auto", False)),
    Provider("fused_rnn_streaming", "fused_rnn.LSTM (auto), forward reading W_hh from L2 each step", ALL_APPLIED,
             ("cuda",), _fused_streaming),
    Provider("reference", "fused_rnn.LSTM (reference)", ALL_APPLIED, ("cuda", "cpu"), _fused("reference", True)),
    Provider("cell_loop", "LSTM cell loop in PyTorch", ALL_APPLIED, ("cuda", "cpu"), _cell_loop(False)),
    Provider("cell_loop_compiled", "LSTM cell loop, torch.compile'd step", ALL_APPLIED, ("cuda",), _cell_loop(True)),
)
PROVIDERS_BY_NAME = {provider.name: provider for provider in PROVIDERS}
BASELINE = "nn_lstm"


def make_input(shape: Shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[T, B, I], requiring grad as an embedding's output does in training."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(shape.seq_len, shape.batch, shape.input_size, generator=generator)
    return x.to(device=device, dtype=dtype).requires_grad_()


def build_step(built: Built, shape: Shape, x: Tensor, mode: str) -> Callable[[], None]:
    """One training-mode forward ("fwd", autograd recording as in training), or forward + backward
    ("fwdbwd"); gradients are set to None afterwards, as zero_grad does, so each call allocates its own."""
    built.module.train()
    parameters = list(built.module.parameters())
    if mode == "fwd":

        def step() -> None:
            built.forward(x)

        return step
    if mode != "fwdbwd":
        raise ValueError(f"unknown mode {mode!r}")
    # [T, B, H]: a fixed upstream gradient, as the loss would send
    grad_out = torch.randn(shape.seq_len, shape.batch, shape.hidden_size, dtype=x.dtype, device=x.device)

    def step() -> None:
        built.forward(x).backward(grad_out)
        for p in parameters:
            p.grad = None
        x.grad = None

    return step
