"""Regularizer semantics (SPEC.md sections 2 and 4): the masks, and what a training forward does with them.

Three layers of checks:
- the reference against `spec_lstm`, an LSTM written in the tests from SPEC.md's formulas, one regularizer
  at a time and all together (reference only: this is what makes the reference an oracle);
- every backend against the reference fed the masks of `sample_masks` (flash-attention's replay), with
  gradients, and the observable consequences of the masks (p = 1, zoneout = 1, packed and unbatched rows);
- the masks themselves: shapes, modes, keep rates and the independence of their streams.
"""

from __future__ import annotations

import contextlib
import gc
import math
import weakref

import pytest
import torch

import fused_rnn
from fused_rnn import philox
from fused_rnn.regularizers import Regularizers

from helpers import assert_close

from _cases import (
    ALL_DROPOUTS,
    ALL_ON,
    ALL_ON_OTHER_MODES,
    PROBABILITY_NAMES,
    BIG_CFG,
    TIGHT,
    B,
    Cfg,
    H,
    I,
    P,
    T,
    compare_results,
    drop_packed_indices,
    make_inputs,
    make_lstm,
    make_pair,
    naive_forward,
    output_tensor,
    run_with_grads,
    setup_backend,
    spec_forward,
)

SEED = 20240611
MASK_NAMES = ("hidden", "weight", "update", "cell", "zoneout_h", "zoneout_c")


def assert_nontrivial(masks: dict, what: str) -> None:
    """Every kind of mask that is on both keeps and drops somewhere, so the comparison sees it."""
    found = 0
    for name, value in masks.items():
        on = [m for m in (value if isinstance(value, list) else [value]) if m is not None]
        if on:
            found += 1
            assert any(m.any() for m in on) and not all(m.all() for m in on), f"{what}: masks[{name!r}] are constant"
    assert found, f"{what}: no mask is on"


# --- the reference against SPEC.md's formulas, written independently ---------------------------------

SINGLES = [
    dict(input_dropout=0.5),
    dict(input_dropout=0.5, dropout_mode="locked"),
    dict(dropout=0.5),
    dict(dropout=0.5, dropout_mode="locked"),
    dict(output_dropout=0.5),
    dict(output_dropout=0.5, dropout_mode="locked"),
    dict(recurrent_dropout=0.5),
    dict(weight_dropout=0.5),
    dict(weight_dropout=0.5, weight_dropout_mode="row"),
    dict(update_dropout=0.5),
    dict(update_dropout=0.5, update_dropout_mode="sequence"),
    dict(cell_dropout=0.5),
    dict(zoneout_h=0.5),
    dict(zoneout_c=0.5),
    ALL_ON,
    ALL_ON_OTHER_MODES,
]
SPEC_CFGS = [
    (Cfg(), "padded", True),
    (BIG_CFG, "padded", True),
    (Cfg(num_layers=2, batch_first=True, bias=False), "padded", False),
]
SPEC_CASES = [
    (cfg, form, hx, reg)
    for cfg, form, hx in SPEC_CFGS
    for reg in SINGLES
    if cfg.num_layers > 1 or "dropout" not in reg or len(reg) > 2
] + [
    (BIG_CFG, "packed_unsorted", True, ALL_ON),
    (Cfg(bidirectional=True, proj_size=2), "packed_sorted", False, ALL_ON_OTHER_MODES),
    (Cfg(num_layers=2, proj_size=3), "unbatched", True, dict(ALL_ON, zoneout_h=0.5, cell_dropout=0.5)),
]


def reg_id(reg: dict) -> str:
    if reg is ALL_ON:
        return "all_on"
    if reg is ALL_ON_OTHER_MODES:
        return "all_on_locked_row_sequence"
    return "-".join(f"{k}={v}" for k, v in reg.items())


