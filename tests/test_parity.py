"""Parity with torch.nn.LSTM in float64 (SPEC.md sections 1 and 3), on every backend.

The full cross product num_layers x bidirectional x proj_size x batch_first x bias x input form x hx x
mode runs on every backend, the Triton one included (under the interpreter on CPU).
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_rnn

from helpers import assert_close

from _cases import (
    ALL_CFGS,
    ALL_DROPOUTS,
    ALL_ON,
    BIG_CFG,
    FORMS,
    I,
    TIGHT,
    Cfg,
    Inputs,
    compare_results,
    make_inputs,
    make_pair,
    drop_packed_indices,
    run_with_grads,
    setup_backend,
    spec_forward,
)

MODES = ("train_p0", "eval_all_on")


@dataclasses.dataclass(frozen=True)
class Case:
    cfg: Cfg
    form: str
    with_hx: bool
    mode: str

    def factors(self):
        c = self.cfg
        return (c.num_layers, c.bidirectional, c.proj_size, c.batch_first, c.bias, self.form, self.with_hx, self.mode)

    def __str__(self):
        return f"{self.cfg}-{self.form}-{'hx' if self.with_hx else 'nohx'}-{self.mode}"


PARITY_CASES = [Case(*c) for c in itertools.product(ALL_CFGS, FORMS, (False, True), MODES)]
@pytest.mark.parametrize("case", PARITY_CASES, ids=str)
def test_matches_nn_lstm(backend, case):
    """Outputs, h_n, c_n and the gradients of input, h0, c0 and every parameter equal nn.LSTM's
    (train mode with every probability 0, or eval mode with every dropout on and zoneout off)."""
    device = setup_backend(backend)
    reg = {} if case.mode == "train_p0" else ALL_DROPOUTS
    ref, fused = make_pair(case.cfg, backend=backend, device=device, **reg)
    if case.mode == "eval_all_on":
        ref.eval()
        fused.eval()
    inputs = make_inputs(case.cfg, case.form, case.with_hx)
    expected = run_with_grads(ref, inputs)
    got = run_with_grads(fused, inputs.to(device))
    compare_results(expected, got, TIGHT, f"{case}: ")


@pytest.mark.parametrize("create_graph", [False, True], ids=["", "create_graph"])
@pytest.mark.parametrize("used", ["c_n", "c_n and the first layer's h_n"])
def test_an_unreached_projection_gets_no_gradient_as_in_nn_lstm(backend, used, create_graph):
    """One step, the last layer's output and h_n unused: nothing reaches its W_hr (c_n comes before the
    projection), and nn.LSTM on CPU leaves that gradient None, with create_graph too (the fused backends'
    differentiable gradients); the other weights get theirs, equal to nn.LSTM's."""
    device = setup_backend(backend)
    cfg = Cfg(num_layers=2, proj_size=2)
    ref, lstm = make_pair(cfg, backend=backend, device=device)
    x = torch.randn(1, 3, I, dtype=torch.float64)
    grads = []
    for module, dev in ((ref, "cpu"), (lstm, device)):
        _, (h_n, c_n) = module(x.to(dev))
        (c_n.sum() if used == "c_n" else c_n[-1].sum() + h_n[0].sum()).backward(create_graph=create_graph)
        grads.append({name: p.grad for name, p in module.named_parameters()})
    if used == "c_n":
        assert grads[0]["weight_hr_l1"] is None
    # else h_n's stack passes zeros to the last layer's h: nn.LSTM's W_hr gets a zero gradient, not None
    for name, expected in grads[0].items():
        assert (grads[1][name] is None) == (expected is None), name
        if expected is not None:
            assert_close(name, expected, grads[1][name].cpu(), TIGHT)


