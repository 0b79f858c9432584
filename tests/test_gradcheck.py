"""torch.autograd.gradcheck in float64 with a fixed seed and every regularizer on (a fixed seed makes the
stochastic op a deterministic, smooth function), w.r.t. input, h0, c0 and every weight."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn

from _cases import ALL_ON, ALL_ON_OTHER_MODES, setup_backend
from helpers import assert_close

SEED = 31337
GC_T, GC_B, GC_I, GC_H = 3, 2, 2, 2


def lstm_function(lstm: fused_rnn.LSTM, *, training: bool, packed_lengths=None):
    """(x, h0, c0, *weights) -> (output, h_n, c_n) through fused_rnn.lstm with the module's settings."""

    def f(x, h0, c0, *weights):
        data = x if packed_lengths is None else pack_padded_sequence(x, packed_lengths, enforce_sorted=False)
        out, (h_n, c_n) = fused_rnn.lstm(
            data,
            (h0, c0),
            list(weights),
            has_biases=lstm.bias,
            num_layers=lstm.num_layers,
            bidirectional=lstm.bidirectional,
            batch_first=lstm.batch_first,
            training=training,
            regularizers=lstm.regularizers,
            seed=SEED,
            backend=lstm.backend,
        )
        return (out.data if packed_lengths is not None else out), h_n, c_n

    return f


def gradcheck_inputs(lstm, device, hidden, h_out):
    g = torch.Generator().manual_seed(0)
    states = lstm.num_layers * (2 if lstm.bidirectional else 1)
    x = torch.randn(GC_T, GC_B, GC_I, generator=g, dtype=torch.float64)
    h0 = torch.randn(states, GC_B, h_out, generator=g, dtype=torch.float64)
    c0 = torch.randn(states, GC_B, hidden, generator=g, dtype=torch.float64)
    weights = [getattr(lstm, name).detach() for name in lstm._flat_weights_names]
    return [t.to(device).requires_grad_() for t in (x, h0, c0, *weights)]


# (name, module arguments, regularizers, training, packed lengths)
CASES = [
    ("L1-proj-all_on", dict(proj_size=1), ALL_ON, True, None),
    ("L2-bi-proj-all_on", dict(num_layers=2, bidirectional=True, proj_size=1), ALL_ON, True, None),
    (
        "L2-bi-proj-locked_row_sequence",
        dict(num_layers=2, bidirectional=True, proj_size=1),
        ALL_ON_OTHER_MODES,
        True,
        None,
    ),
    ("L1-nobias-all_on", dict(bias=False), ALL_ON, True, None),
    ("L1-bi-packed-all_on", dict(bidirectional=True), ALL_ON, True, [2, 3]),
    ("L2-eval-zoneout", dict(num_layers=2, proj_size=1), ALL_ON, False, None),
]
# The larger cases use gradcheck's fast mode (a random projection of the Jacobian): a full Jacobian costs two
# forwards per input element, and the reference regenerates every mask per forward. Triton, whose interpreter
# pays per program and step, runs every case in fast mode. Every backend's gradients are also compared with the
# reference's (test_parity, test_regularizers).
FAST_CASES = {"L2-bi-proj-all_on", "L2-bi-proj-locked_row_sequence", "L1-bi-packed-all_on"}


@pytest.mark.parametrize("name,cfg,reg,training,lengths", CASES, ids=[c[0] for c in CASES])
def test_gradcheck(backend, name, cfg, reg, training, lengths):
    """gradcheck in float64 of fused_rnn.lstm w.r.t. input, h0, c0 and every weight, with a fixed seed."""
    device = setup_backend(backend)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "dropout option adds dropout")
        lstm = fused_rnn.LSTM(GC_I, GC_H, dtype=torch.float64, device=device, backend=backend, **cfg, **reg)
    h_out = cfg.get("proj_size") or GC_H
    inputs = gradcheck_inputs(lstm, device, GC_H, h_out)
    fast = backend == "triton" or name in FAST_CASES
    assert torch.autograd.gradcheck(
        lstm_function(lstm, training=training, packed_lengths=lengths), inputs, fast_mode=fast
    )


def test_gradcheck_sees_a_wrong_gradient():
    """The check can fail: a mask applied in the forward but forgotten in the backward is caught."""

    class Forgetful(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2.0

        @staticmethod
        def backward(ctx, grad):
            return grad  # wrong: should be 2 * grad

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "dropout option adds dropout")
        lstm = fused_rnn.LSTM(GC_I, GC_H, dtype=torch.float64, backend="reference", **ALL_ON)
    f = lstm_function(lstm, training=True)
    inputs = gradcheck_inputs(lstm, "cpu", GC_H, GC_H)
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)
    wrong = lambda x, *rest: f(Forgetful.apply(x), *rest)  # noqa: E731
    assert not torch.autograd.gradcheck(wrong, inputs, raise_exception=False, fast_mode=True)


# Second derivatives. The fused backends compute first derivatives in their kernels (also under create_graph=True)
# and take higher ones from the reference (fused_rnn/reference/higher_order.py); gradgradcheck's numerical side
# differentiates their first-order kernels, so the two are checked against each other. fast_mode throughout: a
# full second-order Jacobian costs a first-order backward per input element.
GRADGRAD_CASES = ["L1-proj-all_on", "L1-bi-packed-all_on", "L2-bi-proj-all_on", "L2-eval-zoneout"]