@pytest.mark.parametrize(
    "cfg,form,with_hx,reg",
    SPEC_CASES,
    ids=[f"{c}-{f}-{'hx' if h else 'nohx'}-{reg_id(r)}" for c, f, h, r in SPEC_CASES],
)
def test_reference_follows_the_spec_formulas(cfg, form, with_hx, reg):
    """fused_rnn.LSTM(backend="reference") in training mode equals spec_lstm applying each mask of
    sample_masks exactly as SPEC.md section 2 says: outputs, states and every gradient."""
    _, lstm = make_pair(cfg, **reg)
    inputs = make_inputs(cfg, form, with_hx)
    batch = 1 if form == "unbatched" else inputs.x.shape[0 if cfg.batch_first else 1]
    assert_nontrivial(lstm.sample_masks(T, batch, SEED), str(reg))
    expected = run_with_grads(lstm, inputs, forward=lambda: spec_forward(lstm, inputs, training=True, seed=SEED))
    got = drop_packed_indices(run_with_grads(lstm, inputs, seed=SEED))
    compare_results(expected, got, TIGHT)
    # the masks matter: without them the result is different
    plain = drop_packed_indices(run_with_grads(make_pair(cfg)[1], inputs))
    assert not torch.allclose(plain["output"], got["output"]) or not torch.allclose(plain["c_n"], got["c_n"])


# --- every backend against the reference fed the same masks ------------------------------------------

REPLAY_CASES = [
    (BIG_CFG, "padded", True, ALL_ON),
    (BIG_CFG, "padded", True, ALL_ON_OTHER_MODES),
    (Cfg(batch_first=True, bias=False), "padded", False, ALL_ON),
    (Cfg(bidirectional=True, proj_size=3), "packed_unsorted", True, ALL_ON_OTHER_MODES),
    (Cfg(num_layers=2, bidirectional=True), "packed_sorted", False, ALL_ON),
    (Cfg(num_layers=2, proj_size=2), "unbatched", True, ALL_ON),
]


@pytest.mark.parametrize(
    "cfg,form,with_hx,reg", REPLAY_CASES, ids=[f"{c}-{f}-{reg_id(r)}" for c, f, _, r in REPLAY_CASES]
)
def test_training_forward_replays_sample_masks(backend, cfg, form, with_hx, reg):
    """A training forward with seed s equals lstm_naive fed module.sample_masks(T, B, s), gradients included."""
    device = setup_backend(backend)
    _, lstm = make_pair(cfg, backend=backend, device=device, **reg)
    inputs = make_inputs(cfg, form, with_hx).to(device)
    expected = run_with_grads(lstm, inputs, forward=lambda: naive_forward(lstm, inputs, seed=SEED))
    got = drop_packed_indices(run_with_grads(lstm, inputs, seed=SEED))
    compare_results(expected, got, TIGHT, f"{backend}: ")
    with torch.no_grad():
        other_seed, _ = lstm(*inputs.call_args(), seed=SEED + 1)
    assert not torch.allclose(output_tensor(other_seed).cpu(), got["output"]), "the seed changes nothing"


def test_locked_masks_are_the_same_mask_at_every_step(backend):
    """dropout_mode="locked" and update_dropout_mode="sequence" masks have time dimension 1, and the forward
    equals the reference fed that mask repeated at every step."""
    device = setup_backend(backend)
    _, lstm = make_pair(BIG_CFG, backend=backend, device=device, **ALL_ON_OTHER_MODES)
    masks = lstm.sample_masks(T, 3, SEED)
    assert [m.shape for m in masks["input"]] == [(1, 3, I), (1, 3, 2 * 3)]
    assert masks["output"].shape == (1, 3, 2 * 3)
    assert all(m.shape == (1, 3, H) for m in masks["update"])
    expanded = dict(masks)
    expanded["input"] = [m.expand(T, -1, -1) for m in masks["input"]]
    expanded["output"] = masks["output"].expand(T, -1, -1)
    expanded["update"] = [m.expand(T, -1, -1) for m in masks["update"]]
    inputs = make_inputs(BIG_CFG, "padded", True).to(device)
    expected = run_with_grads(lstm, inputs, forward=lambda: naive_forward(lstm, inputs, masks=expanded))
    compare_results(expected, run_with_grads(lstm, inputs, seed=SEED), TIGHT)


