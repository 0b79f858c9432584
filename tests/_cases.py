"""Shared case builders for the foundation tests: configurations, inputs, an independent SPEC LSTM.

Nothing here imports fused_rnn.reference: `spec_lstm` is written from SPEC.md sections 2-3 so that the
reference itself is held to the contract, and every other backend is held to the reference.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fused_rnn
from fused_rnn import backends
from fused_rnn.regularizers import PROBABILITIES, Regularizers

from conftest import backend_device

# Tiny shapes: the Triton interpreter pays per program and step.
T, B, I, H, P = 4, 3, 5, 4, 3  # noqa: E741 - seq_len, batch, input_size, hidden_size, proj_size (when > 0)
LENGTHS_SORTED = (4, 3, 1)
LENGTHS_UNSORTED = (3, 1, 4)  # sorted_indices [2, 0, 1]: a 3-cycle
FORMS = ("padded", "packed_sorted", "packed_unsorted", "unbatched")

# float64 results that differ only by floating-point reordering sit near 1e-15.
TIGHT = 1e-10

# Every regularizer on, zoneout off: eval must equal nn.LSTM.
ALL_DROPOUTS = dict(
    dropout=0.25,
    input_dropout=0.2,
    output_dropout=0.3,
    recurrent_dropout=0.35,
    weight_dropout=0.4,
    update_dropout=0.3,
    cell_dropout=0.2,
)
ALL_ON = dict(ALL_DROPOUTS, zoneout_h=0.3, zoneout_c=0.4)
ALL_ON_OTHER_MODES = dict(ALL_ON, dropout_mode="locked", weight_dropout_mode="row", update_dropout_mode="sequence")
PROBABILITY_NAMES = PROBABILITIES


@dataclasses.dataclass(frozen=True)
class Cfg:
    num_layers: int = 1
    bidirectional: bool = False
    proj_size: int = 0
    batch_first: bool = False
    bias: bool = True

    @property
    def dirs(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def h_out(self) -> int:
        return self.proj_size or H

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return (
            f"L{self.num_layers}-{'bi' if self.bidirectional else 'uni'}-p{self.proj_size}"
            f"-{'bf' if self.batch_first else 'tf'}-{'bias' if self.bias else 'nobias'}"
        )


ALL_CFGS = [
    Cfg(layers, bidir, proj, bf, bias)
    for layers, bidir, proj, bf, bias in itertools.product((1, 2), (False, True), (0, P), (False, True), (True, False))
]
BIG_CFG = Cfg(num_layers=2, bidirectional=True, proj_size=P)


def setup_backend(backend: str) -> torch.device:
    """The device a backend's tests run on; skips a backend whose module is not written yet."""
    if not hasattr(backends.module(backend), "run"):
        pytest.skip(f"the {backend} backend module has no run() yet (not written)")
    return backend_device(backend)


def make_lstm(cfg: Cfg, *, backend="reference", device="cpu", dtype=torch.float64, **reg) -> fused_rnn.LSTM:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "dropout option adds dropout")
        return fused_rnn.LSTM(I, H, **cfg.kwargs(), device=device, dtype=dtype, backend=backend, **reg)


def make_pair(cfg: Cfg, *, backend="reference", device="cpu", init_seed=0, **reg):
    """(nn.LSTM on CPU, fused_rnn.LSTM on `device`) in float64 with the same weights."""
    torch.manual_seed(init_seed)
    ref = torch.nn.LSTM(I, H, **cfg.kwargs(), dtype=torch.float64)
    fused = make_lstm(cfg, backend=backend, device=device, **reg)
    fused.load_state_dict(ref.state_dict(), strict=True)
    return ref, fused


