"""The Triton backend against the reference: masks bit for bit from every kernel that draws them,
results and gradients on awkward shapes in both recurrence modes (one launch per step, and one
persistent launch per layer-direction), the custom ops; on a GPU the same, plus low precision.

Without a GPU these run in Triton's interpreter (conftest sets TRITON_INTERPRET), where a persistent
launch is one program walking every tile.
"""

from __future__ import annotations

import collections
import os
import types

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fused_rnn
from fused_rnn import backends, masks, philox
from fused_rnn.reference import lstm_naive
from fused_rnn.regularizers import Regularizers
from fused_rnn.stack import split_flat_weights

from conftest import require_backend
from helpers import assert_close, error_ratio

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from fused_rnn.triton import cell, kernels, launch, ops  # noqa: E402

SEEDS = (0, 5, 2**32 + 7, 2**63 - 1)
EVERY = dict(
    dropout=0.25, input_dropout=0.2, output_dropout=0.3, recurrent_dropout=0.35, weight_dropout=0.4,
    update_dropout=0.3, cell_dropout=0.2, zoneout_h=0.3, zoneout_c=0.4,
)
EVERY_OTHER_MODES = dict(EVERY, dropout_mode="locked", weight_dropout_mode="row", update_dropout_mode="sequence")
RECURRENCE_MODES = ("steps", "persistent", "resident")
gpu = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def seed_tensor(seed: int) -> torch.Tensor:
    return torch.tensor(seed, dtype=torch.int64)


def on_each_launch(monkeypatch, kernel, record) -> None:
    """record(args, kwargs) at each launch of kernel, before it runs. Set among the kernel's own attributes and
    removed from them afterwards: monkeypatch.setattr(kernel, "run", ...) puts the class's run back as an
    attribute of the kernel itself, where it hides a later patch of the class's (bench.allocations.
    kernels_skipped: the bench scripts' tests then ran every kernel, 50 s instead of 0.2)."""
    run = kernel.run
    monkeypatch.setitem(vars(kernel), "run", lambda *args, **kwargs: record(args, kwargs) or run(*args, **kwargs))


@pytest.fixture(autouse=True)
def kernels_keep_their_class_run(monkeypatch):
    """No test leaves a launch hook of its own on a kernel (on_each_launch)."""
    yield
    monkeypatch.undo()  # the test's patches, undone here: monkeypatch's own teardown comes after this one's
    left = [name for name, kernel in vars(kernels).items() if isinstance(kernel, triton.runtime.jit.KernelInterface)
            and "run" in vars(kernel)]
    assert not left, f"kernels left with a run of their own: {left}"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", [philox.KIND_INPUT, philox.KIND_OUTPUT])
@pytest.mark.parametrize("locked", [False, True])
def test_bulk_dropout_masks_are_the_references(seed, kind, locked):
    device = require_backend("triton", torch.float32)
    steps, batch, features, index, p = 3, 5, 301, 2, 0.37  # 1505 elements a step: two programs, not a multiple of 4
    x = torch.ones(steps, batch, features, device=device)
    y = launch.feature_dropout(x, seed, kind, index, p, locked)
    keep = masks.feature_keep_mask(seed, kind, index, p, 1 if locked else steps, batch, features, device)
    assert torch.equal(y != 0, keep.expand_as(y))
    assert torch.equal(y[keep.expand_as(y)], torch.full_like(y, philox.keep_scale(p))[keep.expand_as(y)])


@pytest.mark.parametrize("locked", [False, True])
def test_a_paired_dropout_drops_both_tensors_with_the_input_mask(locked):
    """The backward's launch that writes a layer's dropped input again and drops dx in place: both through the
    mask of the input's dropout, each as a dropout of its own would drop it."""
    device = require_backend("triton", torch.float32)
    steps, batch, features, index, p = 3, 5, 301, 1, 0.37
    x, dx = (torch.randn(steps, batch, features, device=device) for _ in range(2))
    expected_x, expected_dx = (launch.feature_dropout(t, SEEDS[0], philox.KIND_INPUT, index, p, locked) for t in (x, dx))
    dropped_x = torch.empty_like(x)
    launch.dropped_features(launch.seed_tensor(SEEDS[0], device), x, dropped_x, philox.KIND_INPUT, index, p, locked,
                            paired=(dx, dx))
    assert torch.equal(dropped_x, expected_x) and torch.equal(dx, expected_dx)
    assert (dx == 0).any() and (dx != 0).any()


@pytest.mark.parametrize("mode", RECURRENCE_MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("locked, packed", [(False, False), (True, False), (False, True)],
                         ids=["step", "locked", "step-lengths"])
def test_the_output_dropout_of_the_recurrence_is_the_launchs_bit_for_bit(mode, dtype, locked, packed, monkeypatch):
    """A resident forward stores out dropped, and a resident or persistent backward drops dL/dout as it loads it
    (launch.output_dropped_in_loop; other loops launch the dropout): bit for bit what the dropout launch gives
    of the undropped out, and the gradients of the layer run without it on dL/dout dropped by that launch, with
    rows of every length or of three (packed input, whose rows past their ends the kernels zero and skip). In
    16-bit the kernels round to the layer's dtype before they drop, as the launch reads the stored tensor."""
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", mode)
    device = require_backend("triton", dtype)
    seq_len, batch, inputs, hidden, p = 3, 3, 4, 8, 0.4
    generator = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=generator).to(device, dtype)  # noqa: E731
    x, h0, c0 = make(seq_len, batch, inputs), make(batch, hidden), make(batch, hidden)
    w_ih, w_hh, bias = make(4 * hidden, inputs), make(4 * hidden, hidden), make(4 * hidden)
    d_out = make(seq_len, batch, hidden)
    probabilities, modes = Regularizers(recurrent_dropout=0.2, zoneout_h=0.1).recurrence_arguments()
    seed = SEEDS[0]
    lengths = torch.tensor([seq_len, 1, 2], device=device) if packed else None

    def layer(output_dropout: float, d_out: torch.Tensor):
        ints, floats, flags = launch.layer_settings(tuple(probabilities), tuple(modes), (0.0, output_dropout), locked,
                                                    True, device, dtype)
        out, _, _, xg, rs, cs, hpre = launch.layer_forward(x, h0, c0, w_ih, w_hh, bias, None, lengths, seed, ints,
                                                           floats, flags, 0, False)
        out = out.clone()  # before the backward writes dL/dgates over xg
        grads = launch.layer_backward(d_out, None, None, x, w_ih, w_hh, None, lengths, seed, ints, floats, flags, 0,
                                      False, xg, rs, cs, hpre, torch.empty_like(xg))
        return out, grads

    def dropped(t: torch.Tensor) -> torch.Tensor:
        return launch.dropped_features(launch.seed_tensor(seed, device), t.clone(), torch.empty_like(t),
                                       philox.KIND_OUTPUT, 0, p, locked)

    out, grads = layer(p, d_out)
    plain_out, plain_grads = layer(0.0, dropped(d_out))
    assert torch.equal(out, dropped(plain_out))
    assert 0 < int((out == 0).sum()) < out.numel()
    for name, got, expected in zip(("dx", "dh0", "dc0", "dw_ih", "dw_hh", "dbias"), grads, plain_grads):
        assert torch.equal(got, expected), name


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rows", [False, True])
def test_weight_drop_masks_are_the_references(seed, rows):
    device = require_backend("triton", torch.float32)
    hidden, real_hidden, k, p = 7, 5, 3, 0.45
    reg = Regularizers(weight_dropout=p, weight_dropout_mode="row" if rows else "element")
    ints, floats = launch.step_parameters(reg, True, device, torch.float32)
    w = torch.ones(4 * hidden, real_hidden, device=device)
    dropped = launch.dropped_weight(launch.seed_tensor(seed, device), w, ints, floats, k, rows)
    keep = masks.weight_keep_mask(seed, k, p, rows, hidden, real_hidden, device)
    assert torch.equal(dropped != 0, keep.expand_as(dropped))
    if rows:
        assert ((dropped != 0).all(1) | (dropped == 0).all(1)).all(), "row mode drops whole rows of W_hh"


def _weight_drop_case(rows: bool, dtype: torch.dtype):
    """(seed, W_hh [68, 70], ints, floats, stream) of a weight drop test: two 32-wide tiles by two, neither full."""
    device = require_backend("triton", dtype)
    hidden, real_hidden, stream, p = 17, 70, 2, 0.3
    reg = Regularizers(weight_dropout=p, weight_dropout_mode="row" if rows else "element")
    ints, floats = launch.step_parameters(reg, True, device, dtype)
    w = torch.randn(4 * hidden, real_hidden, device=device).to(dtype)
    return launch.seed_tensor(SEEDS[0], device), w, ints, floats, stream


@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_the_transposed_dropped_weight_is_the_dropped_weight_transposed_bit_for_bit(rows, dtype):
    """The backward's W~ transposed in one pass (transposed_dropped_weight) against dropped_weight then a
    transposing copy: the same mask, scale and rounding, at a size of two tiles by two, neither full."""
    seed, w, ints, floats, k = _weight_drop_case(rows, dtype)
    expected = launch.dropped_weight(seed, w, ints, floats, k, rows).t()
    transposed = launch.transposed_dropped_weight(seed, w, ints, floats, k, rows)
    assert transposed.is_contiguous() and transposed.shape == w.t().shape
    assert torch.equal(transposed, expected)
    assert 0 < int((transposed == 0).sum()) < transposed.numel()


@triton.jit
def _store_slab(out_ptr, slab, n, N, K_START: tl.constexpr, K_SIZE: tl.constexpr):
    ks = K_START + tl.arange(0, K_SIZE)[:, None]
    tl.store(out_ptr + ks * N + n, slab, mask=n < N)


