"""Philox4x32-10 and the counter layout of docs/randomness.md.

The generator is checked three ways: against the Random123 known-answer vectors, against a scalar Python
Philox written here from the Random123 definition, and against Triton's own `tl.philox`. The layout is
checked by recomputing masks from direct Philox calls, following a table written here from
docs/randomness.md, and by checking that the document still says what that table says.
"""

from __future__ import annotations

import contextlib
import math
import re
from fractions import Fraction
from pathlib import Path

import pytest
import torch

import fused_rnn
from fused_rnn import masks as fr_masks
from fused_rnn import philox

import triton_interpreter
from conftest import backend_device

MASK32 = 0xFFFFFFFF
DOC = Path(__file__).resolve().parent.parent / "docs" / "randomness.md"


def philox_py(counter, key):
    """Philox4x32-10 on Python ints, from the Random123 definition (Salmon et al., SC'11)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK32, p1 & MASK32, ((p0 >> 32) ^ c3 ^ k1) & MASK32, p0 & MASK32
        k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def key_of(seed: int):
    return seed % 2**32, seed // 2**32


KNOWN_ANSWERS = [  # Random123 kat_vectors, philox4x32_10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS, ids=["zeros", "ones", "pi"])
def test_known_answer_vectors(counter, key, expected):
    words = philox.philox4x32(*(torch.tensor(c, dtype=torch.int64) for c in counter), *key)
    assert tuple(int(w) for w in words) == expected
    assert philox_py(counter, key) == expected
    # the key as 0-dim tensors (how a seed tensor reaches it) gives the same
    words = philox.philox4x32(*(torch.tensor(c, dtype=torch.int64) for c in counter), *(torch.tensor(k) for k in key))
    assert tuple(int(w) for w in words) == expected


def random_words(n, generator):
    words = torch.randint(0, 2**32, (n, 4), generator=generator, dtype=torch.int64)
    words[:4] = torch.tensor([[0, 0, 0, 0], [MASK32] * 4, [0, MASK32, 0, MASK32], [2**31, 2**31 - 1, 1, 2**16]])
    return words


SEEDS = [0, 1, 12345, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 12345, 2**62 + 3, 2**63 - 1]


def test_torch_philox_matches_the_scalar_definition():
    g = torch.Generator().manual_seed(0)
    counters = random_words(200, g)
    for seed in SEEDS[::2] + [2**63 - 1]:
        key = key_of(seed)
        assert philox.seed_key(seed) == key
        assert tuple(int(k) for k in philox.seed_key(torch.tensor(seed))) == key
        got = torch.stack(philox.philox4x32(*counters.unbind(1), *key), dim=1)
        expected = torch.tensor([philox_py(tuple(c.tolist()), key) for c in counters])
        assert torch.equal(got, expected)
        assert 0 <= int(got.min()) and int(got.max()) <= MASK32


@contextlib.contextmanager
def philox_rounds(which: str):
    """Under Triton's interpreter, tl.philox's rounds as the suite runs them ("installed": the reference's Philox,
    where tests/triton_interpreter.py put it) or Triton's own interpreted ones ("triton's own")."""
    from triton.language import random as tl_random

    installed = tl_random.philox_impl
    if which == "triton's own":
        if triton_interpreter.tritons_philox_impl is None:
            pytest.skip("Triton's own rounds are the ones that run here (no interpreter, or none replaced)")
        tl_random.philox_impl = triton_interpreter.tritons_philox_impl
    try:
        yield
    finally:
        tl_random.philox_impl = installed


@pytest.mark.parametrize("rounds", ["installed", "triton's own"])
def test_triton_philox_agrees(rounds):
    """Triton's tl.philox(seed, c0, c1, c2, c3) with 32-bit counters is the same function (on the GPU when
    there is one, else in the interpreter conftest selects, with the rounds the suite runs and with Triton's
    own), for 64-bit seeds including seeds >= 2**32."""
    pytest.importorskip("triton")
    import triton
    import triton.language as tl

    @triton.jit
    def philox_kernel(seed, counters, out, N: tl.constexpr):
        offs = tl.arange(0, N) * 4
        c0 = tl.load(counters + offs)
        c1 = tl.load(counters + offs + 1)
        c2 = tl.load(counters + offs + 2)
        c3 = tl.load(counters + offs + 3)
        w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c3)
        tl.store(out + offs, w0.to(tl.int32, bitcast=True))
        tl.store(out + offs + 1, w1.to(tl.int32, bitcast=True))
        tl.store(out + offs + 2, w2.to(tl.int32, bitcast=True))
        tl.store(out + offs + 3, w3.to(tl.int32, bitcast=True))

    device = backend_device("triton")
    n = 64
    g = torch.Generator().manual_seed(1)
    counters = random_words(n, g)
    as_int32 = torch.where(counters >= 2**31, counters - 2**32, counters).to(torch.int32).to(device)
    with philox_rounds(rounds):
        for seed in SEEDS:
            out = torch.zeros(n, 4, dtype=torch.int32, device=device)
            philox_kernel[(1,)](seed, as_int32, out, N=n)
            got = out.cpu().to(torch.int64) & MASK32
            expected = torch.stack(philox.philox4x32(*counters.unbind(1), *philox.seed_key(seed)), dim=1)
            assert torch.equal(got, expected), f"seed {seed}"