def test_packed_output_keeps_the_callers_order(backend):
    """An unsorted PackedSequence comes back with the same sorted/unsorted indices, h_n in caller order:
    row b of h_n is the state of sequence b, which a run of that sequence alone reproduces."""
    device = setup_backend(backend)
    cfg = Cfg(bidirectional=True)
    _, fused = make_pair(cfg, backend=backend, device=device)
    inputs = make_inputs(cfg, "packed_unsorted", True).to(device)
    data, hx = inputs.call_args()
    out, (h_n, c_n) = fused(data, hx)
    assert torch.equal(out.sorted_indices, data.sorted_indices)
    assert torch.equal(out.unsorted_indices, data.unsorted_indices)
    assert torch.equal(out.batch_sizes, data.batch_sizes)
    for b, length in enumerate(inputs.lengths):
        alone_out, (alone_h, alone_c) = fused(inputs.x[:length, b], (hx[0][:, b], hx[1][:, b]))
        assert_close(f"h_n[:, {b}]", alone_h, h_n[:, b], TIGHT)
        assert_close(f"c_n[:, {b}]", alone_c, c_n[:, b], TIGHT)


# --- eval mode with zoneout: the expectation c_t = p c_prev + (1 - p) c~ --------------------------------

EVAL_ZONEOUT_CASES = [
    (Cfg(), "padded", True),
    (BIG_CFG, "padded", True),
    (Cfg(num_layers=2, batch_first=True, bias=False), "padded", False),
    (Cfg(bidirectional=True, proj_size=3), "packed_unsorted", True),
    (Cfg(num_layers=2, proj_size=2), "unbatched", True),
]


@pytest.mark.parametrize("cfg,form,with_hx", EVAL_ZONEOUT_CASES, ids=lambda v: str(v))
def test_eval_zoneout_is_its_expectation(backend, cfg, form, with_hx):
    """eval(): no dropout, zoneout mixes by its probability; checked against spec_lstm, with gradients."""
    device = setup_backend(backend)
    _, fused = make_pair(cfg, backend=backend, device=device, **ALL_DROPOUTS, zoneout_h=0.3, zoneout_c=0.6)
    fused.eval()
    inputs = make_inputs(cfg, form, with_hx).to(device)
    expected = run_with_grads(fused, inputs, forward=lambda: spec_forward(fused, inputs, training=False))
    got = drop_packed_indices(run_with_grads(fused, inputs, seed=123))
    compare_results(expected, got, TIGHT, f"{cfg}-{form}: ")
    # the expectation differs from plain nn.LSTM: the test would see zoneout being ignored
    fused.zoneout_h = fused.zoneout_c = 0.0
    plain = run_with_grads(fused, inputs)
    assert not torch.allclose(plain["output"], got["output"])


def test_eval_zoneout_one_freezes_the_state(backend):
    device = setup_backend(backend)
    _, fused = make_pair(BIG_CFG, backend=backend, device=device, zoneout_h=1.0, zoneout_c=1.0)
    fused.eval()
    inputs = make_inputs(BIG_CFG, "padded", True).to(device)
    out, (h_n, c_n) = fused(*inputs.call_args())
    h0, c0 = inputs.hx
    assert torch.equal(h_n, h0) and torch.equal(c_n, c0)
    assert torch.equal(out, torch.cat([h0[2], h0[3]], dim=-1).expand_as(out))
    # backward works in eval mode (SPEC 3) with an initial state that takes no gradient: every weight's is 0
    out, (h_n, c_n) = fused(inputs.x)
    (out.sum() + h_n.sum() + c_n.sum()).backward()
    for name, param in fused.named_parameters():
        assert param.grad is not None and not param.grad.any(), name