@triton.jit
def _store_part(out_ptr, low, high, n, N, K_START: tl.constexpr, K_SIZE: tl.constexpr):
    """A part of resident_weight as resident_halves split it (one slab, given twice, below 32 deep)."""
    if K_SIZE >= kernels.SPLIT_SLAB_DEPTH:
        _store_slab(out_ptr, low, n, N, K_START, K_SIZE // 2)
        _store_slab(out_ptr, high, n, N, K_START + K_SIZE // 2, K_SIZE // 2)
    else:
        _store_slab(out_ptr, low, n, N, K_START, K_SIZE)


@triton.jit
def _resident_weight_kernel(seed_ptr, w_ptr, out_ptr, ints_ptr, floats_ptr, stream, K, N, H_out,
                            FORWARD: tl.constexpr, BLOCK_N: tl.constexpr, K_MAIN: tl.constexpr, K_REST: tl.constexpr,
                            WEIGHT_DROP: tl.constexpr):
    """out [K_MAIN + K_REST, N] = the resident slabs of W_hh [4H, H_out]: forward, the transposed rows of W
    (slab (k, r) = W[r, k]), as forward_resident_kernel lays them; else W's rows (slab (k, j) = W[k, j])."""
    n = tl.arange(0, BLOCK_N)[None, :]
    offsets, k_stride = n, H_out
    if FORWARD:
        offsets, k_stride = n * H_out, 1
    main_low, main_high, rest_low, rest_high = kernels.resident_weight(
        w_ptr, offsets, k_stride, n < N, K, (seed_ptr, ints_ptr, floats_ptr, stream, H_out), K_MAIN, K_REST,
        WEIGHT_DROP,
    )
    _store_part(out_ptr, main_low, main_high, n, N, 0, K_MAIN)
    if K_REST > 0:
        _store_part(out_ptr, rest_low, rest_high, n, N, K_MAIN, K_REST)


@pytest.mark.parametrize("forward", [True, False])
@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_the_resident_slabs_drop_w_hh_as_they_load_it_bit_for_bit(forward, rows, dtype):
    """A resident kernel's slabs with weight drop applied as they load W_hh (launch.weight_drop_loaded) hold
    W~'s bits: dropped_weight's mask, scale and rounding, in each layout and part (K = 70 is 64 + 16 deep)."""
    seed, w, ints, floats, k = _weight_drop_case(rows, dtype)
    expected = launch.dropped_weight(seed, w, ints, floats, k, rows)
    expected = expected.t() if forward else expected  # [K, N]
    depth, width = expected.shape
    main, rest = launch.resident_depths(depth)
    slabs = torch.full((main + rest, width), float("nan"), dtype=dtype, device=w.device)
    flags = launch.Recurrence(weight=True, weight_rows=rows)
    _resident_weight_kernel[(1,)](seed, w, slabs, ints, floats, k, depth, width, w.shape[1], FORWARD=forward,
                                  BLOCK_N=launch.next_power_of_2(width), K_MAIN=main, K_REST=rest,
                                  WEIGHT_DROP=launch.weight_drop_loaded(flags))
    assert torch.equal(slabs[:depth], expected)
    assert torch.equal(slabs[depth:], torch.zeros_like(slabs[depth:])), "zeros past the depth"
    assert 0 < int((expected == 0).sum()) < expected.numel()


@triton.jit
def _unit_masks_kernel(seed_ptr, ints_ptr, floats_ptr, out_ptr, B, H, t, stream, BLOCK_B: tl.constexpr,
                       BLOCK_H: tl.constexpr, HOISTED: tl.constexpr):
    ints, _ = cell.step_settings(ints_ptr, floats_ptr)
    rows = tl.arange(0, BLOCK_B)[:, None]
    units = tl.arange(0, BLOCK_H)[None, :]
    inside = (rows < B) & (units < H)
    here = rows * H + units
    seed = seed_ptr
    if HOISTED:  # loaded before a time loop (the value), else where used (the pointer): cell.seed_value
        seed = tl.load(seed_ptr)
    hidden, update, cell_keep, zone_h, zone_c = cell.unit_masks(ints, seed, rows, units, H, t, stream)
    tl.store(out_ptr + here, hidden.to(tl.int8), mask=inside)
    tl.store(out_ptr + B * H + here, update.to(tl.int8), mask=inside)
    tl.store(out_ptr + 2 * B * H + here, cell_keep.to(tl.int8), mask=inside)
    tl.store(out_ptr + 3 * B * H + here, zone_h.to(tl.int8), mask=inside)
    tl.store(out_ptr + 4 * B * H + here, zone_c.to(tl.int8), mask=inside)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "reg",
    [
        Regularizers(recurrent_dropout=0.3, update_dropout=0.2, cell_dropout=0.4, zoneout_h=0.25, zoneout_c=0.35),
        Regularizers(recurrent_dropout=0.3, update_dropout=0.2, update_dropout_mode="sequence", zoneout_c=0.35),
        Regularizers(cell_dropout=1.0, zoneout_h=1.0),
    ],
    ids=["update-per-step", "update-per-sequence", "p-one"],
)
@pytest.mark.parametrize("hoisted", [False, True], ids=["seed-where-used", "seed-loaded-before"])
def test_unit_masks_are_the_references(seed, reg, hoisted):
    device = require_backend("triton", torch.float32)
    seq_len, batch, hidden, real_hidden, k = 3, 5, 7, 4, 2
    expected = masks.unit_masks(reg, seed, k, seq_len, batch, hidden, real_hidden, device)
    ints, floats = launch.step_parameters(reg, True, device, torch.float32)
    for t in range(seq_len):
        out = torch.zeros(5, batch, hidden, dtype=torch.int8, device=device)
        _unit_masks_kernel[(1,)](launch.seed_tensor(seed, device), ints, floats, out, batch, hidden, t, k, BLOCK_B=16,
                                 BLOCK_H=16, HOISTED=hoisted)
        got = dict(zip(("hidden", "update", "cell", "zoneout_h", "zoneout_c"), out.bool()))
        off = dict(hidden=True, update=True, cell=True, zoneout_h=False, zoneout_c=False)  # what a mask that is off reads
        for name, mask in expected.items():
            if mask is None:
                assert (got[name] == off[name]).all(), f"{name} is off but the kernel's mask is not neutral"
                continue
            if name in ("update", "zoneout_h", "zoneout_c"):
                mask = mask[t if mask.shape[0] > 1 else 0]
            assert torch.equal(got[name][:, : mask.shape[1]], mask), f"{name} at t={t}"


@triton.jit
def _settings_kernel(ints_ptr, floats_ptr, out_ints_ptr, out_floats_ptr, HOISTED: tl.constexpr):
    ints, floats = ints_ptr, floats_ptr
    if HOISTED:
        ints, floats = cell.step_settings(ints_ptr, floats_ptr)
    for slot in tl.static_range(cell.INT_SLOTS):
        tl.store(out_ints_ptr + slot, cell.setting(ints, slot).to(tl.int64))
    for slot in tl.static_range(cell.FLOAT_SLOTS):
        tl.store(out_floats_ptr + slot, cell.setting(floats, slot))


@pytest.mark.parametrize("hoisted", [True, False], ids=["step_settings", "where-used"])
def test_settings_read_every_slot_as_the_launch_parameters_hold_it(hoisted):
    """step_settings' tuples are in slot order, and setting() reads a slot from them or from the tensors alike."""
    device = require_backend("triton", torch.float32)
    reg = Regularizers(recurrent_dropout=0.3, weight_dropout=0.2, update_dropout=0.1, update_dropout_mode="sequence",
                       cell_dropout=0.4, zoneout_h=0.25, zoneout_c=1.0)
    ints, floats = launch.step_parameters(reg, True, device, torch.float32)
    got_ints, got_floats = torch.zeros_like(ints), torch.zeros_like(floats)
    _settings_kernel[(1,)](ints, floats, got_ints, got_floats, HOISTED=hoisted)
    assert torch.equal(got_ints, ints) and torch.equal(got_floats, floats)
    assert len(set(ints.tolist())) > 4 and len(set(floats.tolist())) > 4  # the slots hold distinct values


@triton.jit
def _round_to_tf32_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, cell.round_to_tf32(tl.load(x_ptr + offsets, mask=offsets < N)), mask=offsets < N)


def _nearest_tf32_ties_away(x: torch.Tensor) -> torch.Tensor:
    """The TF32 neighbours below and above |x|, in float64 (a TF32 unit apart: 2^-10 of the binade, 2^-136
    below the normal range), the nearer chosen, a tie away from zero; x's sign put back."""
    bits = x.view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    low = (bits & ~0x1FFF).to(torch.int32).view(torch.float32).double()
    exponent = (bits >> 23).double()
    high = low + torch.where(exponent > 0, 2.0 ** (exponent - 127 - 10), 2.0**-136)
    magnitude = x.abs().double()
    chosen = torch.where(magnitude - low < high - magnitude, low, high)
    return torch.copysign(chosen.float(), x).where(x.isfinite(), x)


def test_tf32_operands_round_to_nearest_ties_away_as_cublas_does():
    """What tile_dot feeds TF32 tensor cores, against TF32 rounding computed another way: random values,
    exact ties, a carry into the exponent, subnormals, signed zeros, the largest float, infinities, NaN."""
    device = require_backend("triton", torch.float32)
    torch.manual_seed(0)
    ties = torch.tensor([0x3F801000, 0x3F803000, 0x3F7FF000, 0x00001000, 0x00000FFF], dtype=torch.int32)
    specials = torch.tensor([0.0, -0.0, 1.0, -1.5, 1e-40, -3e-39, 3.4028235e38, float("inf"), -float("inf")])
    x = torch.cat([torch.randn(200) * 10.0 ** torch.randint(-30, 30, (200,)), ties.view(torch.float32), -ties.view(torch.float32), specials])
    out = torch.empty_like(x, device=device)
    _round_to_tf32_kernel[(1,)](x.to(device), out, x.numel(), BLOCK=512)
    out = out.cpu()
    expected = _nearest_tf32_ties_away(x)
    assert torch.equal(out.view(torch.int32) & 0x1FFF, torch.zeros_like(out.view(torch.int32))), "13 low bits cleared"
    assert torch.equal(out, expected)
    assert out[x.numel() - 3] == float("inf"), "the largest float rounds up past TF32's largest"
    nan = torch.tensor([float("nan")], device=device)
    nan_out = torch.empty_like(nan)
    _round_to_tf32_kernel[(1,)](nan, nan_out, 1, BLOCK=16)
    assert nan_out.isnan().all()


def _compare_with_reference(device, dtype, ratio, *, seq_len, batch, inputs, hidden, proj, layers, bidirectional,
                            packed, training, reg):
    model = fused_rnn.LSTM(inputs, hidden, layers, bidirectional=bidirectional, proj_size=proj, backend="triton",
                           device=device, dtype=dtype, **reg).train(training)
    reference = fused_rnn.LSTM(inputs, hidden, layers, bidirectional=bidirectional, proj_size=proj,
                               backend="reference", device=device, dtype=dtype, **reg).train(training)
    reference.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(0)
    directions = 2 if bidirectional else 1
    make = lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype).to(device)  # noqa: E731
    x, h0, c0 = make(seq_len, batch, inputs), make(layers * directions, batch, proj or hidden), make(layers * directions, batch, hidden)
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=generator) if packed else None
    results = []
    for module in (model, reference):
        leaves = [t.clone().requires_grad_() for t in (x, h0, c0)]
        inp = pack_padded_sequence(leaves[0], lengths, enforce_sorted=False) if packed else leaves[0]
        out, (h_n, c_n) = module(inp, (leaves[1], leaves[2]), seed=1234)
        out = out.data if packed else out
        cotangents = torch.Generator().manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=cotangents, dtype=dtype).to(device)).sum() for t in (out, h_n, c_n))
        loss.backward()
        results.append([out, h_n, c_n] + [t.grad for t in leaves] + [p.grad for p in module.parameters()])
    names = ["output", "h_n", "c_n", "d input", "d h0", "d c0"] + [f"d {n}" for n, _ in model.named_parameters()]
    for name, out, ref in zip(names, *results):
        assert_close(name, ref, out, ratio)


# (seq_len, batch, inputs, hidden, proj, layers, bidirectional, packed, training, regularizers)
AWKWARD = {
    "T1-oddB": (1, 3, 2, 5, 0, 1, False, False, True, EVERY),
    "packed-proj-bi-2layers": (4, 5, 3, 6, 4, 2, True, True, True, EVERY_OTHER_MODES),
    "two-unit-tiles-eval": (3, 2, 3, 70, 0, 1, False, False, False, EVERY),
    "proj-two-tiles": (2, 17, 3, 70, 66, 1, True, True, True, EVERY),
    # one direction: every layer's op drops its own input, the last one the output too
    "packed-proj-2layers-uni": (3, 3, 3, 6, 4, 2, False, True, True, EVERY_OTHER_MODES),
}


@pytest.mark.parametrize("mode", RECURRENCE_MODES)
@pytest.mark.parametrize("case", AWKWARD.values(), ids=AWKWARD.keys())
def test_matches_the_reference_in_float64(case, mode, monkeypatch):
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", mode)
    device = require_backend("triton", torch.float64)
    seq_len, batch, inputs, hidden, proj, layers, bidirectional, packed, training, reg = case
    # float64 differs from the reference only by summation order: errors near 1e-16
    _compare_with_reference(device, torch.float64, 1e-12, seq_len=seq_len, batch=batch, inputs=inputs, hidden=hidden,
                            proj=proj, layers=layers, bidirectional=bidirectional, packed=packed, training=training, reg=reg)


def test_gemm_operands_are_padded_to_whole_16_bytes_on_a_gpu_only(monkeypatch):
    """cuBLAS's tensor-core GEMMs want rows 16 bytes apart: 8 elements in 16-bit, 4 in float32 (TF32), none
    for float64, off a GPU or with FUSED_RNN_GEMM_PADDING=0; the padding is zeros, and an aligned operand is
    used as it is."""
    on_gpu = lambda size: types.SimpleNamespace(is_cuda=True, element_size=lambda: size)  # noqa: E731
    monkeypatch.delenv("FUSED_RNN_GEMM_PADDING", raising=False)
    assert [launch.gemm_row_elements(on_gpu(size)) for size in (2, 4, 8)] == [8, 4, 1]
    monkeypatch.setenv("FUSED_RNN_GEMM_PADDING", "0")
    unaligned = torch.randn(2, 5)
    assert launch.padded_columns(unaligned, 8) is unaligned
    monkeypatch.setenv("FUSED_RNN_GEMM_PADDING", "yes")
    with pytest.raises(ValueError, match="FUSED_RNN_GEMM_PADDING must be one of 1, 0"):
        launch.padded_columns(unaligned, 8)
    monkeypatch.delenv("FUSED_RNN_GEMM_PADDING")
    assert all(launch.gemm_row_elements(torch.empty(2, 3, dtype=dtype)) == 1 for dtype in (torch.float16, torch.float32))
    t = torch.randn(5, 1150)
    padded = launch.padded_columns(t, 8)
    assert padded.shape == (5, 1152) and torch.equal(padded[:, :1150], t) and not padded[:, 1150:].any()
    aligned = torch.randn(5, 16)
    assert launch.padded_columns(aligned, 8) is aligned