def test_step_masks_change_across_steps():
    lstm = make_lstm(BIG_CFG, **{name: 0.5 for name in ALL_ON})
    masks = lstm.sample_masks(T, 16, SEED)
    step_masks = masks["input"] + [masks["output"]] + masks["update"] + masks["zoneout_h"] + masks["zoneout_c"]
    for mask in step_masks:
        assert mask.shape[0] == T
        assert all(not torch.equal(mask[t], mask[t + 1]) for t in range(T - 1))


@pytest.mark.parametrize("mode", ["element", "row"])
def test_weight_mask_is_one_per_call_and_drops_whole_rows_in_row_mode(backend, mode):
    """One W_hh mask per call ([4H, H_out], or [4H, 1] whole rows), independent of the sequence; the
    gradient of a dropped weight is exactly 0."""
    device = setup_backend(backend)
    cfg = Cfg(proj_size=3)
    _, lstm = make_pair(cfg, backend=backend, device=device, weight_dropout=0.5, weight_dropout_mode=mode)
    mask = lstm.sample_masks(T, 3, SEED)["weight"][0]
    assert mask.shape == ((4 * H, 1) if mode == "row" else (4 * H, 3))
    assert torch.equal(mask, lstm.sample_masks(1, 1, SEED)["weight"][0])
    assert torch.equal(mask, lstm.sample_masks(7, 5, SEED)["weight"][0])
    assert mask.any() and not mask.all()
    got = run_with_grads(lstm, make_inputs(cfg, "padded", True).to(device), seed=SEED)
    grad = got["grad_weight_hh_l0"]
    dropped = ~mask.expand(4 * H, 3).cpu()
    assert torch.equal(grad[dropped], torch.zeros_like(grad[dropped]))
    assert (grad[~dropped] != 0).all()


def test_update_mask_shape_follows_its_mode():
    for mode, steps in (("step", T), ("sequence", 1)):
        lstm = make_lstm(BIG_CFG, update_dropout=0.5, update_dropout_mode=mode)
        masks = lstm.sample_masks(T, 3, SEED)
        assert [m.shape for m in masks["update"]] == [(steps, 3, H)] * 4


def test_sample_masks_shapes_and_none_where_off():
    lstm = make_lstm(BIG_CFG, **ALL_ON)
    masks = lstm.sample_masks(T, 2, SEED)
    k = 4  # layers * directions
    assert [m.shape for m in masks["input"]] == [(T, 2, I), (T, 2, 6)]
    assert masks["output"].shape == (T, 2, 6)
    expected = dict(
        hidden=(2, 3), weight=(4 * H, 3), update=(T, 2, H), cell=(2, H), zoneout_h=(T, 2, 3), zoneout_c=(T, 2, H)
    )
    for name, shape in expected.items():
        assert [m.shape for m in masks[name]] == [shape] * k, name
    for value in masks.values():
        for m in value if isinstance(value, list) else [value]:
            assert m.dtype == torch.bool and m.device == lstm.weight_hh_l0.device
    off = make_lstm(BIG_CFG).sample_masks(T, 2, SEED)
    assert off["input"] == [None, None] and off["output"] is None
    assert all(off[name] == [None] * k for name in MASK_NAMES)
    only_dropout = make_lstm(BIG_CFG, dropout=0.5).sample_masks(T, 2, SEED)
    assert only_dropout["input"][0] is None and only_dropout["input"][1] is not None


# --- keep rates and independent streams --------------------------------------------------------------

RATE_T, RATE_B, RATE_H = 16, 24, 32


def rate_lstm(p: float, **modes) -> fused_rnn.LSTM:
    return fused_rnn.LSTM(
        2 * RATE_H, RATE_H, num_layers=2, bidirectional=True, backend="reference",
        **{name: p for name in PROBABILITY_NAMES}, **modes,
    )


def true_probability(p: float, zoneout: bool) -> float:
    """P(mask is True): keep for dropout, keep-previous for zoneout."""
    fire = philox.threshold(p) / 2**32
    return fire if zoneout else 1 - fire


def all_masks(masks: dict):
    for name, value in masks.items():
        for index, mask in enumerate(value if isinstance(value, list) else [value]):
            if mask is not None:
                yield f"{name}[{index}]", name.startswith("zoneout"), mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.85])