@dataclasses.dataclass
class Inputs:
    """One input form: the leaf tensors (for gradients) and how to call a module with them."""

    form: str
    x: torch.Tensor  # the leaf: [T, B, I] / [B, T, I] (batch_first) / [T, I] (unbatched)
    hx: tuple | None
    lengths: tuple | None
    batch_first: bool

    def call_args(self):
        if self.form.startswith("packed"):
            data = pack_padded_sequence(
                self.x, list(self.lengths), batch_first=self.batch_first, enforce_sorted=self.form == "packed_sorted"
            )
        else:
            data = self.x
        return data, self.hx

    def leaves(self) -> dict:
        out = {"input": self.x}
        if self.hx is not None:
            out["h0"], out["c0"] = self.hx
        return out

    def to(self, device) -> Inputs:
        """A copy on `device` with fresh leaves."""
        leaf = lambda t: t.detach().to(device).requires_grad_(t.requires_grad)  # noqa: E731
        hx = None if self.hx is None else tuple(leaf(t) for t in self.hx)
        return Inputs(self.form, leaf(self.x), hx, self.lengths, self.batch_first)

    def time_major(self) -> torch.Tensor:
        """The input as [T, B, I] in the caller's row order (unbatched: a batch of one)."""
        if self.form == "unbatched":
            return self.x.unsqueeze(1)
        return self.x.transpose(0, 1) if self.batch_first else self.x


def make_inputs(cfg: Cfg, form: str, with_hx: bool, *, seed=0, seq_len=T, batch=B, dtype=torch.float64) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    lengths = None
    if form == "unbatched":
        shape, state_batch = (seq_len, I), ()
    else:
        shape = (batch, seq_len, I) if cfg.batch_first else (seq_len, batch, I)
        state_batch = (batch,)
        if form == "packed_sorted":
            lengths = LENGTHS_SORTED
        elif form == "packed_unsorted":
            lengths = LENGTHS_UNSORTED
        if lengths is not None:
            assert len(lengths) == batch and max(lengths) == seq_len
    x = torch.randn(shape, generator=g, dtype=dtype).requires_grad_()
    hx = None
    if with_hx:
        states = cfg.num_layers * cfg.dirs
        h0 = torch.randn((states, *state_batch, cfg.h_out), generator=g, dtype=dtype).requires_grad_()
        c0 = torch.randn((states, *state_batch, H), generator=g, dtype=dtype).requires_grad_()
        hx = (h0, c0)
    return Inputs(form, x, hx, lengths, cfg.batch_first)


def output_tensor(out):
    return out.data if isinstance(out, PackedSequence) else out


def run_with_grads(module, inputs: Inputs, *, forward=None, cotangent_seed=1, backward=False, **call_kwargs) -> dict:
    """Forward, then backward of separate random cotangents on output, h_n and c_n.

    forward: None to call `module(input, hx, **call_kwargs)`, or a function of no arguments returning
    (output, (h_n, c_n)) computed from `inputs` and the module's parameters. backward: accumulate with
    loss.backward() and read .grad (reentrant checkpointing allows nothing else) instead of autograd.grad.
    Returns every result (output, h_n, c_n, the PackedSequence indices) and the gradient of every leaf
    and parameter, detached and on the CPU."""
    if forward is None:
        data, hx = inputs.call_args()
        out, (h_n, c_n) = module(data, hx, **call_kwargs)
    else:
        out, (h_n, c_n) = forward()
    g = torch.Generator().manual_seed(cotangent_seed)
    results = {"output": output_tensor(out), "h_n": h_n, "c_n": c_n}
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)).sum() for t in results.values())
    leaves = inputs.leaves()
    params = dict(module.named_parameters())
    wrt = list(leaves.values()) + list(params.values())
    if backward:
        for t in wrt:
            t.grad = None
        loss.backward()
        grads = [t.grad for t in wrt]
        for t in wrt:
            t.grad = None
    else:
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    found = {name: t.detach().cpu() for name, t in results.items()}
    if isinstance(out, PackedSequence):
        found["batch_sizes"] = out.batch_sizes
        for name in ("sorted_indices", "unsorted_indices"):
            index = getattr(out, name)
            found[name] = None if index is None else index.cpu()
    for name, grad in zip(list(leaves) + list(params), grads):
        found[f"grad_{name}"] = None if grad is None else grad.detach().cpu()
    return found