@pytest.mark.parametrize("multiple", [1, 4, 8])
def test_padded_products_are_the_products(multiple, monkeypatch):
    """input_projection and aligned_product with their operands padded (as on a GPU, gemm_row_elements) give
    the plain products, contiguous: the zero columns add nothing, and the product's extra ones are dropped."""
    monkeypatch.setattr(launch, "gemm_row_elements", lambda t: multiple)
    generator = torch.Generator().manual_seed(0)
    x, w_ih, bias = (torch.randn(*shape, generator=generator, dtype=torch.float64) for shape in ((3, 2, 5), (12, 5), (12,)))
    xg = launch.input_projection(x, w_ih, bias)
    assert xg.shape == (3, 2, 12) and xg.is_contiguous()
    torch.testing.assert_close(xg, torch.nn.functional.linear(x, w_ih, bias), rtol=1e-14, atol=1e-14)
    dg, b = torch.randn(6, 12, generator=generator, dtype=torch.float64), torch.randn(6, 7, generator=generator,
                                                                                     dtype=torch.float64)
    for a, operand in ((dg.t(), b), (dg, w_ih)):
        product = launch.aligned_product(a, operand)
        assert product.shape == (a.shape[0], operand.shape[1]) and product.is_contiguous()
        torch.testing.assert_close(product, a @ operand, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("mode", ["steps", "persistent"])
def test_matches_the_reference_with_the_gemms_operands_padded(mode, monkeypatch):
    """A training step with every GEMM operand padded as on a GPU (16 bytes: 4 float32 elements; here 5 inputs,
    6 units and 3 projected ones, none a multiple of 4) against the reference; the padding did take place."""
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", mode)
    device = require_backend("triton", torch.float32)
    monkeypatch.setattr(launch, "gemm_row_elements", lambda t: 4)
    padded_widths, pad = [], launch.padded_columns
    monkeypatch.setattr(launch, "padded_columns", lambda t, multiple: padded_widths.append(t.shape[-1]) or pad(t, multiple))
    _compare_with_reference(device, torch.float32, 1e-5, seq_len=4, batch=3, inputs=5, hidden=6, proj=3, layers=2,
                            bidirectional=True, packed=True, training=True, reg=EVERY)
    assert {5, 3, 6} <= set(padded_widths), padded_widths


@pytest.mark.parametrize("mode", RECURRENCE_MODES)
def test_matches_the_reference_in_float32(mode, monkeypatch):
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", mode)
    device = require_backend("triton", torch.float32)
    # float32 with IEEE products: a few ulps per step, 1e-5 of the signal at most over these steps
    _compare_with_reference(device, torch.float32, 1e-5, seq_len=4, batch=3, inputs=3, hidden=6, proj=4, layers=2,
                            bidirectional=True, packed=True, training=True, reg=EVERY)


@pytest.mark.parametrize(
    "mode, tuning",
    [
        ("steps", {"FUSED_RNN_BLOCK_K": "16,256"}),
        ("persistent", {"FUSED_RNN_BLOCK_K": "16,256"}),
        ("persistent", {"FUSED_RNN_BLOCK_K": "32"}),
        ("steps", {"FUSED_RNN_STEP_TILE": "16x16"}),
        ("steps", {"FUSED_RNN_STEP_TILE": ",16x16"}),
    ],
)
def test_matches_the_reference_at_other_tiles(mode, tuning, monkeypatch):
    """FUSED_RNN_BLOCK_K and FUSED_RNN_STEP_TILE (what bench.tune varies): products whose K tiles are
    shallower or deeper than the forward's depth H_out (several masked tiles, or one mostly masked) and
    the backward's 4H; per-step launches of several row and unit tiles."""
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", mode)
    for name, value in tuning.items():
        monkeypatch.setenv(name, value)
    device = require_backend("triton", torch.float64)
    _compare_with_reference(device, torch.float64, 1e-12, seq_len=3, batch=3, inputs=4, hidden=20, proj=18, layers=1,
                            bidirectional=False, packed=False, training=True, reg=EVERY)


@pytest.mark.parametrize("mode", ["persistent", "resident"])
def test_loops_that_load_where_used_match_the_reference(mode, monkeypatch):
    """FUSED_RNN_LOAD_AHEAD=0 (bench.tune's where-used variants): the resident loops and the persistent
    backward load each input and setting where it is used, and compute what they compute by default."""
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", mode)
    monkeypatch.setenv("FUSED_RNN_LOAD_AHEAD", "0")
    device = require_backend("triton", torch.float64)
    _compare_with_reference(device, torch.float64, 1e-12, seq_len=3, batch=3, inputs=4, hidden=4, proj=0, layers=1,
                            bidirectional=True, packed=True, training=True, reg=EVERY)


def test_loading_ahead_is_the_default_and_validated(monkeypatch):
    monkeypatch.delenv("FUSED_RNN_LOAD_AHEAD", raising=False)
    assert launch.loads_ahead() is True
    for value, ahead in (("1", True), ("0", False)):
        monkeypatch.setenv("FUSED_RNN_LOAD_AHEAD", value)
        assert launch.loads_ahead() is ahead
    monkeypatch.setenv("FUSED_RNN_LOAD_AHEAD", "yes")
    with pytest.raises(ValueError, match="FUSED_RNN_LOAD_AHEAD must be one of 1, 0"):
        launch.loads_ahead()


def test_k_tile_depths_follow_the_weights_bytes_and_the_tuning_variable(monkeypatch):
    monkeypatch.delenv("FUSED_RNN_BLOCK_K", raising=False)
    # forward 128 bytes of W~, backward 256 (float32: 128)
    assert [launch.block_depth(True, size) for size in (2, 4, 8)] == [64, 32, 16]
    assert [launch.block_depth(False, size) for size in (2, 4, 8)] == [128, 32, 32]
    monkeypatch.setenv("FUSED_RNN_BLOCK_K", "32,256")
    assert (launch.block_depth(True, 2), launch.block_depth(False, 2)) == (32, 256)
    monkeypatch.setenv("FUSED_RNN_BLOCK_K", "16")
    assert (launch.block_depth(True, 4), launch.block_depth(False, 4)) == (16, 16)
    for bad in ("48", "32,64,128", "deep", "32;64"):
        monkeypatch.setenv("FUSED_RNN_BLOCK_K", bad)
        with pytest.raises(ValueError, match="FUSED_RNN_BLOCK_K must be one depth or two"):
            launch.block_depth(True, 2)


def test_gpu_tiles_follow_the_batch_the_dtype_and_the_tuning_variables(monkeypatch):
    monkeypatch.setattr(launch, "interpreted", lambda: False)
    monkeypatch.delenv("FUSED_RNN_STEP_TILE", raising=False)
    monkeypatch.delenv("FUSED_RNN_BLOCK_K", raising=False)
    # per-step tiles of 512 units, the backward's K tile twice the forward's bytes in 16-bit, as many in float32
    assert [launch.tile_sizes(batch, False, True, 2) for batch in (1, 20, 80)] == [(16, 32, 64), (32, 16, 64), (32, 16, 64)]
    assert launch.tile_sizes(80, False, False, 2) == (32, 16, 128)
    assert launch.tile_sizes(80, False, False, 4) == (32, 16, 32)
    # persistent 16 x 16; the forward of a batch no multiple of 16 at most 32 deep
    assert [launch.tile_sizes(batch, True, True, 2) for batch in (64, 20)] == [(16, 16, 64), (16, 16, 32)]
    assert launch.tile_sizes(20, True, False, 2) == (16, 16, 128)
    monkeypatch.setenv("FUSED_RNN_STEP_TILE", "32x64")
    monkeypatch.setenv("FUSED_RNN_BLOCK_K", "16")
    assert launch.tile_sizes(80, False, True, 2) == (32, 64, 16)
    assert launch.tile_sizes(80, False, False, 2) == (32, 64, 16)
    assert launch.tile_sizes(20, True, True, 2) == (16, 16, 16)
    # the forward's and the backward's apart, an empty side the default
    monkeypatch.setenv("FUSED_RNN_STEP_TILE", ",16x64")
    assert (launch.tile_sizes(80, False, True, 2), launch.tile_sizes(80, False, False, 2)) == ((32, 16, 16), (16, 64, 16))
    monkeypatch.setenv("FUSED_RNN_STEP_TILE", "32x32,")
    assert (launch.tile_sizes(80, False, True, 2), launch.tile_sizes(80, False, False, 2)) == ((32, 32, 16), (32, 16, 16))
    for bad in ("32", "32x48", "8x64", "32x64x2", "ax64", ",", "32x32,16x16,16x16", "32x32;16x16"):
        monkeypatch.setenv("FUSED_RNN_STEP_TILE", bad)
        with pytest.raises(ValueError, match="FUSED_RNN_STEP_TILE must be a tile of two sides"):
            launch.tile_sizes(80, False, True, 2)


def test_resident_warps():
    forward = lambda units: launch.Plan("resident", 1, 16, units, k_main=512, k_rest=256)  # noqa: E731
    backward = lambda rows, main, rest: launch.Plan("resident", 1, rows, 8, k_main=main, k_rest=rest, forward=False)  # noqa: E731
    # forwards: 4 warps below 64 product columns (4 gates a unit)
    assert [launch.resident_warps(forward(units)) for units in (4, 8, 16)] == [4, 4, 8]
    # backwards: 4 warps up to a [16, 3072] left operand (T=1024 B=16 H=768), 8 beyond (spills at 4)
    assert launch.resident_warps(backward(16, 2048, 1024)) == 4
    assert launch.resident_warps(backward(32, 2048, 0)) == 8
    assert launch.resident_warps(backward(16, 4096, 0)) == 8


def _op_arguments(device, proj: bool, lengths: bool):
    generator = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64).to(device).requires_grad_()  # noqa: E731
    seq_len, batch, inputs, hidden, real = 3, 2, 4, 5, 3 if proj else 5
    reg = Regularizers(recurrent_dropout=0.2, weight_dropout=0.3, update_dropout=0.1, cell_dropout=0.1, zoneout_h=0.2, zoneout_c=0.2)
    probabilities, modes = reg.recurrence_arguments()
    return (
        make(seq_len, batch, inputs), make(batch, real), make(batch, hidden), make(4 * hidden, inputs),
        make(4 * hidden, real), make(4 * hidden), make(real, hidden) if proj else None,
        torch.tensor([3, 1], device=device) if lengths else None, seed_tensor(99), 1, True, True, probabilities, modes,
        [0.3, 0.2], lengths,  # the layer's own input and output dropouts, locked with the lengths
    )


@pytest.mark.parametrize("proj, lengths", [(False, False), (True, True)])
def test_custom_ops_pass_opcheck(proj, lengths):
    device = require_backend("triton", torch.float64)
    torch.library.opcheck(ops.lstm_layer, _op_arguments(device, proj, lengths))
    x = torch.randn(3, 2, 7, dtype=torch.float64, device=device, requires_grad=True)
    torch.library.opcheck(ops.feature_dropout, (x, seed_tensor(3), philox.KIND_INPUT, 1, 0.3, False))


@gpu  # the GPU check runs it on CUDA too: a training forward's host path differs there
def test_torch_compile_fullgraph_matches_eager():
    device = require_backend("triton", torch.float64)
    model = fused_rnn.LSTM(4, 5, 2, backend="triton", device=device, dtype=torch.float64, **EVERY)
    x = torch.randn(3, 2, 4, dtype=torch.float64, device=device)

    def loss(x, seed):
        out, (h_n, c_n) = model(x, seed=seed)
        return out.square().sum() + h_n.sum() + c_n.sum()

    eager = loss(x, 42)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(loss, fullgraph=True)(x, 42)
    compiled_grads = torch.autograd.grad(compiled, list(model.parameters()))
    assert_close("loss", eager.detach(), compiled.detach(), 1e-12)
    for eager_grad, compiled_grad in zip(eager_grads, compiled_grads):
        assert_close("gradient", eager_grad, compiled_grad, 1e-12)


def test_torch_compile_draws_the_seed_inside_the_graph():
    """seed=None under torch.compile(fullgraph=True, inductor): the draw is in the graph, reproducible under
    manual_seed, and the one an eager call makes from torch's generator (functional._compiled_draw_seed)."""
    device = require_backend("triton", torch.float32)
    model = fused_rnn.LSTM(4, 5, backend="triton", device=device, zoneout_h=0.2, recurrent_dropout=0.3)
    x = torch.randn(3, 2, 4, device=device)
    compiled = torch.compile(lambda x: model(x)[0].sum(), fullgraph=True)
    torch.manual_seed(0)
    first, second = compiled(x), compiled(x)
    torch.manual_seed(0)
    again = compiled(x)
    torch.manual_seed(0)
    eager = model(x)[0].sum()
    assert torch.equal(first, again), "torch.manual_seed reproduces a compiled run"
    assert not torch.equal(first, second), "each call draws a new seed"
    assert torch.allclose(first, eager, rtol=1e-6, atol=1e-6), "the compiled call draws the eager call's seed"