@pytest.mark.parametrize(
    "modes",
    [{}, dict(dropout_mode="locked", weight_dropout_mode="row", update_dropout_mode="sequence")],
    ids=["step", "locked"],
)
def test_keep_rates_are_within_binomial_bounds(p, modes):
    masks = rate_lstm(p, **modes).sample_masks(RATE_T, RATE_B, SEED)
    seen = 0
    for name, zoneout, mask in all_masks(masks):
        q = true_probability(p, zoneout)
        n = mask.numel()
        rate = mask.double().mean().item()
        sigma = math.sqrt(q * (1 - q) / n)
        assert abs(rate - q) <= 5 * sigma, f"{name}: rate {rate:.4f}, expected {q:.4f} +- 5 * {sigma:.4f} (n={n})"
        seen += 1
    assert seen == 2 + 1 + 4 * 6


def assert_independent(a: torch.Tensor, b: torch.Tensor, qa: float, qb: float, what: str) -> None:
    """a and b agree about as often as two independent Bernoulli(qa), Bernoulli(qb) fields do."""
    assert a.shape == b.shape, what
    expected = qa * qb + (1 - qa) * (1 - qb)
    n = a.numel()
    sigma = math.sqrt(expected * (1 - expected) / n)
    agree = (a == b).double().mean().item()
    assert abs(agree - expected) <= 5 * sigma, (
        f"{what}: agreement {agree:.4f}, independent {expected:.4f} +- 5 * {sigma:.4f}"
    )


def test_mask_streams_are_independent():
    """Masks of different kinds, words, layers, directions, steps and seeds do not repeat one another."""
    p = 0.5
    step = rate_lstm(p)
    seq = rate_lstm(p, update_dropout_mode="sequence")
    m = step.sample_masks(RATE_T, RATE_B, SEED)
    s = seq.sample_masks(RATE_T, RATE_B, SEED)
    q = 0.5
    pairs = {
        # one Philox call, different words
        "zoneout_h/zoneout_c": (m["zoneout_h"][0], m["zoneout_c"][0]),
        "zoneout_h/update(step)": (m["zoneout_h"][0], m["update"][0]),
        "zoneout_c/update(step)": (m["zoneout_c"][0], m["update"][0]),
        "hidden/cell": (m["hidden"][0], m["cell"][0]),
        "cell/update(sequence)": (s["cell"][0], s["update"][0][0]),
        "hidden/update(sequence)": (s["hidden"][0], s["update"][0][0]),
        # kinds
        "hidden/zoneout_h[t=0]": (m["hidden"][0], m["zoneout_h"][0][0]),
        "input[1]/output": (m["input"][1], m["output"]),
        "input[0]/input[1]": (m["input"][0], m["input"][1]),
        # layer-directions
        "zoneout_h k0/k1": (m["zoneout_h"][0], m["zoneout_h"][1]),
        "zoneout_h k0/k2": (m["zoneout_h"][0], m["zoneout_h"][2]),
        "cell k1/k3": (m["cell"][1], m["cell"][3]),
        "weight k0/k1": (m["weight"][0], m["weight"][1]),
        "weight k0/k2": (m["weight"][0], m["weight"][2]),
        # steps
        "zoneout_c t/t+1": (m["zoneout_c"][0][:-1], m["zoneout_c"][0][1:]),
        "input[0] t/t+1": (m["input"][0][:-1], m["input"][0][1:]),
        # elements of one Philox call (words 0..3 of the bulk layout)
        "weight e/e+1": (m["weight"][0].flatten()[:-1], m["weight"][0].flatten()[1:]),
    }
    for seed_b in (SEED + 1, SEED + 2**32, SEED ^ (1 << 62)):
        other = step.sample_masks(RATE_T, RATE_B, seed_b)
        for name in ("input", "zoneout_h", "weight", "hidden"):
            a, b = m[name], other[name]
            pairs[f"{name} seed {SEED}/{seed_b}"] = (a[0], b[0])
        pairs[f"output seed {SEED}/{seed_b}"] = (m["output"], other["output"])
    for what, (a, b) in pairs.items():
        assert_independent(a, b, q, q, what)


# --- zoneout: True keeps the previous value ----------------------------------------------------------