def test_interpreted_philox_rounds_are_tritons():
    """The interpreter's rounds (tests/triton_interpreter.py: the reference's Philox on whole arrays) give Triton's
    own words, values and ranks, where scalar and block counters mix, as the kernels' calls do (a unit's block
    beside a step's and a stream's scalars), or are all scalars; other round counts go to Triton's own."""
    pytest.importorskip("triton")
    import triton
    import triton.language as tl

    if triton_interpreter.tritons_philox_impl is None:
        pytest.skip("no interpreter here, or its rounds were not replaced: nothing to compare")

    @triton.jit
    def mixed_kernel(out, seed, t, stream, N: tl.constexpr, ROUNDS: tl.constexpr, LAYOUT: tl.constexpr):
        offs = tl.arange(0, N)
        if LAYOUT == 0:
            w0, w1, w2, w3 = tl.philox(seed, offs.to(tl.uint32), t, stream, 3, ROUNDS)
        elif LAYOUT == 1:
            w0, w1, w2, w3 = tl.philox(seed, t, offs, stream, offs * 7, ROUNDS)
        else:
            w0, w1, w2, w3 = tl.philox(seed, t, stream, 5, 9, ROUNDS)
        # a word still scalar after the rounds stores the same value at every offset, and its rank, 0
        zero = offs.to(tl.uint32) * 0
        tl.store(out + offs, (w0 + zero).to(tl.int32, bitcast=True))
        tl.store(out + N + offs, (w1 + zero).to(tl.int32, bitcast=True))
        tl.store(out + 2 * N + offs, (w2 + zero).to(tl.int32, bitcast=True))
        tl.store(out + 3 * N + offs, (w3 + zero).to(tl.int32, bitcast=True))
        tl.store(out + 4 * N, len(w0.shape))
        tl.store(out + 4 * N + 1, len(w1.shape))
        tl.store(out + 4 * N + 2, len(w2.shape))
        tl.store(out + 4 * N + 3, len(w3.shape))

    g = torch.Generator().manual_seed(3)
    for layout in range(3):
        for n_rounds in (1, 2, 10):
            seed, t, stream = (int(v) for v in torch.randint(0, 2**31, (3,), generator=g))
            results = []
            for rounds in ("installed", "triton's own"):
                out = torch.zeros(4 * 16 + 4, dtype=torch.int32)
                with philox_rounds(rounds):
                    mixed_kernel[(1,)](out, seed + 2**40 * layout, t, stream, N=16, ROUNDS=n_rounds, LAYOUT=layout)
                results.append(out)
            assert torch.equal(*results), f"layout {layout}, {n_rounds} rounds"


def test_threshold():
    assert philox.threshold(0) == 0 and philox.threshold(0.0) == 0
    assert philox.threshold(1) == 2**32 and philox.threshold(1.0) == 2**32
    assert philox.threshold(0.5) == 2**31
    assert philox.threshold(0.25) == 2**30
    assert philox.threshold(2.0**-32) == 1
    assert philox.threshold(2.0**-33) == 0
    assert philox.threshold(math.nextafter(1.0, 0.0)) == 2**32 - 1
    assert philox.threshold(5e-324) == 0
    g = torch.Generator().manual_seed(2)
    for p in torch.rand(500, generator=g, dtype=torch.float64).tolist() + [0.1, 0.2, 0.3, 1 / 3, 0.7, 0.9, 0.99]:
        t = philox.threshold(p)
        assert type(t) is int and t == math.floor(Fraction(p) * 2**32)
        assert 0 <= p - t / 2**32 < 2**-32


def test_keep_scale():
    assert philox.keep_scale(1) == 0.0 and philox.keep_scale(1.0) == 0.0
    assert philox.keep_scale(0.0) == 1.0
    assert philox.keep_scale(0.5) == 2.0
    assert philox.keep_scale(0.2) == 1 / (1 - 0.2)


def test_keep_and_zoneout_decisions_on_integers():
    """drop (dropout) / keep the previous value (zoneout) iff draw < threshold(p), in 64-bit integers."""
    draws = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 1], dtype=torch.int64)
    assert fr_masks.keep_mask(draws, 0.5).tolist() == [False, False, False, True, True, True]
    assert fr_masks.zoneout_mask(draws, 0.5).tolist() == [True, True, True, False, False, False]
    assert not fr_masks.keep_mask(draws, 1.0).any() and fr_masks.keep_mask(draws, 0.0).all()
    assert fr_masks.zoneout_mask(draws, 1.0).all() and not fr_masks.zoneout_mask(draws, 0.0).any()
    assert fr_masks.keep_mask(draws, 2.0**-32).tolist() == [False] + [True] * 5