def test_recurrence_mode_is_validated(monkeypatch):
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", "sideways")
    with pytest.raises(ValueError, match="FUSED_RNN_RECURRENCE"):
        launch.persistent_programs(torch.device("cpu"), 4)


@pytest.fixture
def restored_tf32():
    """cuDNN's and cuBLAS's TF32 switches as they were after the test (which sets them with allow_tf32). Not
    monkeypatch: from pytest 9.2 its undo deletes an attribute that was not in the instance's __dict__, which
    torch.backends.cuda.matmul refuses."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def allow_tf32(allowed: bool) -> None:
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype, ratio", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("proj", [0, 100])
def test_gpu_matches_the_reference(dtype, ratio, proj, restored_tf32):
    """IEEE products (float64, float32 without TF32) on the GPU, which always run one launch per step
    (launch.recurrence_plan); the persistent and resident loops are held to the low-precision rule below."""
    allow_tf32(False)
    # many programs and tiles: B=40 spans row tiles, H=300 unit tiles
    _compare_with_reference(torch.device("cuda"), dtype, ratio, seq_len=20, batch=40, inputs=33, hidden=300, proj=proj,
                            layers=2, bidirectional=True, packed=True, training=True, reg=EVERY)


def _low_precision_run(model, x, h0, c0, seed, *, reference_dtype=None, lengths=None):
    """Outputs and gradients of the module (reference_dtype None) or of the reference math run in reference_dtype;
    with lengths, of packed input, the output padded with zeros."""
    leaves = [t.clone().requires_grad_() for t in (x, h0, c0)]
    weights = [p for p in model.parameters()]
    if reference_dtype is None:
        inp = leaves[0] if lengths is None else pack_padded_sequence(leaves[0], lengths, enforce_sorted=False)
        out, (h_n, c_n) = model(inp, (leaves[1], leaves[2]), seed=seed)
        if lengths is not None:
            out, _ = pad_packed_sequence(out, total_length=x.shape[0])
    else:
        sampled = model.sample_masks(x.shape[0], x.shape[1], seed)
        out, h_n, c_n = lstm_naive(
            leaves[0], leaves[1], leaves[2],
            split_flat_weights([getattr(model, n) for n in model._flat_weights_names], model.num_layers,
                               2 if model.bidirectional else 1, model.bias, model.proj_size > 0),
            num_directions=2 if model.bidirectional else 1, reg=model.regularizers, masks=sampled, training=True,
            lengths=None if lengths is None else lengths.to(x.device), compute_dtype=reference_dtype,
        )
    cotangents = torch.Generator().manual_seed(1)
    loss = sum((t.float() * torch.randn(t.shape, generator=cotangents).to(t.device)).sum() for t in (out, h_n, c_n))
    grads = torch.autograd.grad(loss, leaves + weights)
    return [t.double() for t in (out, h_n, c_n, *grads)]


@gpu
@pytest.mark.parametrize("mode", RECURRENCE_MODES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "tf32"])
def test_low_precision_error_is_at_most_twice_pytorchs(dtype, mode, monkeypatch, restored_tf32):
    """flash-attention's rule: against a float64 reference, the kernels' error is at most twice the
    error of PyTorch computing the same math in the same low precision. Small in the interpreter."""
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", mode)
    _assert_error_at_most_twice_pytorchs(dtype, monkeypatch, gpu_sizes=(64, 128, 30, 24), layers=2, bidirectional=True)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "tf32"])
@pytest.mark.parametrize("batch, hidden", [(80, 300), (24, 1100)])
def test_gpu_resident_forward_error_is_at_most_twice_pytorchs(dtype, batch, hidden, monkeypatch, restored_tf32):
    """The W~-resident forward where it tiles rows and slabs (launch.resident_plan): H=300 is slabs of
    256 + 64 in 75 programs of 4 units; H=1100 (16-bit) 1024 + 128 in programs of 16 units, as the PTB layer."""
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", "resident")
    limits = launch.gpu_limits(torch.device("cuda"))
    plan = launch.resident_plan(limits, 4 if dtype == "tf32" else 2, batch, hidden)
    if plan is None:
        pytest.skip(f"no resident plan for B={batch} H={hidden} in {dtype} on this GPU")
    assert plan.k_rest > 0 and triton.cdiv(batch, plan.block_b) > 1, "several row tiles and a second slab"
    _assert_error_at_most_twice_pytorchs(dtype, monkeypatch, gpu_sizes=(40, hidden, 8, batch), layers=1,
                                         bidirectional=True)


@gpu
@pytest.mark.parametrize("mode", RECURRENCE_MODES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "tf32"])
def test_low_precision_projection_and_packed_input(dtype, mode, monkeypatch, restored_tf32):
    """The same rule with a projection (on a GPU, persistent loops with two barriers a step: the resident
    plan is for layers without one) and packed input of several lengths (rows frozen past their end)."""
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", mode)
    _assert_error_at_most_twice_pytorchs(dtype, monkeypatch, gpu_sizes=(64, 128, 30, 24), layers=2, bidirectional=True,
                                         proj=(48, 4), packed=True)


def _assert_error_at_most_twice_pytorchs(dtype, monkeypatch, *, gpu_sizes, layers, bidirectional, proj=(0, 0),
                                         packed=False):
    """proj: proj_size on a GPU and in the interpreter; packed: input of random lengths, the longest T."""
    tf32 = dtype == "tf32"
    low = torch.float32 if tf32 else getattr(torch, dtype)
    device = require_backend("triton", low)
    if tf32 and device.type != "cuda":
        pytest.skip("TF32 products exist on a GPU only")
    allow_tf32(tf32)
    inputs, hidden, seq_len, batch = gpu_sizes if device.type == "cuda" else (5, 6, 4, 3)
    proj_size = proj[0] if device.type == "cuda" else proj[1]
    states = layers * (2 if bidirectional else 1)
    torch.manual_seed(0)
    lengths = None
    if packed:
        lengths = torch.randint(1, seq_len + 1, (batch,))
        lengths[0] = seq_len
    kwargs = dict(bidirectional=bidirectional, proj_size=proj_size, device=device, **EVERY)
    exact = fused_rnn.LSTM(inputs, hidden, layers, dtype=torch.float64, backend="reference", **kwargs)
    model = fused_rnn.LSTM(inputs, hidden, layers, dtype=low, backend="triton", **kwargs)
    model.load_state_dict(exact.state_dict())
    x = torch.randn(seq_len, batch, inputs, device=device)
    h0 = torch.randn(states, batch, proj_size or hidden, device=device)
    c0 = torch.randn(states, batch, hidden, device=device)
    truth = _low_precision_run(exact, x.double(), h0.double(), c0.double(), 7, lengths=lengths)
    kernel = _low_precision_run(model, x.to(low), h0.to(low), c0.to(low), 7, lengths=lengths)
    pytorch = _low_precision_run(model, x.to(low), h0.to(low), c0.to(low), 7, reference_dtype=low, lengths=lengths)
    for index, (t, k, p) in enumerate(zip(truth, kernel, pytorch)):
        assert error_ratio(t, k) <= 2 * error_ratio(t, p), f"result {index}: kernel {error_ratio(t, k):.3g} vs PyTorch {error_ratio(t, p):.3g}"


def test_barriers_poll_with_loads_only_where_asked_and_compiled(monkeypatch):
    """FUSED_RNN_BARRIER chooses how grid barriers poll: atomic adds of 0 by default, acquire loads (inline
    PTX) with "load" on a GPU; the interpreter has no PTX and keeps the atomic adds."""
    monkeypatch.setattr(launch, "interpreted", lambda: False)
    monkeypatch.delenv("FUSED_RNN_BARRIER", raising=False)
    assert launch.barrier_poll_loads() is False
    for poll, loads in (("atomic", False), ("load", True)):
        monkeypatch.setenv("FUSED_RNN_BARRIER", poll)
        assert launch.barrier_poll_loads() is loads
    monkeypatch.setattr(launch, "interpreted", lambda: True)
    assert launch.barrier_poll_loads() is False
    monkeypatch.setenv("FUSED_RNN_BARRIER", "spin")
    with pytest.raises(ValueError, match="FUSED_RNN_BARRIER must be one of atomic, load"):
        launch.barrier_poll_loads()


@gpu
@needs_gpu
@pytest.mark.parametrize("mode", ["persistent", "resident"])
def test_gpu_barriers_that_poll_with_loads_give_the_same_bits(mode, monkeypatch):
    """FUSED_RNN_BARRIER=load changes how the programs wait at each grid barrier, nothing they compute: the
    outputs and every gradient bit for bit those of the default barrier."""
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", mode)
    runs = []
    for poll in ("atomic", "load"):
        monkeypatch.setenv("FUSED_RNN_BARRIER", poll)
        torch.manual_seed(0)
        model = fused_rnn.LSTM(48, 200, 2, bidirectional=True, device="cuda", dtype=torch.float16, backend="triton",
                               **EVERY)
        x = torch.randn(25, 33, 48, device="cuda", dtype=torch.float16, requires_grad=True)
        out, (h_n, c_n) = model(x, seed=5)
        out.float().square().sum().backward()
        runs.append([out, h_n, c_n, x.grad, *(p.grad for p in model.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@gpu
@needs_gpu
@pytest.mark.parametrize("mode", RECURRENCE_MODES)
def test_gpu_same_seed_is_bitwise_reproducible(mode, monkeypatch):
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", mode)
    model = fused_rnn.LSTM(48, 200, 2, bidirectional=True, device="cuda", backend="triton", **EVERY)
    x = torch.randn(25, 33, 48, device="cuda")
    runs = []
    for _ in range(2):
        out, (h_n, c_n) = model(x, seed=5)
        grads = torch.autograd.grad(out.sum() + h_n.sum() + c_n.sum(), list(model.parameters()))
        runs.append([out, h_n, c_n, *grads])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


H100 = launch.GpuLimits(sms=132, shared_bytes=232448)


@pytest.mark.parametrize("depth, expected", [(6, (16, 0)), (16, (16, 0)), (17, (16, 16)), (512, (512, 0)), (768, (512, 256)),
                                             (1150, (1024, 128)), (1000, (512, 512))])
def test_resident_slabs_cover_the_depth_in_two_powers_of_two(depth, expected):
    assert launch.resident_depths(depth) == expected


@pytest.mark.parametrize(
    "batch, hidden, element_size, expected",
    [
        (16, 768, 2, (96, 16, 8, 512, 256)),  # T=1024 B=16 H=768: 96 programs of 8 units
        (64, 512, 2, (128, 32, 4, 512, 0)),  # 128 programs of 4 units, two row tiles (RESIDENT_BLOCK_B)
        (64, 1024, 2, (128, 32, 8, 1024, 0)),  # product tiles of 32 rows, not 64 (RESIDENT_TILE_BYTES)
        (80, 1150, 2, (72, 16, 16, 1024, 128)),  # the AWD-LSTM layer: 72 programs of 16 units, 5 row tiles
        (80, 1150, 4, None),  # in fp32 its 295 KB of slab a program is more than an SM's shared memory
        (64, 512, 4, (128, 32, 4, 512, 0)),  # fp32 products: tiles of 2 KB (RESIDENT_TILE_BYTES)
        (16, 2200, 2, None),  # more tiles of 16 units than SMs
    ],
)
def test_resident_plan_fits_the_gpu(batch, hidden, element_size, expected):
    _assert_resident_plan(launch.resident_plan(H100, element_size, batch, hidden), element_size, expected)


@pytest.mark.parametrize(
    "batch, hidden, element_size, expected",
    [
        (16, 768, 2, (96, 16, 8, 2048, 1024)),  # T=1024 B=16 H=768: a [3072, 8] slab of W~'s columns a program
        (64, 512, 2, (128, 32, 4, 2048, 0)),  # two row tiles of 32
        (80, 1150, 2, None),  # the AWD-LSTM layer: 4600 deep, 272 KB of slab and operand a program
        (16, 768, 4, None),  # fp32: 3072 deep in 4 bytes is more than an SM's shared memory
    ],
)
def test_resident_backward_plan_fits_the_gpu(batch, hidden, element_size, expected):
    """The backward's product is dgates[t_next] [BB, 4H] @ W~[:, units] [4H, BH]: slabs 4H deep."""
    plan = launch.resident_plan(H100, element_size, batch, hidden, forward=False)
    _assert_resident_plan(plan, element_size, expected)
    assert plan is None or not plan.forward