def test_zoneout_true_keeps_the_previous_unit(backend):
    """h: where zoneout_h[t] is set, output t is exactly the previous one (t-1 forward, t+1 reverse, h0 at
    the start); c (one step): where zoneout_c is set c_n is c0, elsewhere the c of the same run without
    zoneout_c: turning zoneout_c on changes no other mask."""
    device = setup_backend(backend)
    cfg = Cfg(bidirectional=True)
    _, lstm = make_pair(cfg, backend=backend, device=device, zoneout_h=0.5, recurrent_dropout=0.3, update_dropout=0.3)
    inputs = make_inputs(cfg, "padded", True).to(device)
    out, _ = lstm(*inputs.call_args(), seed=SEED)
    out = out.detach().cpu()
    h0 = inputs.hx[0].detach().cpu()
    zh = lstm.sample_masks(T, 3, SEED)["zoneout_h"]
    for d, order in ((0, range(T)), (1, reversed(range(T)))):
        prev = h0[d]
        zoned = 0
        for t in order:
            now, z = out[t, :, d * H : (d + 1) * H], zh[d][t].cpu()
            assert torch.equal(now[z], prev[z]), f"direction {d} step {t}"
            assert (now[~z] != prev[~z]).all(), f"direction {d} step {t}"
            zoned += int(z.sum())
            prev = now
        assert zoned > 0

    one_step = make_inputs(cfg, "padded", True, seq_len=1).to(device)
    lstm.zoneout_c = 0.5
    _, (_, c_zoned) = lstm(*one_step.call_args(), seed=SEED)
    lstm.zoneout_c = 0.0
    _, (_, c_plain) = lstm(*one_step.call_args(), seed=SEED)
    lstm.zoneout_c = 0.5
    zc = torch.stack(lstm.sample_masks(1, 3, SEED)["zoneout_c"])[:, 0]
    assert zc.any() and not zc.all()
    assert torch.equal(c_zoned, torch.where(zc, one_step.hx[1], c_plain))


def test_zoneout_one_freezes_the_state(backend):
    """zoneout_h = zoneout_c = 1 in training: h_n == h0, c_n == c0, every output is h0 of its layer-direction,
    whatever the other (inner) dropouts do; no gradient reaches the weights and nothing is NaN."""
    device = setup_backend(backend)
    inner = {k: v for k, v in ALL_DROPOUTS.items() if k != "output_dropout"}
    _, lstm = make_pair(BIG_CFG, backend=backend, device=device, zoneout_h=1.0, zoneout_c=1.0, **inner)
    inputs = make_inputs(BIG_CFG, "padded", True).to(device)
    got = run_with_grads(lstm, inputs, seed=SEED)
    h0, c0 = (t.detach().cpu() for t in inputs.hx)
    assert torch.equal(got["h_n"], h0) and torch.equal(got["c_n"], c0)
    assert torch.equal(got["output"], torch.cat([h0[2], h0[3]], dim=-1).expand(T, -1, -1))
    for name, value in got.items():
        assert torch.isfinite(value).all(), name
        if name.startswith(("grad_weight", "grad_bias")) or name == "grad_input":
            assert torch.equal(value, torch.zeros_like(value)), name


# --- dropout with p = 1: zeros, never NaN ------------------------------------------------------------

P1_CFG = Cfg(num_layers=2, proj_size=3)
P1_CASES = [
    "input_dropout",
    "dropout",
    "output_dropout",
    "recurrent_dropout",
    "weight_dropout",
    "weight_dropout_row",
    "update_dropout",
    "update_dropout_sequence",
    "cell_dropout",
    "all",
]