def test_strided_parameters_and_inputs_match_contiguous_ones(backend):
    """Parameters replaced by strided views of the same values (as parametrizations such as orthogonal give)
    and a strided input: every backend computes what it computes on contiguous copies, regularizers on."""
    device = setup_backend(backend)
    _, dense = make_pair(BIG_CFG, backend="reference", **ALL_ON)
    _, strided = make_pair(BIG_CFG, backend=backend, device=device, **ALL_ON)
    for name, param in list(strided.named_parameters()):
        values = param.detach()
        # a transposed copy transposed back (2-D), or every other element of a wider tensor (1-D)
        view = values.t().contiguous().t() if values.dim() == 2 else torch.stack([values, values], 1)[:, 0]
        assert not view.is_contiguous()
        setattr(strided, name, torch.nn.Parameter(view))
    inputs = make_inputs(BIG_CFG, "padded", True)
    expected = run_with_grads(dense, inputs, seed=7)
    x = inputs.x.detach().transpose(0, 1).contiguous().transpose(0, 1).to(device).requires_grad_()
    strided_inputs = Inputs(inputs.form, x, tuple(h.to(device) for h in inputs.hx), None, False)
    compare_results(expected, run_with_grads(strided, strided_inputs, seed=7), TIGHT, "strided: ")


# --- low precision: the reference computes fp16 / bf16 in float32 -------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_low_precision_computes_in_float32(dtype, training):
    """A half-precision module on the reference backend equals the float32 computation on the same (upcast)
    weights and inputs, rounded once to the half dtype: outputs, states and gradients."""
    cfg = BIG_CFG
    with torch.no_grad():
        half = make_pair(cfg, **ALL_DROPOUTS, zoneout_h=0.3, zoneout_c=0.2)[1].to(dtype)
    single = make_pair(cfg, **ALL_DROPOUTS, zoneout_h=0.3, zoneout_c=0.2)[1].float()
    single.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    half.train(training)
    single.train(training)
    inputs = make_inputs(cfg, "padded", True)
    leaves_half = [t.detach().to(dtype).requires_grad_() for t in (inputs.x, *inputs.hx)]
    leaves_single = [t.detach().float().requires_grad_() for t in leaves_half]
    out_h, (h_h, c_h) = half(leaves_half[0], tuple(leaves_half[1:]), seed=17)
    out_s, (h_s, c_s) = single(leaves_single[0], tuple(leaves_single[1:]), seed=17)
    assert out_h.dtype == h_h.dtype == c_h.dtype == dtype
    g = torch.Generator().manual_seed(3)
    cotangents = [torch.randn(t.shape, generator=g).to(dtype) for t in (out_h, h_h, c_h)]
    grads_h = torch.autograd.grad((out_h, h_h, c_h), leaves_half + list(half.parameters()), cotangents)
    grads_s = torch.autograd.grad(
        (out_s, h_s, c_s), leaves_single + list(single.parameters()), [c.float() for c in cotangents]
    )
    names = (
        ["output", "h_n", "c_n"]
        + ["grad_input", "grad_h0", "grad_c0"]
        + [f"grad_{n}" for n, _ in half.named_parameters()]
    )
    for name, a, b in zip(names, (out_h, h_h, c_h, *grads_h), (out_s, h_s, c_s, *grads_s)):
        assert a.dtype == dtype, name
        assert torch.equal(a, b.to(dtype)), f"{name}: not the float32 result rounded to {dtype}"


# --- fuzzing shapes and configurations against nn.LSTM (reference backend) ----------------------------