@pytest.mark.parametrize(
    "batch, hidden, element_size, forward, expected",
    [
        # T=100 B=64 H=512: 128 programs of 16 units, each one row tile of 16 (a persistent launch's tiles)
        (64, 512, 2, True, (128, 16, 16, 512, 0)),
        (64, 512, 2, False, (128, 16, 16, 2048, 0)),
        (64, 512, 4, True, (128, 32, 4, 512, 0)),  # fp32: split tiles over 2 KB (RESIDENT_TILE_BYTES); not split
        (64, 1024, 2, True, (128, 32, 8, 1024, 0)),  # no split fits 132 SMs: a program per unit tile
        (16, 768, 2, True, (96, 16, 8, 512, 256)),  # one row tile: nothing to split
    ],
)
def test_a_resident_plan_that_splits_rows_gives_each_program_one_row_tile(batch, hidden, element_size, forward,
                                                                         expected):
    plan = launch.resident_plan(H100, element_size, batch, hidden, forward=forward, split_rows=True)
    _assert_resident_plan(plan, element_size, expected)
    assert plan.programs == triton.cdiv(hidden, plan.block_h) * plan.row_programs
    assert plan.row_programs in (1, triton.cdiv(batch, plan.block_b)), "no program walks row tiles where split"


def test_resident_kernels_split_row_tiles_among_programs_and_walk_them(monkeypatch):
    """Under the interpreter a resident plan of more than 16 rows has two programs per unit tile: with 40 rows
    (3 tiles of 16), one program takes tiles 0 and 2, the other tile 1; against the reference, packed rows
    of several lengths, every regularizer."""
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", "resident")
    device = require_backend("triton", torch.float64)
    for forward in (True, False):
        plan = launch.recurrence_plan(device, "ieee", 8, 40, 8, 8, forward=forward)
        assert (plan.kind, plan.row_programs, plan.programs, plan.block_b) == ("resident", 2, 4, 16)
    _compare_with_reference(device, torch.float64, 1e-12, seq_len=3, batch=40, inputs=3, hidden=8, proj=0, layers=1,
                            bidirectional=False, packed=True, training=True, reg=EVERY)


def _assert_resident_plan(plan, element_size, expected):
    if expected is None:
        assert plan is None
        return
    assert (plan.programs, plan.block_b, plan.block_h, plan.k_main, plan.k_rest) == expected
    assert plan.programs <= H100.sms, "a grid barrier needs every program on an SM of its own"
    assert launch.resident_shared_bytes(plan, element_size) <= H100.shared_bytes, "slabs and operand fit in shared memory"


def test_resident_plan_is_for_layers_without_projection(monkeypatch):
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", "resident")
    monkeypatch.setattr(launch, "interpreted", lambda: True)
    cpu = torch.device("cpu")
    assert launch.recurrence_plan(cpu, "ieee", 8, 3, 6, 6).kind == "resident"
    backward = launch.recurrence_plan(cpu, "ieee", 8, 3, 6, 6, forward=False)
    assert backward.kind == "resident" and not backward.forward and backward.k_main + backward.k_rest >= 24
    assert launch.recurrence_plan(cpu, "ieee", 8, 3, 6, 4).kind == "persistent"
    assert launch.recurrence_plan(cpu, "ieee", 8, 3, 6, 4, forward=False).kind == "persistent"
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", "auto")
    assert launch.recurrence_plan(cpu, "ieee", 8, 3, 6, 6).kind == "steps", "the interpreter steps unless asked"


@pytest.mark.parametrize(
    "batch, hidden, precision, element_size, forward, expected",
    [
        (16, 768, "default", 2, True, "resident"),  # one row tile: resident 5.8 us a step, persistent 12.8
        (16, 768, "default", 2, False, "resident"),
        (16, 768, "tf32", 4, False, "persistent"),  # no TF32 resident backward
        (64, 512, "default", 2, True, "resident"),  # row tiles split: 6.4 against 12.3 (28e61d7)
        (64, 512, "default", 2, False, "persistent"),  # 20 against 36
        (64, 512, "tf32", 4, True, "resident"),  # two row tiles walked: 15.8 against 28.7 (af9aabe)
        (64, 512, "tf32", 4, False, "persistent"),
        (80, 1150, "default", 2, True, "resident"),  # 360 persistent tiles on 132 SMs
        (80, 1150, "default", 2, False, "steps"),  # no resident plan fits; persistent 146-158, steps 70-73
        (80, 1150, "tf32", 4, True, "steps"),
    ],
)
def test_auto_runs_the_loop_the_h100_timed_fastest(batch, hidden, precision, element_size, forward, expected,
                                                     monkeypatch):
    """auto's choice at the benchmark layers on an H100 (132 SMs), against bench.tune's tables at 9ab8d3d,
    28e61d7 and af9aabe (bench/results): resident unless its programs walk several row tiles where a persistent
    launch has a tile a program, in 16-bit (a forward's row tiles are then split among programs where they fit);
    persistent only with a tile a program; else a launch per step."""
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", "auto")
    monkeypatch.setattr(launch, "interpreted", lambda: False)
    monkeypatch.setattr(launch, "gpu_limits", lambda device: H100)
    plan = launch.recurrence_plan(torch.device("cuda"), precision, element_size, batch, hidden, hidden, forward=forward)
    assert plan.kind == expected
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", plan.kind)
    assert launch.recurrence_plan(torch.device("cuda"), precision, element_size, batch, hidden, hidden,
                                  forward=forward).kind == expected, "a mode named runs that loop where it can"


def test_auto_splits_the_row_tiles_of_a_resident_forward_that_would_walk_them(monkeypatch):
    """B=64 H=512 on an H100: the forward's four row tiles of 16 each get programs of their own (128 in all,
    32 unit tiles of 16); the backward's split, which was no faster, is left to FUSED_RNN_RECURRENCE=resident."""
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", "auto")
    monkeypatch.setattr(launch, "interpreted", lambda: False)
    monkeypatch.setattr(launch, "gpu_limits", lambda device: H100)
    plan = launch.recurrence_plan(torch.device("cuda"), "default", 2, 64, 512, 512)
    assert plan == launch.Plan("resident", 128, 16, 16, k_main=512, k_rest=0, row_programs=4)
    assert launch.recurrence_plan(torch.device("cuda"), "default", 2, 32, 512, 512).row_programs == 1, (
        "rows a program holds at once are not split"
    )


def test_a_plan_is_chosen_once_for_what_it_depends_on(monkeypatch):
    """recurrence_plan keeps its plans; a tuning variable, a refusal or another GPU's limits choose again."""
    monkeypatch.setattr(launch, "_plans", collections.OrderedDict())
    monkeypatch.setattr(launch, "interpreted", lambda: False)
    monkeypatch.setattr(launch, "gpu_limits", lambda device: H100)
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", "auto")
    cuda = torch.device("cuda")
    chosen, choose = [], launch.choose_plan
    monkeypatch.setattr(launch, "choose_plan", lambda *args: chosen.append(args) or choose(*args))
    first = launch.recurrence_plan(cuda, "default", 2, 16, 768, 768)
    assert launch.recurrence_plan(cuda, "default", 2, 16, 768, 768) is first and len(chosen) == 1
    monkeypatch.setenv("FUSED_RNN_BLOCK_K", "32")
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", "persistent")
    assert launch.recurrence_plan(cuda, "default", 2, 16, 768, 768) == launch.Plan("persistent", 48, 16, 16, 32)
    monkeypatch.setattr(launch, "_persistent_refused", ["refused"])
    assert launch.recurrence_plan(cuda, "default", 2, 16, 768, 768).kind == "steps"
    monkeypatch.setattr(launch, "gpu_limits", lambda device: launch.GpuLimits(16, H100.shared_bytes))
    monkeypatch.delenv("FUSED_RNN_BLOCK_K")
    monkeypatch.setattr(launch, "_persistent_refused", [])
    assert launch.recurrence_plan(cuda, "default", 2, 16, 768, 768) == launch.Plan("persistent", 16, 16, 16, 64)
    assert len(chosen) == 4


@pytest.mark.parametrize("hidden, launches", [(4, 1), (6, 5)])
def test_resident_mode_runs_the_resident_kernels(hidden, launches, monkeypatch):
    """Under the interpreter: one synchronized launch where one program owns every unit, else a launch a step
    (seq_len + 1 calls backward: the last completes dL/dh0)."""
    device = require_backend("triton", torch.float64)
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", "resident")
    runs = {"forward": [], "backward": []}
    for name in runs:
        kernel = getattr(launch, f"{name}_resident_kernel")
        on_each_launch(monkeypatch, kernel, lambda args, kwargs, _runs=runs[name]: _runs.append(kwargs["grid"]))
    _compare_with_reference(device, torch.float64, 1e-12, seq_len=5, batch=3, inputs=3, hidden=hidden, proj=0, layers=1,
                            bidirectional=False, packed=False, training=True, reg=EVERY)
    assert len(runs["forward"]) == launches and len(runs["backward"]) == (1 if launches == 1 else 6)
    assert all(grid == (triton.cdiv(hidden, 4),) for grid in runs["forward"] + runs["backward"])


@pytest.mark.parametrize("rows", [False, True])
def test_resident_kernels_drop_w_hh_as_they_load_it(rows, monkeypatch):
    """With weight drop and slabs small enough (launch.weight_drop_loaded), the resident forward and backward
    load W_hh and drop it as they load: the step's one dropped_weight is dL/dW_hh's, and the results are the
    reference's."""
    device = require_backend("triton", torch.float64)
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", "resident")
    made = []
    real = launch.dropped_weight
    monkeypatch.setattr(launch, "dropped_weight", lambda seed, w, *rest: made.append(w) or real(seed, w, *rest))
    drops = []
    for name in ("forward", "backward"):
        kernel = getattr(launch, f"{name}_resident_kernel")
        on_each_launch(monkeypatch, kernel, lambda args, kwargs: drops.append(kwargs["WEIGHT_DROP"]))
    _compare_with_reference(device, torch.float64, 1e-12, seq_len=4, batch=3, inputs=3, hidden=4, proj=0, layers=1,
                            bidirectional=False, packed=False, training=True, reg=EVERY_OTHER_MODES if rows else EVERY)
    assert drops == [int(kernels.WEIGHT_ROWS if rows else kernels.WEIGHT_ELEMENTS)] * 2
    assert len(made) == 1 and not made[0].requires_grad, "only dL/dW_hh goes through dropped_weight"


def test_weight_drop_is_loaded_into_small_slabs_only(monkeypatch):
    """Slabs of at most RESIDENT_DROP_ELEMENTS a thread (T=50 B=8 H=256, 16-bit) are dropped as they load; larger
    ones (PTB) load a W~ made before, their draws would spill registers; no weight drop, none; nor any with
    FUSED_RNN_WEIGHT_DROP_LOADED=0 (bench.tune's "resident stored W~")."""
    element, row = launch.Recurrence(weight=True, weight_rows=False), launch.Recurrence(weight=True, weight_rows=True)
    for forward in (True, False):
        small = launch.resident_plan(H100, 2, 8, 256, forward=forward)
        assert launch.weight_drop_loaded(element, small) == int(kernels.WEIGHT_ELEMENTS)
        assert launch.weight_drop_loaded(row, small) == int(kernels.WEIGHT_ROWS)
        assert launch.weight_drop_loaded(launch.Recurrence(weight=False, weight_rows=False), small) == 0
    large = launch.resident_plan(H100, 2, 80, 1150)
    assert large is not None and launch.weight_drop_loaded(element, large) == int(kernels.WEIGHT_KEPT)
    monkeypatch.setenv("FUSED_RNN_WEIGHT_DROP_LOADED", "0")
    assert launch.weight_drop_loaded(element, small) == int(kernels.WEIGHT_KEPT)