@pytest.mark.parametrize("kind", P1_CASES)
def test_dropout_one_gives_exact_zeros_and_no_nan(backend, kind):
    """Two layers (so that `dropout` applies) with a projection; c0 = 0."""
    device = setup_backend(backend)
    reg = {
        "weight_dropout_row": dict(weight_dropout=1.0, weight_dropout_mode="row"),
        "update_dropout_sequence": dict(update_dropout=1.0, update_dropout_mode="sequence"),
        "all": {name: 1.0 for name in ALL_DROPOUTS},
    }.get(kind, {kind: 1.0})
    _, lstm = make_pair(P1_CFG, backend=backend, device=device, **reg)
    inputs = make_inputs(P1_CFG, "padded", True).to(device)
    with torch.no_grad():
        inputs.hx[1].zero_()  # c0 = 0: with g or c~ dropped, c stays 0
    got = run_with_grads(lstm, inputs, seed=SEED)
    for name, value in got.items():
        assert torch.isfinite(value).all(), f"{name} is not finite"

    def zero(name):
        assert torch.equal(got[name], torch.zeros_like(got[name])), f"{name} is not exactly 0"

    def same_as(module, new_inputs=inputs, names=("output", "h_n", "c_n")):
        with torch.no_grad():
            out, (h_n, c_n) = module(*new_inputs.call_args())
        expected = dict(output=out.cpu(), h_n=h_n.cpu(), c_n=c_n.cpu())
        for name in names:
            assert_close(name, expected[name], got[name], TIGHT)

    _, plain = make_pair(P1_CFG, backend=backend, device=device)
    if kind == "input_dropout":
        zero("grad_input")
        zeros = make_inputs(P1_CFG, "padded", True).to(device)
        with torch.no_grad():
            zeros.x.zero_()
            zeros.hx[1].zero_()
        same_as(plain, zeros)
    elif kind == "dropout":
        zero("grad_weight_ih_l1")
        with torch.no_grad():
            plain.weight_ih_l1.zero_()
        same_as(plain)
    elif kind == "output_dropout":
        zero("output")
        same_as(plain, names=("h_n", "c_n"))
    elif kind in ("recurrent_dropout", "weight_dropout", "weight_dropout_row"):
        for name in ("l0", "l1"):
            zero(f"grad_weight_hh_{name}")
        with torch.no_grad():
            for name in ("l0", "l1"):
                getattr(plain, f"weight_hh_{name}").zero_()
        same_as(plain)
    else:  # update, cell, all: c stays 0, so h = o tanh(0) = 0
        zero("output")
        zero("c_n")
        if kind.startswith("update"):
            zero("grad_weight_ih_l0")



# (regularizers, what holds inf and NaN where every element of it is dropped)
NON_FINITE_CASES = {
    "weight_dropout": (dict(weight_dropout=1.0), "weight_hh"),
    "weight_dropout_row": (dict(weight_dropout=1.0, weight_dropout_mode="row"), "weight_hh"),
    "recurrent_dropout": (dict(recurrent_dropout=1.0), "h0"),
    "cell_dropout": (dict(cell_dropout=1.0), "c0"),
    "input_dropout": (dict(input_dropout=1.0), "input"),
}


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's 0 * inf
@pytest.mark.parametrize("cfg", [Cfg(bidirectional=True), P1_CFG], ids=str)
@pytest.mark.parametrize("kind", NON_FINITE_CASES)
def test_dropout_one_drops_inf_and_nan_to_zero(backend, kind, cfg):
    """A dropped element is 0 whatever its value: with inf and NaN in what p = 1 drops, results and gradients
    equal the reference's (torch.where), not the NaN of 0 * inf. The one NaN the reference has is autograd's own:
    with c0 infinite, d c~ / d f = c0 times a zero gradient is NaN (in the gates' gradients, hence the weights'),
    and every backend must have it in the same places."""
    device = setup_backend(backend)
    reg, target = NON_FINITE_CASES[kind]

    def run(name):
        _, lstm = make_pair(cfg, backend=name, device=device if name == backend else "cpu", **reg)
        inputs = make_inputs(cfg, "padded", True).to(device if name == backend else "cpu")
        poisoned = [p for n, p in lstm.named_parameters() if n.startswith("weight_hh")] if target == "weight_hh" else [inputs.leaves()[target]]
        with torch.no_grad():
            for t in poisoned:
                flat = t.view(-1)
                flat[::3] = math.inf
                flat[1::5] = math.nan
                flat[2::7] = -math.inf
        return run_with_grads(lstm, inputs, seed=SEED)

    expected, got = run("reference"), run(backend)
    for name, value in got.items():
        finite = kind != "cell_dropout" or name in ("output", "h_n", "c_n", "grad_c0")
        assert not finite or torch.isfinite(value).all(), f"{name} is not finite"
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-10, equal_nan=True, msg=lambda m: f"{name}: {m}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_zoneout_one_freezes_the_state_over_nan_input(backend, training):
    """zoneout 1 keeps the previous state whatever the candidate holds, in training (the mask) and in eval (the
    expectation, weight 0 on the candidate): NaN in the input reaches no output or state. (Its gradients may
    hold NaN: the reference's autograd multiplies the candidate's zero gradient by NaN activation derivatives.)"""
    device = setup_backend(backend)
    cfg = Cfg(bidirectional=True)
    _, lstm = make_pair(cfg, backend=backend, device=device, zoneout_h=1.0, zoneout_c=1.0)
    lstm.train(training)
    inputs = make_inputs(cfg, "padded", True).to(device)
    with torch.no_grad():
        inputs.x[1, 0, 0] = math.nan
    got = run_with_grads(lstm, inputs, seed=SEED)
    h0, c0 = (t.detach().cpu() for t in inputs.hx)
    assert torch.equal(got["h_n"], h0) and torch.equal(got["c_n"], c0)
    assert torch.equal(got["output"], torch.cat([h0[0], h0[1]], -1).expand_as(got["output"]))