def compare_results(ref: dict, out: dict, ratio: float, what: str = "") -> None:
    from helpers import assert_close

    assert ref.keys() == out.keys(), f"{what}: results {sorted(out)} != {sorted(ref)}"
    for name, r in ref.items():
        o = out[name]
        if name in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            assert (r is None and o is None) or torch.equal(r, o), f"{what}{name}: {o} != {r}"
            continue
        assert r is not None and o is not None, f"{what}{name}: missing gradient"
        assert_close(f"{what}{name}", r, o, ratio)


def layer_weights(module):
    """The module's weights as fused_rnn.stack.LayerWeights, for lstm_naive."""
    from fused_rnn.stack import split_flat_weights

    return split_flat_weights(
        [getattr(module, name) for name in module._flat_weights_names],
        module.num_layers,
        2 if module.bidirectional else 1,
        module.bias,
        module.proj_size > 0,
    )


# --------------------------------------------------------------------------------------------------
# An LSTM written from SPEC.md sections 2 and 3, independent of fused_rnn.reference.
# --------------------------------------------------------------------------------------------------


def spec_lstm(x, h0, c0, params: dict, *, num_layers, num_directions, reg: Regularizers, masks, training, lengths=None):
    """x: [T, B, I] time-major; h0: [L*D, B, H_out]; c0: [L*D, B, H]; params: nn.LSTM's names -> tensors;
    masks: sample_masks' dict (training) or None; lengths: [B] valid steps per row, or None.

    Dropout is `v * m / (1 - p)`, zoneout `z * prev + (1 - z) * new` (training) or `p * prev + (1 - p) * new`
    (eval), as SPEC.md writes them."""
    seq_len = x.shape[0]

    def drop(v, keep, p):
        return v if keep is None else v * keep.to(v.dtype) / (1.0 - p)

    def io_mask(mask, t):  # input-side masks: [T, B, F] per step, or [1, B, F] locked
        if mask is None:
            return None
        if reg.dropout_mode == "locked":
            assert mask.shape[0] == 1
            return mask[0]
        assert mask.shape[0] == seq_len
        return mask[t]

    def get(name, k):
        return masks[name][k] if training else None

    layer_input = x
    h_n, c_n = [], []
    for layer in range(num_layers):
        p_in = reg.input_dropout if layer == 0 else reg.dropout
        m_in = masks["input"][layer] if training else None
        layer_input = torch.stack([drop(layer_input[t], io_mask(m_in, t), p_in) for t in range(seq_len)])
        outputs = []
        for d in range(num_directions):
            k = layer * num_directions + d
            suffix = f"_l{layer}" + ("_reverse" if d == 1 else "")
            w_ih, w_hh = params["weight_ih" + suffix], params["weight_hh" + suffix]
            b_ih, b_hh = params.get("bias_ih" + suffix), params.get("bias_hh" + suffix)
            w_hr = params.get("weight_hr" + suffix)
            w_hh = drop(w_hh, get("weight", k), reg.weight_dropout)  # [4H, H_out] or [4H, 1] broadcast
            update = get("update", k)
            h, c = h0[k], c0[k]
            out = [None] * seq_len
            for t in reversed(range(seq_len)) if d == 1 else range(seq_len):
                r = drop(h, get("hidden", k), reg.recurrent_dropout)
                gates = layer_input[t] @ w_ih.T
                if b_ih is not None:
                    gates = gates + b_ih
                gates = gates + r @ w_hh.T
                if b_hh is not None:
                    gates = gates + b_hh
                i, f, g, o = gates.chunk(4, dim=1)
                i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
                if update is not None:
                    if reg.update_dropout_mode == "sequence":
                        assert update.shape[0] == 1
                        g = drop(g, update[0], reg.update_dropout)
                    else:
                        assert update.shape[0] == seq_len
                        g = drop(g, update[t], reg.update_dropout)
                c_tilde = f * c + i * g
                c_tilde = drop(c_tilde, get("cell", k), reg.cell_dropout)
                h_tilde = o * torch.tanh(c_tilde)
                if w_hr is not None:
                    h_tilde = h_tilde @ w_hr.T
                if training:
                    zc, zh = get("zoneout_c", k), get("zoneout_h", k)
                    zc = 0.0 if zc is None else zc[t].to(c.dtype)
                    zh = 0.0 if zh is None else zh[t].to(h.dtype)
                else:
                    zc, zh = reg.zoneout_c, reg.zoneout_h
                c_new = zc * c + (1 - zc) * c_tilde
                h_new = zh * h + (1 - zh) * h_tilde
                if lengths is None:
                    h, c = h_new, c_new
                    out[t] = h
                else:
                    active = (t < lengths).unsqueeze(1)
                    h, c = torch.where(active, h_new, h), torch.where(active, c_new, c)
                    out[t] = torch.where(active, h_new, torch.zeros_like(h_new))
            outputs.append(torch.stack(out))
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outputs, dim=-1)
    m_out = masks["output"] if training else None
    output = torch.stack([drop(layer_input[t], io_mask(m_out, t), reg.output_dropout) for t in range(seq_len)])
    return output, torch.stack(h_n), torch.stack(c_n)