# --- the counter layout ------------------------------------------------------------------------------

# written from docs/randomness.md, independently of fused_rnn.philox's constants
KIND = {"input": 1, "output": 2, "weight": 3, "sequence": 4, "step": 5}
SEQUENCE_WORDS = {"hidden": 0, "cell": 1, "update": 2}
STEP_WORDS = {"zoneout_h": 0, "zoneout_c": 1, "update": 2}


def bulk_draw(seed, kind, c2, c1, element):
    """Element e of a bulk mask: word e % 4 of Philox(c0 = e // 4, c1, c2, kind)."""
    return philox_py((element // 4, c1, c2, KIND[kind]), key_of(seed))[element % 4]


def unit_draw(seed, kind, k, t, b, j, hidden, word):
    """Unit j of row b: word `word` of Philox(c0 = b * H + j, c1 = t, c2 = k, kind)."""
    return philox_py((b * hidden + j, t, k, KIND[kind]), key_of(seed))[word]


def test_packed_draws_are_four_elements_per_call():
    seed, steps, numel = 2**40 + 5, [0, 3, 7], 11
    draws = philox.packed_draws(seed, 3, 2, torch.tensor(steps), numel, torch.device("cpu"))
    assert draws.shape == (3, numel)
    for i, t in enumerate(steps):
        for e in range(numel):
            assert int(draws[i, e]) == philox_py((e // 4, t, 2, 3), key_of(seed))[e % 4]


def test_unit_draws_are_one_call_per_unit():
    seed, batch, hidden = 2**33 + 9, 3, 5
    words = philox.unit_draws(seed, 5, 4, torch.tensor([0, 2]), batch, hidden, torch.device("cpu"))
    for w in range(4):
        assert words[w].shape == (2, batch, hidden)
        for i, t in enumerate([0, 2]):
            for b in range(batch):
                for j in range(hidden):
                    assert int(words[w][i, b, j]) == philox_py((b * hidden + j, t, 4, 5), key_of(seed))[w]


LAYOUT_SEED = 2**35 + 77
P = 0.5  # threshold 2**31: a mask bit is the top bit of its draw
LT, LB, LI, LH, LP = 3, 2, 5, 4, 3


def layout_module(**kwargs):
    return fused_rnn.LSTM(LI, LH, num_layers=2, bidirectional=True, proj_size=LP, backend="reference", **kwargs)


def keep(draw):
    return draw >= philox.threshold(P)


def zone(draw):
    return draw < philox.threshold(P)


@pytest.mark.parametrize("locked", [False, True], ids=["step", "locked"])
def test_input_and_output_masks_follow_the_bulk_layout(locked):
    lstm = layout_module(input_dropout=P, dropout=P, output_dropout=P, dropout_mode="locked" if locked else "step")
    masks = lstm.sample_masks(LT, LB, LAYOUT_SEED)
    steps = 1 if locked else LT
    for layer, features in enumerate([LI, 2 * LP]):
        mask = masks["input"][layer]
        assert mask.shape == (steps, LB, features)
        for t in range(steps):
            for b in range(LB):
                for f in range(features):
                    draw = bulk_draw(LAYOUT_SEED, "input", layer, t, b * features + f)
                    assert bool(mask[t, b, f]) == keep(draw), (layer, t, b, f)
    mask = masks["output"]
    assert mask.shape == (steps, LB, 2 * LP)
    for t in range(steps):
        for b in range(LB):
            for f in range(2 * LP):
                assert bool(mask[t, b, f]) == keep(bulk_draw(LAYOUT_SEED, "output", 0, t, b * 2 * LP + f))


@pytest.mark.parametrize("mode", ["element", "row"])
def test_weight_masks_follow_the_bulk_layout(mode):
    lstm = layout_module(weight_dropout=P, weight_dropout_mode=mode)
    masks = lstm.sample_masks(LT, LB, LAYOUT_SEED)
    columns = 1 if mode == "row" else LP
    for k in range(4):
        mask = masks["weight"][k]
        assert mask.shape == (4 * LH, columns)
        for r in range(4 * LH):
            for j in range(columns):
                assert bool(mask[r, j]) == keep(bulk_draw(LAYOUT_SEED, "weight", k, 0, r * columns + j)), (k, r, j)


@pytest.mark.parametrize("update_mode", ["step", "sequence"])
def test_unit_masks_follow_the_unit_layout(update_mode):
    """c0 = b * H + j with the row stride H also for the H_out-wide masks (proj_size < hidden_size)."""
    lstm = layout_module(
        recurrent_dropout=P, cell_dropout=P, update_dropout=P, update_dropout_mode=update_mode, zoneout_h=P, zoneout_c=P
    )
    masks = lstm.sample_masks(LT, LB, LAYOUT_SEED)
    for k in range(4):
        seq = {
            name: [[unit_draw(LAYOUT_SEED, "sequence", k, 0, b, j, LH, w) for j in range(LH)] for b in range(LB)]
            for name, w in SEQUENCE_WORDS.items()
        }
        for b in range(LB):
            for j in range(LH):
                if j < LP:
                    assert bool(masks["hidden"][k][b, j]) == keep(seq["hidden"][b][j])
                assert bool(masks["cell"][k][b, j]) == keep(seq["cell"][b][j])
                if update_mode == "sequence":
                    assert bool(masks["update"][k][0, b, j]) == keep(seq["update"][b][j])
        assert masks["hidden"][k].shape == (LB, LP) and masks["cell"][k].shape == (LB, LH)
        for t in range(LT):
            for b in range(LB):
                for j in range(LH):
                    draw = {name: unit_draw(LAYOUT_SEED, "step", k, t, b, j, LH, w) for name, w in STEP_WORDS.items()}
                    if j < LP:
                        assert bool(masks["zoneout_h"][k][t, b, j]) == zone(draw["zoneout_h"])
                    assert bool(masks["zoneout_c"][k][t, b, j]) == zone(draw["zoneout_c"])
                    if update_mode == "step":
                        assert bool(masks["update"][k][t, b, j]) == keep(draw["update"])
        assert masks["zoneout_h"][k].shape == (LT, LB, LP) and masks["zoneout_c"][k].shape == (LT, LB, LH)
        assert masks["update"][k].shape == ((LT if update_mode == "step" else 1), LB, LH)


def test_module_constants_match_the_document_table():
    assert (philox.KIND_INPUT, philox.KIND_OUTPUT, philox.KIND_WEIGHT, philox.KIND_SEQUENCE, philox.KIND_STEP) == (
        KIND["input"],
        KIND["output"],
        KIND["weight"],
        KIND["sequence"],
        KIND["step"],
    )
    assert (philox.WORD_HIDDEN, philox.WORD_CELL, philox.WORD_UPDATE) == tuple(SEQUENCE_WORDS.values())
    assert (philox.WORD_ZONEOUT_H, philox.WORD_ZONEOUT_C, philox.WORD_UPDATE) == tuple(STEP_WORDS.values())
    assert philox.SEED_LIMIT == 2**63


def test_the_document_says_what_the_tests_check():
    """docs/randomness.md is the contract the Triton and C++ backends implement: its tables must be the
    layout checked above."""
    text = DOC.read_text()
    flowing = " ".join(text.split())  # phrases may wrap across lines
    for phrase in [
        "`k0 = seed mod 2**32`, `k1 = seed div 2**32`",
        "| `c3` | the kind: 1 input, 2 output, 3 weight, 4 sequence, 5 step |",
        "element `e` takes word `w[e mod 4]` of `Philox(c0 = e div 4, c1, c2, c3)`",
        "Unit `j` (in `[0, H)`) of batch row `b` uses `Philox(c0 = b * H + j, c1, c2 = k, c3)`",
        "(the row stride stays `H`)",
        "r < threshold(p),   threshold(p) = floor(p * 2**32)",
        "torch.randint(0, 2**63 - 1, (), dtype=torch.int64)",
    ]:
        assert " ".join(phrase.split()) in flowing, phrase

    rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| `masks[")
    ]
    bulk = {
        re.search(r'masks\["(\w+)"\]', row[0]).group(1) + (" row" if "row mode" in row[0] else ""): row[1:]
        for row in rows
    }
    assert bulk == {
        "input": ["1", "`l`", "`t`, or 0 when locked", "`b * I_l + f`"],
        "output": ["2", "0", "`t`, or 0 when locked", "`b * D * H_out + f`"],
        "weight": ["3", "`k`", "0", "`r * H_out + j`"],
        "weight row": ["3", "`k`", "0", "`r`"],
    }
    unit_rows = {}
    for line in text.splitlines():
        match = re.match(r"\| (\d), (sequence|step) \| (0|`t`) \|(.*)\|\s*$", line)
        if match:
            words = [re.search(r'masks\["(\w+)"\]', cell).group(1) for cell in match.group(4).split("|")]
            unit_rows[match.group(2)] = (int(match.group(1)), match.group(3), words)
    assert unit_rows == {
        "sequence": (KIND["sequence"], "0", list(SEQUENCE_WORDS)),
        "step": (KIND["step"], "`t`", list(STEP_WORDS)),
    }