# --- rows: unbatched is a batch of one, packed rows are the caller's rows ----------------------------


def test_unbatched_input_uses_the_masks_of_batch_row_zero(backend):
    device = setup_backend(backend)
    cfg = Cfg(num_layers=2, bidirectional=True, proj_size=2)
    _, lstm = make_pair(cfg, backend=backend, device=device, **ALL_ON)
    one = make_inputs(cfg, "unbatched", True).to(device)
    out, (h_n, c_n) = lstm(*one.call_args(), seed=SEED)
    assert out.shape == (T, 2 * 2) and h_n.shape == (4, 2) and c_n.shape == (4, H)
    x, (h0, c0) = one.x, one.hx
    twice = (torch.stack([x, x], 1), (torch.stack([h0, h0], 1), torch.stack([c0, c0], 1)))
    out2, (h2, c2) = lstm(*twice, seed=SEED)
    for a, b in ((out, out2[:, 0]), (h_n, h2[:, 0]), (c_n, c2[:, 0])):
        assert_close("unbatched vs row 0", b, a, TIGHT)
    assert not torch.allclose(out2[:, 0], out2[:, 1]), "row 1 should draw other masks"


@pytest.mark.parametrize("form", ["packed_sorted", "packed_unsorted"])
def test_packed_rows_use_the_masks_of_their_caller_batch_row(backend, form):
    """Masks are indexed by the caller's batch row and position t, not by length or sorted order: row b of a
    packed forward equals row b of the padded forward of the whole batch cut to b's length (both directions,
    every layer), with the same seed."""
    device = setup_backend(backend)
    _, lstm = make_pair(BIG_CFG, backend=backend, device=device, **ALL_ON)
    inputs = make_inputs(BIG_CFG, form, True).to(device)
    data, hx = inputs.call_args()
    packed_out, (h_n, c_n) = lstm(data, hx, seed=SEED)
    padded_out, out_lengths = torch.nn.utils.rnn.pad_packed_sequence(packed_out)
    assert out_lengths.tolist() == list(inputs.lengths)
    for b, length in enumerate(inputs.lengths):
        cut_out, (cut_h, cut_c) = lstm(inputs.x[:length], hx, seed=SEED)
        assert_close(f"output row {b}", cut_out[:, b], padded_out[:length, b], TIGHT)
        assert_close(f"h_n row {b}", cut_h[:, b], h_n[:, b], TIGHT)
        assert_close(f"c_n row {b}", cut_c[:, b], c_n[:, b], TIGHT)


def test_eval_uses_no_masks(backend):
    """eval(): the seed changes nothing, and with zoneout off the result is the p = 0 result."""
    device = setup_backend(backend)
    cfg = Cfg(num_layers=2, proj_size=2)
    _, lstm = make_pair(cfg, backend=backend, device=device, **ALL_DROPOUTS)
    _, plain = make_pair(cfg, backend=backend, device=device)
    lstm.eval()
    inputs = make_inputs(cfg, "padded", True).to(device)
    a = run_with_grads(lstm, inputs, seed=1)
    b = run_with_grads(lstm, inputs, seed=2)
    c = run_with_grads(plain, inputs)
    for name in a:
        assert torch.equal(a[name], b[name]), name
        assert_close(name, c[name], a[name], TIGHT)