@pytest.mark.parametrize("mode, proj", [("persistent", 2), ("resident", 0)])
def test_barrier_launches_share_one_counter_and_leave_it_at_zero(mode, proj, monkeypatch):
    """Every barrier launch on a stream reads the same kept counter (no fill of its own), and the last program
    out sets it back to 0 (kernels.barriers_done): a count left over would let the next launch's programs pass
    its barriers early. The resident backward, which leaves its counter as it is, gets a new one."""
    device = require_backend("triton", torch.float64)
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", mode)
    monkeypatch.setattr(launch, "_persistent_refused", [])
    monkeypatch.setattr(launch, "_resident_refused", [])
    counters = {"forward": [], "backward": []}
    for name in counters:
        kernel = getattr(launch, f"{name}_{mode}_kernel")
        index = kernel.arg_names.index("arrivals_ptr")
        on_each_launch(monkeypatch, kernel, lambda args, kwargs, _index=index, _seen=counters[name]:
                       _seen.append(args[_index]))
    _compare_with_reference(device, torch.float64, 1e-12, seq_len=3, batch=2, inputs=3, hidden=4, proj=proj, layers=2,
                            bidirectional=True, packed=False, training=True, reg=EVERY)
    kept = launch.arrival_counter(device)
    shared = counters["forward"] + (counters["backward"] if mode == "persistent" else [])
    assert len(counters["forward"]) == len(counters["backward"]) == 4, "a launch for each of 2 layers and 2 directions"
    assert all(counter is kept for counter in shared)
    assert kept.tolist() == [0, 0]
    if mode == "resident":
        assert all(counter is not kept for counter in counters["backward"])


class FailingLaunch:
    """Stands in for a kernel: every launch raises RuntimeError(message), as Triton's launcher reports CUDA errors."""

    def __init__(self, message: str):
        self.message = message

    def __getitem__(self, grid):
        def launch_error(*args, **kwargs):
            raise RuntimeError(self.message)

        return launch_error


def test_a_refused_persistent_launch_falls_back_to_steps(monkeypatch):
    device = require_backend("triton", torch.float64)
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", "persistent")
    monkeypatch.setattr(launch, "_persistent_refused", [])

    refused = FailingLaunch("too many blocks in cooperative launch")
    monkeypatch.setattr(launch, "forward_persistent_kernel", refused)
    monkeypatch.setattr(launch, "backward_persistent_kernel", refused)
    with pytest.warns(UserWarning, match="persistent Triton launch failed"):
        _compare_with_reference(device, torch.float64, 1e-12, seq_len=3, batch=2, inputs=3, hidden=5, proj=0, layers=1,
                                bidirectional=True, packed=False, training=True, reg=EVERY)
    assert launch.persistent_programs(device, 4) == 0, "after a refusal, later calls step"


def test_a_resident_launch_short_of_shared_memory_falls_back_to_persistent(monkeypatch):
    device = require_backend("triton", torch.float64)
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", "resident")
    monkeypatch.setattr(launch, "_resident_refused", [])
    monkeypatch.setattr(launch, "_persistent_refused", [])

    class ShortOfSharedMemory:
        def __getitem__(self, grid):
            def launch_error(*args, **kwargs):
                raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")

            return launch_error

    monkeypatch.setattr(launch, "_run_resident", lambda kernel, plan, x, seq_len, steps, buffers, *rest, **options: (
        launch._launch_persistent(ShortOfSharedMemory(), plan, x, *buffers)))
    with pytest.warns(UserWarning, match="resident Triton launch failed"):
        _compare_with_reference(device, torch.float64, 1e-12, seq_len=3, batch=2, inputs=3, hidden=4, proj=0, layers=1,
                                bidirectional=True, packed=False, training=True, reg=EVERY)
    assert launch.recurrence_plan(device, "ieee", 8, 2, 4, 4).kind == "persistent", "after a refusal, persistent"
    assert not launch._persistent_refused