@pytest.mark.parametrize(
    "name,cfg,reg,training,lengths", [c for c in CASES if c[0] in GRADGRAD_CASES], ids=GRADGRAD_CASES
)
def test_gradgradcheck(backend, name, cfg, reg, training, lengths):
    """gradgradcheck in float64 of fused_rnn.lstm w.r.t. input, h0, c0, every weight and the output gradients."""
    device = setup_backend(backend)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "dropout option adds dropout")
        lstm = fused_rnn.LSTM(GC_I, GC_H, dtype=torch.float64, device=device, backend=backend, **cfg, **reg)
    inputs = gradcheck_inputs(lstm, device, GC_H, cfg.get("proj_size") or GC_H)
    f = lstm_function(lstm, training=training, packed_lengths=lengths)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_double_backward_equals_the_reference(backend, training):
    """A gradient penalty: the gradients of input, states and parameters taken with create_graph=True equal those
    taken without it, and the gradients of their squared norm equal the reference backend's. Two layers with every
    dropout between and around them, so the second derivatives cross the feature dropout and run each layer's
    first-order backward again."""
    device = setup_backend(backend)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "dropout option adds dropout")
        modules = {
            name: fused_rnn.LSTM(GC_I, GC_H, num_layers=2, proj_size=1, dtype=torch.float64, device=device, backend=name, **ALL_ON)
            for name in dict.fromkeys(("reference", backend))
        }
    modules["reference"].load_state_dict(modules[backend].state_dict())
    g = torch.Generator().manual_seed(1)
    leaves = [
        torch.randn(shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
        for shape in ((GC_T, GC_B, GC_I), (2, GC_B, 1), (2, GC_B, GC_H))
    ]

    def run(module, create_graph):
        module.train(training)
        out, (h_n, c_n) = module(leaves[0], tuple(leaves[1:]), seed=SEED)
        wrt = leaves + list(module.parameters())
        first = torch.autograd.grad((out**2).sum() + (h_n * c_n).sum(), wrt, create_graph=create_graph)
        if not create_graph:
            return first, None
        return first, torch.autograd.grad(sum((t**2).sum() for t in first), wrt)

    plain, _ = run(modules[backend], False)
    first, second = run(modules[backend], True)
    _, expected = run(modules["reference"], True)
    for i, (a, b) in enumerate(zip(plain, first)):
        assert torch.equal(a, b), f"first-order gradient {i} changes with create_graph=True"
    for i, (r, o) in enumerate(zip(expected, second)):
        assert_close(f"second-order gradient {i}", r.cpu(), o.cpu(), 1e-10)


def test_third_derivative_equals_the_reference(backend):
    """The node that gives a fused layer's second derivatives is itself differentiable, to any order."""
    if backend == "reference":
        pytest.skip("the reference is what the fused backends' higher derivatives come from")
    device = setup_backend(backend)
    results = []
    for name in ("reference", backend):
        torch.manual_seed(0)
        lstm = fused_rnn.LSTM(GC_I, GC_H, proj_size=1, dtype=torch.float64, device=device, backend=name, **ALL_ON)
        x, h0, c0, *weights = gradcheck_inputs(lstm, device, GC_H, 1)
        out, h_n, c_n = lstm_function(lstm, training=True)(x, h0, c0, *weights)
        (g,) = torch.autograd.grad((out**2).sum() + (h_n * c_n).sum(), x, create_graph=True)
        gg = torch.autograd.grad((g**3).sum(), [x, *weights], create_graph=True)
        results.append(torch.autograd.grad(sum((t**2).sum() for t in gg), [x, h0, c0, *weights]))
    for i, (r, o) in enumerate(zip(*results)):
        assert_close(f"third-order gradient {i}", r.cpu(), o.cpu(), 1e-10)


def test_torch_func_transforms_and_forward_mode_equal_the_reference(backend):
    """jvp, jacfwd, forward-mode dual tensors, torch.func.grad, jacrev and vmap through the module equal the
    reference's (and the jvp a central difference): under a transform the fused ops hand the layer to the
    reference's torch ops, which every transform understands, instead of passing as constants."""
    from torch.autograd import forward_ad
    from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap

    device = setup_backend(backend)
    modules = {}
    for name in dict.fromkeys(("reference", backend)):
        torch.manual_seed(0)
        modules[name] = fused_rnn.LSTM(GC_I, GC_H, proj_size=1, dtype=torch.float64, device=device, backend=name,
                                       **dict(ALL_ON, dropout=0.0))
    g = torch.Generator().manual_seed(2)
    x, v = (torch.randn(GC_T, GC_B, GC_I, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    batch = torch.randn(3, GC_T, GC_B, GC_I, generator=g, dtype=torch.float64).to(device)
    results = {}
    for name, lstm in modules.items():
        def out(t, lstm=lstm):
            return lstm(t, seed=SEED)[0]

        with forward_ad.dual_level():
            dual_tangent = forward_ad.unpack_dual(out(forward_ad.make_dual(x, v))).tangent
        params = dict(lstm.named_parameters())
        results[name] = {
            "jvp": jvp(out, (x,), (v,))[1],
            "jacfwd": jacfwd(out)(x),
            "dual": dual_tangent,
            "grad": grad(lambda t: out(t).sum())(x),
            "jacrev": jacrev(out)(x),
            "vmap": vmap(out)(batch),
            "parameter grad": grad(lambda p: (functional_call(lstm, p, (x,), dict(seed=SEED))[0] ** 2).sum())(params)[
                "weight_hh_l0"
            ],
        }
    eps = 1e-6
    reference = modules["reference"]
    difference = (reference(x + eps * v, seed=SEED)[0] - reference(x - eps * v, seed=SEED)[0]) / (2 * eps)
    assert_close("jvp vs central difference", difference.cpu(), results["reference"]["jvp"].cpu(), 1e-6)
    assert results[backend]["jvp"].abs().max() > 0
    for key, expected in results["reference"].items():
        assert_close(key, expected.cpu(), results[backend][key].cpu(), 1e-12)