def _explicit_forward(module, inputs: Inputs, run):
    """run(x [T, B, I], h0, c0, lengths) -> (out, h_n, c_n) time-major; returns (output, (h_n, c_n)) shaped
    as the module returns them (for packed input, the output is the PackedSequence's data)."""
    L, D = module.num_layers, 2 if module.bidirectional else 1
    h_out = module.proj_size or module.hidden_size
    x = inputs.time_major()
    batch = x.shape[1]
    if inputs.hx is None:
        h0 = x.new_zeros(L * D, batch, h_out)
        c0 = x.new_zeros(L * D, batch, module.hidden_size)
    else:
        h0, c0 = inputs.hx
        if inputs.form == "unbatched":
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
    lengths = None if inputs.lengths is None else torch.tensor(inputs.lengths, device=x.device)
    out, h_n, c_n = run(x, h0, c0, lengths)
    if inputs.form.startswith("packed"):
        data, _ = inputs.call_args()
        packed_out = pack_padded_sequence(out, list(inputs.lengths), enforce_sorted=inputs.form == "packed_sorted")
        assert torch.equal(packed_out.batch_sizes, data.batch_sizes)
        out = packed_out.data
    elif inputs.form == "unbatched":
        out, h_n, c_n = out.squeeze(1), h_n.squeeze(1), c_n.squeeze(1)
    elif inputs.batch_first:
        out = out.transpose(0, 1)
    return out, (h_n, c_n)


def spec_forward(module, inputs: Inputs, *, training: bool, seed=None, masks=None):
    """spec_lstm on a module's parameters and the masks of `seed` (or `masks`), shaped as the module returns."""

    def run(x, h0, c0, lengths):
        m = (module.sample_masks(x.shape[0], x.shape[1], seed) if masks is None else masks) if training else None
        return spec_lstm(
            x,
            h0,
            c0,
            dict(module.named_parameters()),
            num_layers=module.num_layers,
            num_directions=2 if module.bidirectional else 1,
            reg=module.regularizers,
            masks=m,
            training=training,
            lengths=lengths,
        )

    return _explicit_forward(module, inputs, run)


def naive_forward(module, inputs: Inputs, *, seed=None, masks=None):
    """fused_rnn.reference.lstm_naive in training mode fed the masks of `seed` (or `masks`)."""
    from fused_rnn.reference import lstm_naive

    def run(x, h0, c0, lengths):
        m = module.sample_masks(x.shape[0], x.shape[1], seed) if masks is None else masks
        return lstm_naive(
            x,
            h0,
            c0,
            layer_weights(module),
            num_directions=2 if module.bidirectional else 1,
            reg=module.regularizers,
            masks=m,
            training=True,
            lengths=lengths,
        )

    return _explicit_forward(module, inputs, run)


def drop_packed_indices(results: dict) -> dict:
    """Results without the PackedSequence indices (an explicit forward returns the output data only)."""
    for name in ("batch_sizes", "sorted_indices", "unsorted_indices"):
        results.pop(name, None)
    return results