FUZZ = settings(
    derandomize=True, max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def draw_case(data):
    seq_len = data.draw(st.integers(1, 5), "T")
    batch = data.draw(st.integers(1, 3), "B")
    input_size = data.draw(st.integers(1, 6), "I")
    hidden = data.draw(st.integers(1, 5), "H")
    proj = data.draw(st.integers(0, hidden - 1), "proj_size")
    cfg = dict(
        num_layers=data.draw(st.integers(1, 3), "num_layers"),
        bidirectional=data.draw(st.booleans(), "bidirectional"),
        batch_first=data.draw(st.booleans(), "batch_first"),
        bias=data.draw(st.booleans(), "bias"),
        proj_size=proj,
    )
    form = data.draw(st.sampled_from(["padded", "packed_sorted", "packed_unsorted", "unbatched"]), "form")
    with_hx = data.draw(st.booleans(), "hx")
    lengths = None
    if form.startswith("packed"):
        lengths = [seq_len] + data.draw(
            st.lists(st.integers(1, seq_len), min_size=batch - 1, max_size=batch - 1), "lengths"
        )
        lengths = (
            sorted(lengths, reverse=True) if form == "packed_sorted" else data.draw(st.permutations(lengths), "order")
        )
    seed = data.draw(st.integers(0, 2**16), "data seed")
    g = torch.Generator().manual_seed(seed)
    dirs = 2 if cfg["bidirectional"] else 1
    if form == "unbatched":
        x, state_batch = torch.randn(seq_len, input_size, generator=g, dtype=torch.float64), ()
    else:
        shape = (batch, seq_len, input_size) if cfg["batch_first"] else (seq_len, batch, input_size)
        x, state_batch = torch.randn(shape, generator=g, dtype=torch.float64), (batch,)
    hx = None
    if with_hx:
        n = cfg["num_layers"] * dirs
        hx = (
            torch.randn(n, *state_batch, proj or hidden, generator=g, dtype=torch.float64).requires_grad_(),
            torch.randn(n, *state_batch, hidden, generator=g, dtype=torch.float64).requires_grad_(),
        )
    inputs = Inputs(form, x.requires_grad_(), hx, None if lengths is None else tuple(lengths), cfg["batch_first"])
    return input_size, hidden, cfg, inputs


@FUZZ
@given(data=st.data())
def test_fuzz_against_nn_lstm(data):
    input_size, hidden, cfg, inputs = draw_case(data)
    mode = data.draw(st.sampled_from(["train_p0", "eval_all_on"]), "mode")
    torch.manual_seed(data.draw(st.integers(0, 100), "init seed"))
    ref = torch.nn.LSTM(input_size, hidden, **cfg, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "dropout option adds dropout")
        lstm = fused_rnn.LSTM(
            input_size,
            hidden,
            **cfg,
            dtype=torch.float64,
            backend="reference",
            **({} if mode == "train_p0" else ALL_DROPOUTS),
        )
    lstm.load_state_dict(ref.state_dict())
    if mode == "eval_all_on":
        ref.eval()
        lstm.eval()
    compare_results(run_with_grads(ref, inputs), run_with_grads(lstm, inputs, seed=5), TIGHT)


@FUZZ
@given(data=st.data())
def test_fuzz_reference_against_the_spec_formulas(data):
    input_size, hidden, cfg, inputs = draw_case(data)
    probability = st.sampled_from([0.0, 0.0, 0.3, 0.5, 1.0])
    reg = {name: data.draw(probability, name) for name in ALL_DROPOUTS}
    reg.update(zoneout_h=data.draw(probability, "zoneout_h"), zoneout_c=data.draw(probability, "zoneout_c"))
    reg["dropout_mode"] = data.draw(st.sampled_from(["step", "locked"]), "dropout_mode")
    reg["weight_dropout_mode"] = data.draw(st.sampled_from(["element", "row"]), "weight_dropout_mode")
    reg["update_dropout_mode"] = data.draw(st.sampled_from(["step", "sequence"]), "update_dropout_mode")
    for name in ALL_DROPOUTS:  # spec_lstm divides by 1 - p: p = 1 is checked in test_regularizers
        if reg[name] == 1.0:
            reg[name] = 0.5
    training = data.draw(st.booleans(), "training")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "dropout option adds dropout")
        lstm = fused_rnn.LSTM(input_size, hidden, **cfg, dtype=torch.float64, backend="reference", **reg)
    lstm.train(training)
    seed = data.draw(st.integers(0, 2**63 - 1), "seed")
    expected = run_with_grads(lstm, inputs, forward=lambda: spec_forward(lstm, inputs, training=training, seed=seed))
    got = drop_packed_indices(run_with_grads(lstm, inputs, seed=seed))
    compare_results(expected, got, TIGHT)