def test_recurrence_arguments_round_trip():
    """The op-list form of the recurrence's regularizers (what the C++ and Triton ops take) loses nothing of them."""
    reg = Regularizers(
        recurrent_dropout=0.1, weight_dropout=0.2, weight_dropout_mode="row", update_dropout=0.3,
        update_dropout_mode="sequence", cell_dropout=0.4, zoneout_h=0.5, zoneout_c=0.6, dropout=0.7, input_dropout=0.8,
    )
    probabilities, modes = reg.recurrence_arguments()
    assert probabilities == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6] and modes == [1, 0]
    back = Regularizers.of_recurrence_arguments(probabilities, modes)
    assert back == Regularizers(**{**reg.__dict__, "dropout": 0.0, "input_dropout": 0.0})


@pytest.mark.parametrize("reg", [ALL_ON, ALL_ON_OTHER_MODES], ids=["modes", "other_modes"])
def test_no_mask_is_kept_between_forward_and_backward(backend, reg, monkeypatch):
    """SPEC.md section 4 on every backend: the autograd graph of a training forward holds no mask (no bool
    tensor; the kernels regenerate theirs, the reference's graph saves where to draw each again), also when
    the caller has saved-tensor hooks of its own; and the reference's backward, drawing the masks again,
    gives exactly the gradients of one that kept them."""
    from fused_rnn import reference

    device = setup_backend(backend)
    saved = []

    def record(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    lstm = fused_rnn.LSTM(I, H, 2, bidirectional=True, proj_size=P, dtype=torch.float64, device=device,
                          backend=backend, **reg)
    x = torch.randn(T, B, I, dtype=torch.float64, device=device, requires_grad=True)

    def gradients(hooks: bool):
        context = torch.autograd.graph.saved_tensors_hooks(record, lambda t: t) if hooks else contextlib.nullcontext()
        with context:
            out, (h_n, c_n) = lstm(x, seed=11)
        return torch.autograd.grad((out**2).sum() + h_n.sum() + c_n.sum(), [x, *lstm.parameters()])

    runs = {"plain": gradients(False), "under a recording hook": gradients(True)}
    assert saved, "the recording hook saw nothing saved"
    masks = [shape for dtype, shape in saved if dtype == torch.bool]
    assert not masks, f"bool tensors saved for the backward: {masks}"
    if backend == "reference":
        monkeypatch.setattr(reference, "masks_regenerated_in_backward", lambda *args: contextlib.nullcontext())
        runs["with the masks kept"] = gradients(False)
    names = ["x", *dict(lstm.named_parameters())]
    for run, grads in runs.items():
        for name, expected, got in zip(names, runs["plain"], grads):
            assert torch.equal(expected, got), f"{name} {run}"


def test_the_reference_frees_its_masks_after_the_forward(monkeypatch):
    """Every mask the reference draws for a training forward is freed when the forward returns."""
    from fused_rnn import reference

    drawn = []

    def sample_and_watch(*args, **kwargs):
        masks = fused_rnn.masks.sample_masks(*args, **kwargs)
        drawn.extend(weakref.ref(m) for v in masks.values() for m in (v if isinstance(v, list) else [v]) if m is not None)
        return masks

    monkeypatch.setattr(reference, "sample_masks", sample_and_watch)
    lstm = fused_rnn.LSTM(I, H, 2, bidirectional=True, proj_size=P, dtype=torch.float64, backend="reference", **ALL_ON)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    out, (h_n, c_n) = lstm(x, seed=11)
    gc.collect()
    forward_masks = len(drawn)
    assert forward_masks > 10 and all(ref() is None for ref in drawn), sum(ref() is not None for ref in drawn)
    (out**2).sum().backward()
    assert len(drawn) == 2 * forward_masks, "the backward draws every mask again, once"