def test_a_launch_error_that_is_not_a_refusal_propagates(monkeypatch):
    """Only the driver refusing a cooperative grid falls back; another error (say, an earlier kernel's fault
    surfacing at this launch) reaches the caller, and later calls keep trying persistent launches."""
    device = require_backend("triton", torch.float64)
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", "persistent")
    monkeypatch.setattr(launch, "_persistent_refused", [])

    faulty = FailingLaunch("Triton Error [CUDA]: an illegal memory access was encountered")
    monkeypatch.setattr(launch, "forward_persistent_kernel", faulty)
    model = fused_rnn.LSTM(3, 5, backend="triton", dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        model(torch.randn(2, 2, 3, dtype=torch.float64, device=device))
    assert launch.persistent_programs(device, 4) > 0, "a fault is not a refusal: persistent launches continue"


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_run_on_the_inputs_gpu_not_the_current_one():
    """Triton launches on the current device: the launchers make the input's device current."""
    model = fused_rnn.LSTM(3, 5, proj_size=2, backend="triton", device="cuda:1", dtype=torch.float64, **EVERY)
    x = torch.randn(4, 2, 3, device="cuda:1", dtype=torch.float64, requires_grad=True)
    with torch.cuda.device(0):
        out, _ = model(x, seed=3)
        out.sum().backward()
    reference = fused_rnn.LSTM(3, 5, proj_size=2, backend="reference", dtype=torch.float64, **EVERY)
    reference.load_state_dict(model.state_dict())
    x_cpu = x.detach().cpu().requires_grad_()
    expected, _ = reference(x_cpu, seed=3)
    expected.sum().backward()
    assert_close("out", expected, out.cpu(), 1e-12)
    assert_close("dx", x_cpu.grad, x.grad.cpu(), 1e-12)


@pytest.mark.parametrize("mode", RECURRENCE_MODES)
def test_backward_twice_with_retain_graph_gives_the_same_gradients(mode, monkeypatch):
    """The backward overwrites the saved gate activations with their gradients (as cuDNN's does its reserve)
    unless the graph is kept: a second backward of a retained graph sees the activations intact."""
    device = require_backend("triton", torch.float64)
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", mode)
    model = fused_rnn.LSTM(3, 5, num_layers=2, proj_size=2, backend="triton", dtype=torch.float64, device=device, **EVERY)
    x = torch.randn(3, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    out, (h_n, c_n) = model(x, seed=11)
    loss = (out * torch.randn_like(out)).sum() + h_n.square().sum() + c_n.sum()
    first = torch.autograd.grad(loss, [x, *model.parameters()], retain_graph=True)
    second = torch.autograd.grad(loss, [x, *model.parameters()])
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_a_freed_graphs_backward_overwrites_the_reserve_in_place(monkeypatch):
    """Without retain_graph the gradients take the place of the saved activations: the copying op is not used."""
    device = require_backend("triton", torch.float64)

    def copying(*args, **kwargs):
        raise AssertionError("the backward copied the reserve of a graph it frees")

    model = fused_rnn.LSTM(3, 5, backend="triton", dtype=torch.float64, device=device, **EVERY)
    out, _ = model(torch.randn(3, 2, 3, dtype=torch.float64, device=device), seed=4)
    monkeypatch.setattr(ops, "lstm_layer_backward", copying)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_reserve_is_kept_in_the_layers_dtype(dtype):
    """What a layer keeps for its backward (gate activations, every dropped h state, every c state) is in the
    input's dtype, as cuDNN keeps its reserve: half the bytes of the float32 recurrence in fp16/bf16."""
    device = require_backend("triton", dtype)
    seq_len, batch, inputs, hidden = 4, 3, 5, 6
    model = fused_rnn.LSTM(inputs, hidden, backend="triton", dtype=dtype, device=device, **EVERY)
    weights = [getattr(model, name) for name in model._flat_weights_names]
    x = torch.randn(seq_len, batch, inputs, dtype=dtype, device=device)
    h0 = torch.zeros(batch, hidden, dtype=dtype, device=device)
    probabilities, modes = model.regularizers.recurrence_arguments()
    out, h_n, c_n, xg, rs, cs, hpre = ops.lstm_layer(
        x, h0, h0, weights[0], weights[1], weights[2] + weights[3], None, None, seed_tensor(3), 0, False, True,
        probabilities, modes, [0.2, 0.2], False,
    )
    reserve = {"xg": (xg, (seq_len, batch, 4 * hidden)), "rs": (rs, (seq_len + 1, batch, hidden)),
               "cs": (cs, (seq_len + 1, batch, hidden))}
    for name, (tensor, shape) in reserve.items():
        assert tensor.dtype == dtype and tuple(tensor.shape) == shape, f"{name}: {tensor.dtype} {tuple(tensor.shape)}"
    assert hpre.numel() == 0
    assert out.dtype == h_n.dtype == c_n.dtype == dtype


def test_a_backward_fills_no_zero_gradients_for_the_reserve():
    """The op's reserve outputs (xg, rs, cs) get no gradient: autograd would otherwise fill buffers of zeros the
    size of the reserve at every layer's backward, most of the peak memory of a training step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    device = require_backend("triton", torch.float32)
    seq_len, batch, hidden = 4, 3, 6
    model = fused_rnn.LSTM(5, hidden, 2, backend="triton", device=device, **EVERY)
    out, _ = model(torch.randn(seq_len, batch, 5, device=device), seed=2)
    zeros = {torch.ops.aten.zeros.default, torch.ops.aten.zeros_like.default, torch.ops.aten.new_zeros.default}

    class ZeroFills(TorchDispatchMode):
        shapes: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if func in zeros:
                self.shapes.append(tuple(result.shape))
            return result

    with ZeroFills() as fills:
        out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    big = [shape for shape in fills.shapes if len(shape) == 3 and shape[0] >= seq_len]
    assert not big, f"the backward filled zeros of shapes {big}"


def test_a_persistent_backward_whose_final_states_went_unused_fills_nothing(monkeypatch):
    """dL/dh and dL/dc of an unused final state, the bias partials and the barrier counter are not filled with
    zeros before a persistent backward (the launch zeroes them: kernels.zero_fresh_tiles;
    launch.arrival_counter): on a GPU each fill is a launch the recurrence waits behind. (The resident and
    per-step loops fill them.) Counted by wrapping torch's fills, not by a dispatch mode, under which the
    backward takes the path of a kept graph."""
    device = require_backend("triton", torch.float64)
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", "persistent")
    model = fused_rnn.LSTM(3, 4, 1, backend="triton", device=device, dtype=torch.float64, **EVERY)
    x = torch.randn(3, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    out, _ = model(x, seed=2)
    seen = []
    # (not fill_: the suite's nan_filled_empty fills every torch.empty with it)
    for owner, name in ((torch, "zeros"), (torch, "zeros_like"), (torch.Tensor, "new_zeros"), (torch.Tensor, "zero_")):
        monkeypatch.setattr(owner, name, lambda *args, _fill=getattr(owner, name), _name=name, **kwargs: (
            seen.append(_name), _fill(*args, **kwargs))[1])
    out.sum().backward()
    monkeypatch.undo()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert not seen, f"the backward filled: {seen}"


def test_a_half_precision_training_step_allocates_about_half_of_a_float32_one():
    """Counted without running kernels (bench/allocations.py): the reserve, the gate gradients and the output
    are in the layer's dtype, so a fp16 step allocates half of what a float32 one does, but for [2, B, H]
    carries and per-row-tile bias sums (0.52x here); with the float32 reserve of commit 2426a22 it was 0.94x."""
    from bench.allocations import training_step_peak

    peaks = {}
    for dtype in (torch.float16, torch.float32):
        torch.manual_seed(0)
        model = fused_rnn.LSTM(5, 8, 2, backend="triton", dtype=dtype, **EVERY)
        peaks[dtype] = training_step_peak(model, torch.randn(6, 4, 5, dtype=dtype, requires_grad=True)).peak
    assert peaks[torch.float16] <= 0.55 * peaks[torch.float32], peaks


def test_the_tuning_script_times_every_loop_kind(capsys):
    """bench/tune.py, which the GPU check runs, on its tiny CPU shape: a row per loop kind and warp count,
    each with the plan that ran and a positive forward and backward time."""
    if not backends.triton_interpreted():
        pytest.skip("bench.tune tests itself on CPU only under Triton's interpreter")
    from bench import tune

    assert tune.main(["--reps", "1", "--device", "cpu", "--variants", "all"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny")]
    cells = {row[1].strip(): [cell.strip() for cell in row] for row in rows}
    assert set(cells) == {"barrier", *(name for name, *_ in tune.VARIANTS)}, cells
    for name, mode, *_ in tune.VARIANTS:
        plan = cells[name][2]
        forward_ms, forward_host_ms, backward_ms, backward_host_ms = (float(cells[name][i]) for i in (3, 5, 6, 8))
        assert plan.startswith(mode) and f"/ {mode}" in plan, cells[name]
        assert forward_ms > 0 and backward_ms > 0, cells[name]
        assert 0 < forward_host_ms <= forward_ms and 0 < backward_host_ms <= backward_ms, "the host's share of each"
    # as bench/profile.sh runs it: one variant, no reference rows
    assert tune.main(["--reps", "1", "--device", "cpu", "--variants", "resident w4", "--no-reference"]) == 0
    rows = [line.split("|")[2].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny")]
    assert rows == ["resident w4"]
    # by default, the variants without a tuning variable
    assert tune.main(["--reps", "1", "--device", "cpu", "--no-reference"]) == 0
    rows = [line.split("|")[2].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny")]
    assert rows == [name for name, _, _, environment in tune.VARIANTS if not environment]


def test_batched_gradients_match_the_reference():
    """functorch's batched gradients (is_grads_batched, vectorized jacobians) never reach the overwriting path."""
    device = require_backend("triton", torch.float64)
    models = {name: fused_rnn.LSTM(3, 4, backend=name, dtype=torch.float64, **EVERY) for name in ("reference", "triton")}
    models["triton"].load_state_dict(models["reference"].state_dict())
    models["triton"].to(device)
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    cotangents = torch.randn(2, 3, 2, 4, dtype=torch.float64)
    grads = {}
    for name, model in models.items():
        out, _ = model(x.to(next(model.parameters()).device), seed=3)
        grads[name] = torch.autograd.grad(out, list(model.parameters()), cotangents.to(out.device), is_grads_batched=True)
    for name, expected, got in zip(dict(models["reference"].named_parameters()), grads["reference"], grads["triton"]):
        assert_close(name, expected, got.cpu(), 1e-12)


def test_a_backward_repeated_after_it_overwrote_the_reserve_raises(monkeypatch):
    """A backward that fails after writing over the saved activations (say, out of memory in the weight GEMMs)
    leaves the graph; running it again raises instead of reading gradients as activations."""
    device = require_backend("triton", torch.float64)
    # nothing between the loss and the layer saves tensors, so the retry reaches the layer's own backward
    model = fused_rnn.LSTM(3, 4, backend="triton", dtype=torch.float64, device=device, recurrent_dropout=0.3, zoneout_c=0.2)
    out, (_, c_n) = model(torch.randn(3, 2, 3, dtype=torch.float64, device=device), seed=3)
    loss = out.sum() + c_n.sum()
    real = launch.layer_backward

    def out_of_memory_after_the_recurrence(*args, **kwargs):
        real(*args, **kwargs)
        raise torch.OutOfMemoryError("simulated: out of memory in the weight GEMMs")

    monkeypatch.setattr(launch, "layer_backward", out_of_memory_after_the_recurrence)
    with pytest.raises(torch.OutOfMemoryError):
        loss.backward()
    monkeypatch.setattr(launch, "layer_backward", real)
    with pytest.raises(RuntimeError, match="already ran once"):
        loss.backward()


def test_a_second_backward_through_a_freed_graph_raises_autograds_error():
    """As nn.LSTM's: the saved activations were freed (and written over) by the first backward."""
    device = require_backend("triton", torch.float64)
    model = fused_rnn.LSTM(3, 4, backend="triton", dtype=torch.float64, device=device, zoneout_c=0.2)
    out, _ = model(torch.randn(3, 2, 3, dtype=torch.float64, device=device), seed=3)
    loss = out.sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


@pytest.mark.parametrize(
    "message, refused",
    [
        ("Triton Error [CUDA]: too many blocks in cooperative launch", True),
        ("Triton Error [CUDA]: operation not supported", True),
        ("Triton Error [CUDA]: operation not supported on global/shared address space", False),
        ("Triton Error [CUDA]: an illegal memory access was encountered", False),
    ],
)
def test_only_the_drivers_refusals_count_as_refused(message, refused):
    assert launch.refused_launch(RuntimeError(message)) is refused


class FakeJit:
    """A JIT kernel's interface as RepeatedLaunch uses it: [grid](*args, **constexprs) launches and
    returns the compiled kernel (None, as the interpreter does, when compiled is None)."""

    arg_names = ["x_ptr", "t", "BLOCK_B", "PRECISION"]

    def __init__(self, compiled):
        self.compiled, self.launches = compiled, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
            return self.compiled

        return launch


class FakeCompiled:
    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args: self.launches.append((grid, args))


def test_repeated_launches_go_to_the_compiled_kernel_with_the_jits_arguments():
    compiled = FakeCompiled()
    jit = FakeJit(compiled)
    step = launch.RepeatedLaunch(jit, (3, 2), PRECISION="tf32", BLOCK_B=16)
    for t in range(3):
        step("x", t)
    assert jit.launches == [((3, 2), ("x", 0), dict(PRECISION="tf32", BLOCK_B=16))]
    # the constexprs follow in the kernel's parameter order, as the JIT passes them to the launcher
    # on the grid padded to three dimensions, which the compiled kernel's launcher indexes
    assert compiled.launches == [((3, 2, 1), ("x", 1, 16, "tf32")), ((3, 2, 1), ("x", 2, 16, "tf32"))]


class FakeCompiledKernel(FakeCompiled):
    """Also what RepeatedLaunch calls without the runner: the launcher, the function handle and the packed
    metadata of a Triton 3.6 or 3.9 CompiledKernel."""

    function, packed_metadata = 0xF00, ("metadata",)

    def __init__(self):
        super().__init__()
        self.direct = []

    def run(self, *args):
        self.direct.append(args)


def test_repeated_launches_call_the_launcher_itself_unless_a_launch_hook_is_set(monkeypatch):
    """Without launch hooks the later launches call the compiled kernel's launcher with what Triton's runner
    passes it, less the hooks and their metadata; with a hook set (a profiler), they go through the runner."""
    monkeypatch.setattr(launch, "current_raw_stream", lambda: 77)
    compiled = FakeCompiledKernel()
    step = launch.RepeatedLaunch(FakeJit(compiled), (3, 2), PRECISION="tf32", BLOCK_B=16)
    for t in range(3):
        step("x", t)
    assert launch.launch_hooks_unset() and compiled.launches == []
    assert compiled.direct == [(3, 2, 1, 77, 0xF00, ("metadata",), None, None, None, "x", t, 16, "tf32") for t in (1, 2)]
    hooks = triton.knobs.runtime.launch_enter_hook

    def hook(metadata):
        pass

    hooks.add(hook)
    try:
        assert not launch.launch_hooks_unset()
        step("x", 3)
    finally:
        hooks.remove(hook)
    assert compiled.launches == [((3, 2, 1), ("x", 3, 16, "tf32"))] and len(compiled.direct) == 2


def test_repeated_launches_go_through_the_jit_when_it_returns_no_compiled_kernel():
    jit = FakeJit(None)
    step = launch.RepeatedLaunch(jit, (1,), PRECISION="ieee", BLOCK_B=16)
    for t in range(3):
        step("x", t)
    assert [args for _, args, _ in jit.launches] == [("x", 0), ("x", 1), ("x", 2)]


def test_specialised_launches_reuse_a_compiled_kernel_for_the_same_specialisation_only(monkeypatch):
    """launch_specialised: a second launch whose arguments Triton would specialise the same way goes to the
    kernel compiled for the first; another dtype, a pointer off 16-byte alignment, another integer (or a
    bool for an int), other constexprs or another grid go through the JIT."""
    monkeypatch.setattr(launch, "_specialised_launches", collections.OrderedDict())
    compiled = FakeCompiled()
    jit = FakeJit(compiled)
    x, y = torch.zeros(8), torch.zeros(8)
    calls = [
        ((2,), (x, 5), dict(BLOCK_B=16, PRECISION="ieee")),
        ((2,), (y, 5), dict(BLOCK_B=16, PRECISION="ieee")),
        ((2,), (x[1:], 5), dict(BLOCK_B=16, PRECISION="ieee")),
        ((2,), (x.double(), 5), dict(BLOCK_B=16, PRECISION="ieee")),
        ((2,), (x, 6), dict(BLOCK_B=16, PRECISION="ieee")),
        ((2,), (x, True), dict(BLOCK_B=16, PRECISION="ieee")),
        ((2,), (x, 5), dict(BLOCK_B=32, PRECISION="ieee")),
        ((3,), (x, 5), dict(BLOCK_B=16, PRECISION="ieee")),
        ((2,), (y, 5), dict(BLOCK_B=16, PRECISION="ieee")),
    ]
    for grid, args, constexprs in calls:
        launch.launch_specialised(jit, grid, *args, **constexprs)
    assert [(grid, args) for grid, args, _ in jit.launches] == [(grid, args) for grid, args, _ in calls[:1] + calls[2:8]]
    assert compiled.launches == [((2, 1, 1), (y, 5, 16, "ieee"))] * 2


def test_specialised_launches_compile_their_launch_options_and_keep_them_apart(monkeypatch):
    """A persistent launch's options (warps, a cooperative grid) go to the JIT's first launch, which compiles
    them into the kernel and its launcher, and not to the compiled launcher after it; launches with other
    options are other specialisations."""
    monkeypatch.setattr(launch, "_specialised_launches", collections.OrderedDict())
    compiled = FakeCompiled()
    jit = FakeJit(compiled)
    x = torch.zeros(8)
    cooperative = dict(launch_cooperative_grid=True, num_warps=4)
    for options in (cooperative, cooperative, dict(cooperative, num_warps=8), None):
        launch.launch_specialised(jit, (2,), x, 5, launch_options=options, BLOCK_B=16, PRECISION="ieee")
    assert [kwargs for _, _, kwargs in jit.launches] == [
        dict(BLOCK_B=16, PRECISION="ieee", **cooperative),
        dict(BLOCK_B=16, PRECISION="ieee", launch_cooperative_grid=True, num_warps=8),
        dict(BLOCK_B=16, PRECISION="ieee"),
    ]
    assert compiled.launches == [((2, 1, 1), (x, 5, 16, "ieee"))]


def test_a_step_loop_launches_every_step_with_its_own_position(monkeypatch):
    """The steps loops through RepeatedLaunch: a forward launch per position in order, then seq_len + 1
    backward launches, positions reversed, the last one (no step) after the first position's."""
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", "steps")
    seen = []
    original = launch.RepeatedLaunch.__call__

    def recording(self, *args):
        names = self.kernel.arg_names
        argument = lambda name: args[names.index(name)]  # noqa: E731
        if self.kernel.__name__ == "forward_step_kernel":
            seen.append(("forward", argument("t")))
        elif self.kernel.__name__ == "backward_step_kernel":
            seen.append(("backward", argument("t"), argument("t_next"), argument("has_next"), argument("step")))
        original(self, *args)

    monkeypatch.setattr(launch.RepeatedLaunch, "__call__", recording)
    lstm = fused_rnn.LSTM(3, 4, backend="triton")
    lstm(torch.randn(3, 2, 3, requires_grad=True))[0].sum().backward()
    assert seen == [
        ("forward", 0), ("forward", 1), ("forward", 2),
        ("backward", 2, 2, 0, 1), ("backward", 1, 2, 1, 1), ("backward", 0, 1, 1, 1), ("backward", 0, 0, 1, 0),
    ]


def _count_parameter_sends(monkeypatch) -> list:
    """Every tensor of launch parameters sent from now on, the cache of those sent before emptied."""
    sent = []
    original = launch.host_to_device
    monkeypatch.setattr(launch, "_sent_parameters", collections.OrderedDict())
    monkeypatch.setattr(launch, "host_to_device", lambda values, device: sent.append(values.tolist()) or original(values, device))
    return sent


def _check_parameters_sent_once(monkeypatch, device):
    """A training loop sends its launch parameters at its first step only: they hold the regularizers. Each
    step's seed reaches its launches as a tensor of its own, filled on the device, one a call."""
    sent = _count_parameter_sends(monkeypatch)
    seeds = []
    original_full = torch.full
    monkeypatch.setattr(launch, "_seeds", collections.OrderedDict())
    monkeypatch.setattr(launch.torch, "full",
                        lambda *args, **kwargs: seeds.append(args[1]) or original_full(*args, **kwargs))
    lstm = fused_rnn.LSTM(8, 16, device=device, backend="triton", **EVERY)
    x = torch.randn(5, 3, 8, device=device, requires_grad=True)
    lstm(x, seed=11)[0].sum().backward()
    # the layer's ints and floats, the input dropout's and the output dropout's
    assert len(sent) == 3
    assert not any(11 in words for words in sent), "no seed among the parameters"
    sent.clear()
    lstm(x, seed=12)[0].sum().backward()
    lstm(x)[0].sum().backward()
    assert sent == []
    assert len(seeds) == 3 and seeds[:2] == [11, 12], "one seed tensor a training step"


def test_a_training_loop_sends_its_launch_parameters_once(monkeypatch):
    require_backend("triton", torch.float32)
    _check_parameters_sent_once(monkeypatch, "cpu")


@gpu
@needs_gpu
def test_a_training_loop_sends_its_launch_parameters_once_on_a_gpu(monkeypatch):
    _check_parameters_sent_once(monkeypatch, "cuda")


def test_a_cache_entry_another_thread_dropped_is_not_an_error():
    """kept.recently_used: between a lookup that found a launch's entry and marking it used, another
    thread's insertion may have dropped it from the LRU cache."""
    from fused_rnn.kept import recently_used

    cache = collections.OrderedDict(a=1, b=2)
    recently_used(cache, "a")
    assert list(cache) == ["b", "a"]
    recently_used(cache, "dropped")
    assert list(cache) == ["b", "a"]


def test_a_cuda_graph_capture_is_refused_before_a_launch(monkeypatch):
    """A captured launch would replay its seed: every launch asks for its parameters, which refuse a capture
    (launch_parameters), before any kernel runs. (The capture stood in for on CPU.)"""
    require_backend("triton", torch.float32)
    monkeypatch.setattr(launch, "_capturing", lambda device: True)
    launched = []
    monkeypatch.setattr(launch, "launch_specialised", lambda *args, **kwargs: launched.append(args[0]))
    for kwargs in (dict(zoneout_h=0.1), dict(input_dropout=0.2)):
        lstm = fused_rnn.LSTM(3, 4, backend="triton", **kwargs)
        with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
            lstm(torch.randn(2, 1, 3), seed=1)
    assert launched == []


def test_launch_parameters_keep_their_values_and_16_byte_alignment():
    """launch._send_packed: ints as int64 and floats in the compute dtype, as they went, two views of one
    tensor (one copy), the floats starting on a 16-byte boundary (what Triton specialises a pointer on)."""
    for ints, floats in (((5, 2**40, 3), (0.5, 1.25, 2.0)), ((7, 9), (1.5,)), ((1,), ())):
        for dtype in (torch.float32, torch.float64):
            sent_ints, sent_floats = launch._send_packed(ints, floats, dtype, torch.device("cpu"))
            assert (tuple(sent_ints.tolist()), tuple(sent_floats.tolist())) == (ints, floats)
            assert sent_ints.dtype == torch.int64 and sent_floats.dtype == dtype
            assert sent_ints.untyped_storage().data_ptr() == sent_floats.untyped_storage().data_ptr()
            assert sent_floats.storage_offset() * sent_floats.element_size() % 16 == 0


def test_the_host_proxys_instruction_counts_come_from_runs_of_one_provider(monkeypatch):
    """--instructions runs `--run-steps N --provider P` children under callgrind and reads the count each
    reports on exit; a child runs that provider's training steps alone."""
    from bench import host_proxy

    assert host_proxy.collected_instructions("==31058== Events    : Ir\n==31058== Collected : 7514128849\n") == 7514128849
    with pytest.raises(RuntimeError, match="no instruction count"):
        host_proxy.collected_instructions("valgrind: command not found")
    forwards = []
    real = launch.layer_forward
    monkeypatch.setattr(launch, "layer_forward", lambda *args: forwards.append(args[0].shape) or real(*args))
    assert host_proxy.main(["--run-steps", "3", "--provider", "every", "--layers", "2"]) == 0
    assert len(forwards) == 3 * 2, "three steps of two layers, and nothing else"
    monkeypatch.setattr(host_proxy.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs valgrind"):
        host_proxy.instructions_a_step("none", 1, "persistent")


def test_the_host_proxy_times_each_provider_and_leaves_the_kernels_running(capsys):
    """bench/host_proxy.py: a time for each provider, and afterwards kernels run again and the recurrence
    choice is as it was."""
    from bench import host_proxy

    before = os.environ.get("FUSED_RNN_RECURRENCE")
    assert host_proxy.main(["--steps", "2", "--repeats", "1", "--layers", "2"]) == 0
    rows = [line.split("|")[1:3] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [name.strip() for name, _ in rows] == [
        "fused_rnn (triton, every regularizer)", "fused_rnn (triton, none)", "nn.LSTM (CPU)"
    ]
    assert all(float(us) > 0 for _, us in rows)
    assert os.environ.get("FUSED_RNN_RECURRENCE") == before
    x = torch.randn(3, 2, 4)
    out = launch.feature_dropout(x, SEEDS[0], 1, 0, 1.0, False)
    assert torch.equal(out, torch.zeros_like(x)), "the kernel ran: p = 1 dropped everything"


def test_the_host_costs_script_times_each_call_and_step(capsys, monkeypatch):
    """bench/host_costs.py on CPU (kernels skipped): a positive time for every call and each provider's step,
    fused_rnn's milestones in their order; afterwards kernels run again and the layer functions are launch's own."""
    from bench import host_costs

    monkeypatch.setattr(host_costs, "CALLS", 2)
    monkeypatch.setattr(host_costs, "STEPS", 1)
    assert host_costs.main(["cpu"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    calls = [row for row in rows if len(row) == 2][1:]
    steps = [row for row in rows if len(row) == 3][1:]
    assert len(calls) >= 15 and all(float(us) > 0 for _, us in calls)
    assert [name.strip() for name, *_ in steps] == ["fused_rnn, every regularizer", "fused_rnn, none", "nn.LSTM"]
    assert all(float(us) > 0 for _, *times in steps for us in times)
    # the milestones of fused_rnn's steps in the order a step reaches them, then the step's return, in steps
    # started drained and in steps one after another; the CPU's auto plan launches per step, with no persistent
    # or resident launch (0: the forward recurrence's launch, its return, the backward's)
    labels = [label for label, *_ in host_costs.MILESTONES]
    persistent = [i for i, (*_, attribute, _) in enumerate(host_costs.MILESTONES) if attribute == "_launch_persistent"]
    assert persistent == [1, 2, len(labels) - 1]
    milestones = [row for row in rows if len(row) == len(labels) + 2 and row[1].strip() != labels[0]]
    assert [name.strip() for name, *_ in milestones] == ["fused_rnn, every regularizer", "fused_rnn, none"] * 2
    for _, *times in milestones:
        times = list(map(float, times))
        reached = [us for i, us in enumerate(times[:-1]) if i not in persistent]
        assert 0 < reached[0] and reached == sorted(reached) and reached[-1] <= times[-1], times
        assert all(times[i] == 0 for i in persistent), times
    assert launch.layer_forward.__name__ == "layer_forward" and launch.layer_backward.__name__ == "layer_backward"
    assert launch._launch_persistent.__name__ == "_launch_persistent" and torch.autograd.backward.__name__ == "backward"
    assert isinstance(ops._LayerFunction.__dict__["backward"], staticmethod)
    assert ops._LayerFunction.backward.__name__ == "_layer_backward"
    x = torch.randn(3, 2, 4)
    assert torch.equal(launch.feature_dropout(x, SEEDS[0], 1, 0, 1.0, False), torch.zeros_like(x))


def test_the_smoke_step_runs_in_float32_and_checks_its_loops(capsys, monkeypatch, restored_tf32):
    """bench/smoke.py in its float32 form (tf32: TF32 products on a GPU, IEEE in the interpreter) at a tiny size:
    the step runs in the mode asked, matches the float64 reference and says so; the mode is left as it was."""
    from bench import smoke

    monkeypatch.setattr(smoke, "SIZES", dict(seq_len=3, batch=2, inputs=4, hidden=8))
    monkeypatch.setenv("FUSED_RNN_RECURRENCE", "auto")
    assert smoke.main("steps", torch.device("cpu"), "tf32") == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("smoke steps tf32: loops steps forward, steps backward") and line.endswith(": ok"), line


def test_the_breakdown_script_lists_each_providers_kernels(capsys):
    """bench/breakdown.py on its tiny CPU shape: a section per provider with a wall time and the ops that
    took the time, each a positive share."""
    from bench import breakdown

    assert breakdown.main(["--providers", "fused_rnn,nn_lstm", "--steps", "1", "--top", "3"]) == 0
    out = capsys.readouterr().out
    sections = [line for line in out.splitlines() if line.startswith("## tiny")]
    assert [section.split(",")[1].split()[0] for section in sections] == ["fused_rnn", "nn_lstm"], out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "kernel |" not in line]
    assert rows and all(float(row[1]) >= 0 and float(row[2]) > 0 for row in rows), rows


def test_eager_calls_skip_the_custom_ops_dispatch_and_give_the_same_bits(monkeypatch):
    """ops.layer and ops.dropout call the custom ops' functions and autograd directly in eager mode on plain
    tensors, the ops themselves otherwise: the same results and gradients, bit for bit, either way."""
    device = require_backend("triton", torch.float64)
    called = []
    for name in ("lstm_layer", "lstm_layer_backward", "feature_dropout"):
        op = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *args, _op=op, _name=name: called.append(_name) or _op(*args))
    x = torch.randn(3, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    # one direction: the layers' ops drop their inputs and the output; two: dropout ops of their own
    for bidirectional, ops_called in ((False, {"lstm_layer"}), (True, {"lstm_layer", "feature_dropout"})):
        lstm = fused_rnn.LSTM(3, 4, 2, backend="triton", dtype=torch.float64, bidirectional=bidirectional,
                              **EVERY).to(device)

        def step():
            out, (h_n, c_n) = lstm(x, seed=5)
            grads = torch.autograd.grad((out.sum() + h_n.sum() + c_n.square().sum()), [x, *lstm.parameters()])
            return [out, h_n, c_n, *grads]

        called.clear()
        with monkeypatch.context() as patched:
            eager = step()
            assert called == []
            patched.setattr(ops, "dispatch_free", lambda tensors: False)
            through_ops = step()
        assert {"lstm_layer", "feature_dropout"} & set(called) == ops_called, (bidirectional, called)
        assert all(torch.equal(a, b) for a, b in zip(eager, through_ops))


def test_calls_inside_a_transform_or_trace_go_through_the_custom_ops():
    x = torch.zeros(2, 3)
    assert ops.dispatch_free((x, None))
    seen = []
    torch.func.vmap(lambda row: seen.append(ops.dispatch_free((row,))) or row)(x)
    torch.func.grad(lambda v: seen.append(ops.dispatch_free((v,))) or v.sum())(torch.zeros(3))
    torch.jit.trace(lambda v: seen.append(ops.dispatch_free((v,))) or v * 2, (torch.zeros(3),), check_trace=False)
    assert seen == [False, False, False]
    with torch.inference_mode():
        assert ops.dispatch_free((torch.zeros(1),))


def test_the_output_dropout_is_folded_where_the_kernels_have_the_registers():
    """The resident loops drop out as they store it and dL/dout as they load it, the persistent backward dL/dout;
    the per-step loops and the persistent forward, which spilled registers with it in the compile checks, leave
    it to a launch."""
    plan = lambda kind: launch.Plan(kind, 1, 16, 16)  # noqa: E731
    assert [launch.output_dropped_in_loop(plan(kind)) for kind in RECURRENCE_MODES] == [False, False, True]
    assert [launch.output_dropped_in_loop(plan(kind), forward=False) for kind in RECURRENCE_MODES] == [False, True, True]


def test_the_hosts_integer_helpers_are_tritons():
    assert all(launch.next_power_of_2(n) == triton.next_power_of_2(n) for n in range(0, 4100))
    assert all(launch.cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 300) for b in range(1, 70))


@pytest.mark.parametrize("mode", RECURRENCE_MODES)
def test_the_breakdowns_host_timers_count_the_backends_calls_and_come_off_after(mode, monkeypatch):
    from bench import breakdown

    monkeypatch.setenv("FUSED_RNN_RECURRENCE", mode)
    originals = (launch.layer_forward, ops.layer, ops.dropout)
    lstm = fused_rnn.LSTM(3, 4, backend="triton", input_dropout=0.2, output_dropout=0.2, recurrent_dropout=0.1)
    x = torch.randn(3, 2, 3, requires_grad=True)
    returned, calls = breakdown.host_times(lambda: lstm(x, seed=1)[0].sum().backward(), 2, torch.device("cpu"))
    assert returned > 0
    assert calls["ops.layer"][1] == 1 and calls["ops.dropout"][1] == 0, calls
    # one direction: the layer's op drops its input (forward) and dx with it (backward); a resident recurrence's
    # kernels drop out and d_out, a persistent backward's d_out (launch.output_dropped_in_loop), else a launch each
    assert calls["launch.dropped_features"][1] == {"steps": 4, "persistent": 3, "resident": 2}[mode], calls
    assert calls["launch.layer_forward"][1] == 1 and calls["launch.layer_backward"][1] == 1, calls
    assert calls["launch.layer_forward"][0] <= calls["ops.layer"][0], "inclusive times: the op includes its launcher"
    assert (launch.layer_forward, ops.layer, ops.dropout) == originals
