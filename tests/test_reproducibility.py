"""Reproducibility (SPEC.md sections 1 and 4, docs/randomness.md "Seed"): torch.manual_seed, explicit seeds,
the global RNG left alone by forwards that draw nothing, and activation checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint

from _cases import ALL_DROPOUTS, ALL_ON, Cfg, make_inputs, make_pair, run_with_grads, setup_backend

CFG = Cfg(bidirectional=True, proj_size=2)  # small: the Triton interpreter pays per program and step


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), f"{name} differs"


def test_manual_seed_reproduces_a_training_forward(backend):
    """seed=None draws one int64 from torch's default CPU generator (torch.randint(0, 2**63 - 1, ())):
    torch.manual_seed reproduces the run, and the run equals an explicit seed of that value."""
    device = setup_backend(backend)
    _, lstm = make_pair(CFG, backend=backend, device=device, **ALL_ON)
    inputs = make_inputs(CFG, "padded", True).to(device)
    torch.manual_seed(1234)
    first = run_with_grads(lstm, inputs)
    after_first = torch.randn(3)
    torch.manual_seed(1234)
    second = run_with_grads(lstm, inputs)
    assert_same(first, second)
    assert torch.equal(torch.randn(3), after_first), "the forward must draw the same amount each time"
    torch.manual_seed(1234)
    drawn = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))
    assert_same(first, run_with_grads(lstm, inputs, seed=drawn))


def test_explicit_seeds_reproduce_and_differ(backend):
    device = setup_backend(backend)
    _, lstm = make_pair(CFG, backend=backend, device=device, **ALL_ON)
    inputs = make_inputs(CFG, "padded", True).to(device)
    a = run_with_grads(lstm, inputs, seed=2**40 + 7)
    torch.manual_seed(0)  # the global RNG plays no part with an explicit seed
    assert_same(a, run_with_grads(lstm, inputs, seed=2**40 + 7))
    for other in (7, 2**40 + 8):  # the low and the high key word both matter
        assert not torch.equal(a["output"], run_with_grads(lstm, inputs, seed=other)["output"])


def test_calls_without_a_seed_differ(backend):
    device = setup_backend(backend)
    _, lstm = make_pair(CFG, backend=backend, device=device, **ALL_ON)
    x = make_inputs(CFG, "padded", False).to(device).x
    assert not torch.equal(lstm(x)[0], lstm(x)[0])


@pytest.mark.parametrize("how", ["eval", "all_p0", "explicit_seed"])
def test_forward_without_a_draw_leaves_the_global_rng_alone(backend, how):
    """A forward that draws no seed (eval, every p = 0, or an explicit seed) leaves torch's RNG state as it was,
    so swapping nn.LSTM for fused_rnn.LSTM does not shift the caller's random stream."""
    device = setup_backend(backend)
    _, lstm = make_pair(CFG, backend=backend, device=device, **({} if how == "all_p0" else ALL_ON))
    if how == "eval":
        lstm.eval()
    inputs = make_inputs(CFG, "padded", True).to(device)
    torch.manual_seed(99)
    before = torch.get_rng_state()
    cuda_before = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    run_with_grads(lstm, inputs, **({"seed": 5} if how == "explicit_seed" else {}))
    assert torch.equal(torch.get_rng_state(), before)
    if cuda_before is not None:
        assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda_before))


def test_training_forward_with_seed_none_draws_from_the_global_rng():
    _, lstm = make_pair(CFG, **ALL_ON)
    inputs = make_inputs(CFG, "padded", False)
    torch.manual_seed(99)
    before = torch.get_rng_state()
    lstm(*inputs.call_args())
    assert not torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(
    "use_reentrant,seeded",
    [(False, False), (True, False), (False, True)],
    ids=["non_reentrant-seed_none", "reentrant-seed_none", "non_reentrant-seed_given"],
)
def test_checkpoint_recompute_gives_identical_gradients(backend, use_reentrant, seeded):
    """torch.utils.checkpoint recomputes the forward in backward: with seed=None the recompute must draw the
    same seed (checkpoint restores the RNG state), so the gradients equal the plain run's bit for bit."""
    device = setup_backend(backend)
    _, lstm = make_pair(CFG, backend=backend, device=device, **ALL_ON)
    kwargs = {"seed": 77} if seeded else {}
    inputs = make_inputs(CFG, "padded", True).to(device)

    def forward(x, h0, c0):
        out, (h_n, c_n) = lstm(x, (h0, c0), **kwargs)
        return out, h_n, c_n

    def plain():
        out, h_n, c_n = forward(inputs.x, *inputs.hx)
        return out, (h_n, c_n)

    def checkpointed():
        out, h_n, c_n = torch.utils.checkpoint.checkpoint(forward, inputs.x, *inputs.hx, use_reentrant=use_reentrant)
        return out, (h_n, c_n)

    torch.manual_seed(3)
    expected = run_with_grads(lstm, inputs, forward=plain, backward=True)
    torch.manual_seed(3)
    assert_same(expected, run_with_grads(lstm, inputs, forward=checkpointed, backward=True))
    if not seeded:  # the dropout is really on: another global seed changes the gradients
        torch.manual_seed(4)
        other = run_with_grads(lstm, inputs, forward=plain, backward=True)
        assert not torch.equal(other["grad_weight_hh_l0"], expected["grad_weight_hh_l0"])


def test_eval_and_p0_results_do_not_depend_on_the_seed(backend):
    device = setup_backend(backend)
    _, lstm = make_pair(CFG, backend=backend, device=device, **ALL_DROPOUTS)
    lstm.eval()
    x = make_inputs(CFG, "padded", False).to(device).x
    assert torch.equal(lstm(x, seed=1)[0], lstm(x, seed=2)[0])
    _, plain = make_pair(CFG, backend=backend, device=device)
    assert torch.equal(plain(x, seed=1)[0], plain(x, seed=2)[0])


def test_dropout_with_one_layer_draws_nothing(backend):
    """nn.LSTM's `dropout` acts between layers: with one layer a training forward draws no mask, so it draws
    no seed either and the global RNG is left as nn.LSTM leaves it."""
    device = setup_backend(backend)
    cfg = Cfg(bidirectional=True)
    ref, lstm = make_pair(cfg, backend=backend, device=device, dropout=0.5)
    ref.dropout = 0.5
    inputs = make_inputs(cfg, "padded", True)
    for module, inputs_here in ((ref, inputs), (lstm, inputs.to(device))):
        torch.manual_seed(99)
        before = torch.get_rng_state()
        run_with_grads(module, inputs_here)
        assert torch.equal(torch.get_rng_state(), before), type(module).__module__
