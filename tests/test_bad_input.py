"""Bad input (SPEC.md section 5): an exception that names the problem, raised before any kernel runs,
with nn.LSTM's type and wording where nn.LSTM checks the same thing, and nothing changed: not the
module's parameters, not the caller's tensors, no gradients."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence

import fused_rnn
from fused_rnn import backends

from _cases import BIG_CFG, PROBABILITY_NAMES, Cfg, H, I, P, make_lstm, make_pair, setup_backend

T_, B_ = 4, 2


def exception_of(fn):
    try:
        fn()
    except Exception as error:  # the type is what is compared
        return error
    return None


class Untouched:
    """Snapshot a module and tensors; check later that a failed call changed nothing and made no gradient."""

    def __init__(self, module, *tensors):
        self.module = module
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        self.tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
        self.copies = [t.detach().clone() for t in self.tensors]

    def check(self):
        state = self.module.state_dict()
        assert state.keys() == self.state.keys()
        for name, value in state.items():
            assert value.dtype == self.state[name].dtype and torch.equal(value, self.state[name]), name
        for t, copy in zip(self.tensors, self.copies):
            assert t.dtype == copy.dtype and torch.equal(t, copy)
        assert all(p.grad is None for p in self.module.parameters())
        assert all(t.grad is None for t in self.tensors if t.is_leaf)


def rejects(module, call, exc_type, pattern, *tensors):
    """call() raises exc_type matching `pattern` and leaves `module` and `tensors` untouched."""
    untouched = Untouched(module, *tensors)
    with pytest.raises(exc_type, match=pattern):
        call()
    untouched.check()


# --- the checks nn.LSTM makes too: same type, same message -----------------------------------------


def randn(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype).requires_grad_(dtype.is_floating_point)


def states(cfg, layers_dirs=None, batch=(B_,), h=None, c=H, dtype=torch.float64):
    n = cfg.num_layers * cfg.dirs if layers_dirs is None else layers_dirs
    return randn(n, *batch, cfg.h_out if h is None else h, dtype=dtype), randn(n, *batch, c, dtype=dtype)


def batched(cfg, seq=T_, features=I, dtype=torch.float64):
    return randn(*((B_, seq) if cfg.batch_first else (seq, B_)), features, dtype=dtype)


NN_CASES = {
    "input_1d": lambda cfg: (randn(I), None),
    "input_4d": lambda cfg: (randn(T_, B_, I, 1), None),
    "input_4d_with_hx": lambda cfg: (randn(T_, B_, I, 1), states(cfg)),
    "feature_size": lambda cfg: (batched(cfg, features=I + 1), None),
    "feature_size_unbatched": lambda cfg: (randn(T_, I - 1), None),
    "feature_size_with_hx": lambda cfg: (batched(cfg, features=I + 1), states(cfg)),
    "dtype_float32": lambda cfg: (batched(cfg, dtype=torch.float32), None),
    "dtype_int": lambda cfg: (torch.randint(0, 3, (T_, B_, I)), None),
    "dtype_complex": lambda cfg: (batched(cfg).detach().to(torch.complex128), None),
    "hx_batched_3d_2d": lambda cfg: (batched(cfg), (states(cfg)[0], states(cfg, batch=())[1])),
    "hx_batched_2d_2d": lambda cfg: (batched(cfg), states(cfg, batch=())),
    "hx_unbatched_3d_3d": lambda cfg: (randn(T_, I), states(cfg, batch=(1,))),
    "hx_unbatched_2d_3d": lambda cfg: (randn(T_, I), (states(cfg, batch=())[0], states(cfg, batch=(1,))[1])),
    "h_batch": lambda cfg: (batched(cfg), (states(cfg, batch=(B_ + 1,))[0], states(cfg)[1])),
    "h_layers": lambda cfg: (batched(cfg), (states(cfg, layers_dirs=cfg.num_layers * cfg.dirs + 1)[0], states(cfg)[1])),
    "h_features": lambda cfg: (batched(cfg), (states(cfg, h=cfg.h_out + 1)[0], states(cfg)[1])),
    "h_features_hidden_size": lambda cfg: (
        batched(cfg),
        (states(cfg, h=H)[0] if cfg.proj_size else states(cfg, h=H + 2)[0], states(cfg)[1]),
    ),
    "c_features": lambda cfg: (batched(cfg), (states(cfg)[0], states(cfg, c=H + 1)[1])),
    "c_features_proj_size": lambda cfg: (
        batched(cfg),
        (states(cfg)[0], states(cfg, c=cfg.h_out)[1] if cfg.proj_size else states(cfg, c=H - 1)[1]),
    ),
    "c_batch": lambda cfg: (batched(cfg), (states(cfg)[0], states(cfg, batch=(B_ + 1,))[1])),
    "h_unbatched_features": lambda cfg: (
        randn(T_, I),
        (states(cfg, batch=(), h=cfg.h_out + 1)[0], states(cfg, batch=())[1]),
    ),
    "c_unbatched_layers": lambda cfg: (
        randn(T_, I),
        (states(cfg, batch=())[0], states(cfg, layers_dirs=1 + cfg.num_layers * cfg.dirs, batch=())[1]),
    ),
    "empty_sequence": lambda cfg: (batched(cfg, seq=0), None),
    "empty_sequence_with_hx": lambda cfg: (batched(cfg, seq=0), states(cfg)),
    "empty_sequence_unbatched": lambda cfg: (randn(0, I), None),
    # two faults at once: the one nn.LSTM checks first is reported
    "feature_size_and_hx_2d": lambda cfg: (batched(cfg, features=I + 1), states(cfg, batch=())),
    "feature_size_and_hx_unbatched_3d": lambda cfg: (randn(T_, I + 1), states(cfg, batch=(1,))),
    "dtype_and_hx_2d": lambda cfg: (batched(cfg, dtype=torch.float32), states(cfg, batch=())),
    "dtype_int_and_hx_2d": lambda cfg: (torch.randint(0, 3, (T_, B_, I)), states(cfg, batch=())),
    "dtype_and_feature_size": lambda cfg: (batched(cfg, features=I + 1, dtype=torch.float32), None),
    "input_4d_and_hx_2d": lambda cfg: (randn(T_, B_, I, 1), states(cfg, batch=())),
    "feature_size_and_h_batch": lambda cfg: (batched(cfg, features=I + 1), states(cfg, batch=(B_ + 1,))),
    "h_and_c_sizes": lambda cfg: (batched(cfg), states(cfg, h=cfg.h_out + 1, c=H + 1)),
    "c_size_and_h_dtype": lambda cfg: (batched(cfg), (states(cfg, dtype=torch.float32)[0], states(cfg, c=H + 1)[1])),
    "empty_sequence_and_h_size": lambda cfg: (batched(cfg, seq=0), states(cfg, h=cfg.h_out + 1)),
    "empty_sequence_and_feature_size": lambda cfg: (batched(cfg, seq=0, features=I + 1), None),
    "empty_sequence_and_hx_2d": lambda cfg: (batched(cfg, seq=0), states(cfg, batch=())),
}
NN_CFGS = [Cfg(), Cfg(num_layers=2, bidirectional=True, proj_size=3, batch_first=True)]


@pytest.mark.parametrize("cfg", NN_CFGS, ids=str)
@pytest.mark.parametrize("case", list(NN_CASES))
def test_same_exception_as_nn_lstm(backend, case, cfg):
    device = setup_backend(backend)
    ref, lstm = make_pair(cfg, backend=backend, device=device)
    x, hx = NN_CASES[case](cfg)
    expected = exception_of(lambda: ref(x, hx))
    assert expected is not None, f"nn.LSTM accepts {case}: not a bad-input case"
    x, hx = (
        x.detach().to(device).requires_grad_(x.requires_grad),
        None if hx is None else tuple(t.detach().to(device).requires_grad_() for t in hx),
    )
    tensors = (x,) + (() if hx is None else hx)
    rejects(lstm, lambda: lstm(x, hx), type(expected), f"^{re.escape(str(expected))}$", *tensors)


@pytest.mark.parametrize(
    "make_hx,seq",
    [
        (lambda: (torch.empty(1, B_, H, dtype=torch.float64, device="meta"), randn(1, B_, H + 1)), T_),
        (lambda: (torch.empty(1, B_, H, dtype=torch.float64, device="meta"), randn(1, B_, H)), 0),
        (lambda: (randn(1, B_, H, dtype=torch.float32), torch.empty(1, B_, H, dtype=torch.float64, device="meta")), T_),
    ],
    ids=["meta_h_and_c_size", "meta_h_and_empty_sequence", "h_dtype_and_meta_c"],
)
def test_double_faults_with_a_state_on_another_device(make_hx, seq):
    """nn.LSTM checks sizes in Python, then devices, then the sequence length, then dtypes (in its kernel)."""
    ref, lstm = make_pair(Cfg())
    x, hx = randn(seq, B_, I), make_hx()
    expected = exception_of(lambda: ref(x, hx))
    assert expected is not None
    rejects(lstm, lambda: lstm(x, hx), type(expected), f"^{re.escape(str(expected))}$", x)


# --- the checks nn.LSTM lacks: a clear exception naming the problem ---------------------------------


@pytest.mark.parametrize("which", [0, 1])
def test_hx_dtype_mismatch(which):
    _, lstm = make_pair(Cfg())
    x = randn(T_, B_, I)
    hx = list(states(Cfg()))
    hx[which] = hx[which].detach().float().requires_grad_()
    rejects(lstm, lambda: lstm(x, tuple(hx)), RuntimeError, rf"hx\[{which}\] dtype \(torch.float32\)", x, *hx)


@pytest.mark.parametrize("which", [0, 1])
def test_hx_on_another_device(which):
    _, lstm = make_pair(Cfg())
    x = randn(T_, B_, I)
    hx = list(states(Cfg()))
    hx[which] = torch.empty_like(hx[which], device="meta")
    rejects(lstm, lambda: lstm(x, tuple(hx)), RuntimeError, "Input and hidden tensors are not at the same device", x)


def test_parameters_on_another_device():
    lstm = make_lstm(Cfg(), device="meta")
    x = randn(T_, B_, I)
    with pytest.raises(RuntimeError, match="Input and parameter tensors are not at the same device"):
        lstm(x)
    assert x.grad is None


def test_hx_must_be_a_pair_of_tensors():
    ref, lstm = make_pair(Cfg())
    x = randn(T_, B_, I)
    h0, c0 = states(Cfg())
    for hx in ((h0, None), [h0.tolist(), c0], (None, None), "ab"):
        # nn.LSTM's hx[0].dim() raises AttributeError; ours is that and a TypeError
        assert isinstance(exception_of(lambda hx=hx: ref(x, hx)), AttributeError)
        for exc in (TypeError, AttributeError):
            rejects(lstm, lambda hx=hx: lstm(x, hx), exc, r"hx must be a tuple \(h_0, c_0\)", x, h0, c0)
    # a tensor is indexed as nn.LSTM indexes hx: [2, B, H] gives 2-D states, [1, B, H] has no hx[1]
    for hx in (randn(2, B_, H), randn(1, B_, H)):
        expected = exception_of(lambda hx=hx: ref(x, hx))
        assert isinstance(expected, (RuntimeError, IndexError))
        rejects(lstm, lambda hx=hx: lstm(x, hx), type(expected), f"^{re.escape(str(expected))}$", x, h0, c0)
    # stacked [2, L, B, H]: nn.LSTM's kernel takes no tensor for hx, after the Python checks
    assert isinstance(exception_of(lambda: ref(x, torch.stack([h0, c0]))), TypeError)
    rejects(lstm, lambda: lstm(x, torch.stack([h0, c0])), TypeError, "got a tensor", x, h0, c0)
    # the lengths nn.LSTM rejects: its IndexError reaching for hx[1], its kernel's RuntimeError for three
    for hx, exc, pattern in (((h0,), IndexError, r"hx must be a tuple \(h_0, c_0\) of two tensors, got 1"),
                             ((h0, c0, c0), RuntimeError, r"^lstm expects two hidden states$")):
        assert isinstance(exception_of(lambda hx=hx: ref(x, hx)), exc)
        rejects(lstm, lambda hx=hx: lstm(x, hx), exc, pattern, x, h0, c0)


def test_a_third_state_is_reported_after_nn_lstms_own_checks():
    """Batched, nn.LSTM's Python checks (input dtype and size, hidden sizes) come before its kernel's count of
    the states: an input with both faults reports the first."""
    ref, lstm = make_pair(Cfg())
    h0, c0 = states(Cfg())
    for x, hx in ((randn(T_, B_, I, dtype=torch.float32), (h0, c0, c0)), (randn(T_, B_, I + 1), (h0, c0, c0)),
                  (randn(T_, B_, I), (states(Cfg(), h=H + 1)[0], c0, c0))):
        expected = exception_of(lambda: ref(x, hx))
        assert expected is not None and "two hidden states" not in str(expected)
        rejects(lstm, lambda: lstm(x, hx), type(expected), f"^{re.escape(str(expected))}$", x, h0, c0)


def test_unbatched_hx_is_indexed_as_nn_lstm_indexes_it():
    """Unbatched, nn.LSTM takes hx[0] and hx[1]: a stacked [2, L, H] tensor runs, and a third state is dropped."""
    ref, lstm = make_pair(Cfg())
    x = randn(T_, I)
    h0, c0 = states(Cfg(), batch=())
    expected = ref(x, (h0, c0))
    for hx in (torch.stack([h0, c0]), (h0, c0, c0)):
        ref(x, hx)  # runs
        out, (h_n, c_n) = lstm(x, hx)
        torch.testing.assert_close((out, h_n, c_n), (expected[0], *expected[1]))


def test_packed_hx_of_the_wrong_length_fails_as_nn_lstms_kernel_does():
    """Packed input of sorted lengths reaches nn.LSTM's kernel with hx as it came, which wants two states."""
    ref, lstm = make_pair(Cfg())
    data = torch.nn.utils.rnn.pack_padded_sequence(randn(T_, B_, I), [4, 3])
    h0, c0 = states(Cfg())
    for hx in ((h0,), (h0, c0, c0)):
        expected = exception_of(lambda hx=hx: ref(data, hx))
        assert isinstance(expected, RuntimeError)
        rejects(lstm, lambda hx=hx: lstm(data, hx), RuntimeError, f"^{re.escape(str(expected))}$", h0, c0)


@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_input_faults_have_nn_lstms_types(enforce_sorted):
    """nn.LSTM checks neither the dtype nor hx's dimensions of packed input in Python: its kernel raises a
    RuntimeError for the one, permuting hx an IndexError for the other. Same types, clearer words."""
    ref, lstm = make_pair(Cfg())
    lengths = [4, 3] if enforce_sorted else [3, 4]
    data = torch.nn.utils.rnn.pack_padded_sequence(randn(T_, B_, I), lengths, enforce_sorted=enforce_sorted)
    single = torch.nn.utils.rnn.pack_padded_sequence(randn(T_, B_, I, dtype=torch.float32), lengths,
                                                     enforce_sorted=enforce_sorted)
    hx_2d = states(Cfg(), batch=())
    assert isinstance(exception_of(lambda: ref(single)), RuntimeError)
    rejects(lstm, lambda: lstm(single), RuntimeError, r"RNN input dtype \(torch.float32\) does not match", single.data)
    assert isinstance(exception_of(lambda: ref(data, hx_2d)), IndexError)
    rejects(lstm, lambda: lstm(data, hx_2d), IndexError, r"hx and cx should also be 3-D but got \(2-D, 2-D\)",
            data.data, *hx_2d)


def packed(batch_sizes, features=I, rows=None, extra_dims=()):
    batch_sizes = torch.as_tensor(batch_sizes)
    rows = int(batch_sizes.sum()) if rows is None else rows
    return PackedSequence(randn(rows, features, *extra_dims), batch_sizes)


@pytest.mark.parametrize(
    "make,exc,pattern",
    [
        (lambda: packed([2, 3, 1]), RuntimeError, r"batch_sizes must be positive and non-increasing.*\[2, 3, 1\]"),
        (lambda: packed([3, 0]), RuntimeError, r"batch_sizes must be positive and non-increasing.*\[3, 0\]"),
        (lambda: packed([3, 2], rows=6), RuntimeError, r"6 rows but its batch_sizes sum to 5"),
        (
            lambda: packed(torch.tensor([3, 2], dtype=torch.int32)),
            RuntimeError,
            r"batch_sizes must be a 1-D int64 CPU tensor",
        ),
        (lambda: packed(torch.tensor([[3, 2]])), RuntimeError, r"batch_sizes must be a 1-D int64 CPU tensor"),
        (lambda: packed([3, 2], extra_dims=(1,)), RuntimeError, r"input must have 2 dimensions, got 3"),
        (
            lambda: packed([3, 2], features=I + 1),
            RuntimeError,
            r"input.size\(-1\) must be equal to input_size. Expected 5, got 6",
        ),
    ],
    ids=["increasing", "zero", "rows", "int32", "2d_batch_sizes", "3d_data", "features"],
)
def test_bad_packed_sequence(make, exc, pattern):
    _, lstm = make_pair(Cfg())
    data = make()
    rejects(lstm, lambda: lstm(data), exc, pattern, data.data, data.batch_sizes)


@pytest.mark.parametrize(
    "sorted_indices,exc,pattern",
    [
        (torch.tensor([1, 0]), RuntimeError, r"sorted_indices must be a 1-D int64 tensor of the batch's 3 rows"),
        (torch.tensor([1, 0, 2], dtype=torch.int32), RuntimeError, r"sorted_indices must be a 1-D int64 tensor"),
        (torch.tensor([1.0, 0.0, 2.0]), RuntimeError, r"sorted_indices must be a 1-D int64 tensor"),
        (torch.tensor([5, 0, 1]), IndexError, r"index 5 is out of bounds"),
    ],
    ids=["length", "int32", "float", "out_of_range"],
)
def test_bad_sorted_indices_fail_before_the_seed_is_drawn(sorted_indices, exc, pattern):
    """A hand-made PackedSequence whose sorted_indices cannot index the batch (nn.LSTM checks none of this)
    fails before the training call draws its seed: the generator is where it was."""
    _, lstm = make_pair(Cfg(), zoneout_h=0.5)
    data = packed([3, 2])
    bad = PackedSequence(data.data, data.batch_sizes, sorted_indices, torch.tensor([1, 0, 2]))
    before = torch.get_rng_state()
    rejects(lstm, lambda: lstm(bad), exc, pattern, data.data)
    assert torch.equal(torch.get_rng_state(), before)


def test_packed_hx_batch_must_match():
    _, lstm = make_pair(Cfg())
    data = packed([3, 2])
    hx = states(Cfg(), batch=(2,))
    rejects(
        lstm,
        lambda: lstm(data, hx),
        RuntimeError,
        re.escape("Expected hidden[0] size (1, 3, 4), got [1, 2, 4]"),
        data.data,
        *hx,
    )


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64, 1.5, 1.0, "1", True, torch.tensor(3), [1]], ids=repr)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bad_seed(seed, training):
    _, lstm = make_pair(Cfg(), zoneout_h=0.5)
    lstm.train(training)
    x = randn(T_, B_, I)
    # a seed that is no int is a TypeError as well
    is_int = isinstance(seed, int) and not isinstance(seed, bool)
    for exc in (ValueError,) if is_int else (ValueError, TypeError):
        rejects(lstm, lambda: lstm(x, seed=seed), exc, r"seed must be an int in \[0, 2\*\*63\)", x)
        with pytest.raises(exc, match="seed"):
            lstm.sample_masks(T_, B_, seed)


def test_a_bad_seed_is_reported_after_what_nn_lstm_checks():
    ref, lstm = make_pair(Cfg(), zoneout_h=0.5)
    x = randn(T_, B_, I + 1)
    expected = exception_of(lambda: ref(x))
    rejects(lstm, lambda: lstm(x, seed=-1), type(expected), f"^{re.escape(str(expected))}$", x)


def test_good_seed_edges():
    _, lstm = make_pair(Cfg(), zoneout_h=0.5)
    x = randn(T_, B_, I)
    for seed in (0, 2**63 - 1, 2**32, 2**32 - 1):
        lstm(x, seed=seed)


BAD_PROBABILITIES = [-0.1, 1.5, float("nan"), float("inf"), -float("inf"), True, False, "0.5", None, 1 + 0j, [0.1]]


@pytest.mark.parametrize("value", BAD_PROBABILITIES, ids=repr)
@pytest.mark.parametrize("name", PROBABILITY_NAMES)
def test_bad_probability_at_construction(name, value):
    """ValueError naming the argument, raised before any parameter is created (the RNG is not consumed)."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with pytest.raises(ValueError, match=rf"^{name} should be a number in range \[0, 1\]"):
        fused_rnn.LSTM(I, H, num_layers=2, backend="reference", **{name: value})
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), True, "0.5"], ids=repr)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_bad_dropout_says_what_nn_lstm_says(value, num_layers):
    expected = exception_of(lambda: torch.nn.LSTM(I, H, num_layers=num_layers, dropout=value))
    assert isinstance(expected, ValueError)
    with pytest.raises(ValueError) as error:
        fused_rnn.LSTM(I, H, num_layers=num_layers, dropout=value)
    assert str(error.value) == str(expected)


@pytest.mark.parametrize("name", [name for name in PROBABILITY_NAMES if name != "dropout"])
def test_bad_fused_only_probability_says_what_was_given(name):
    with pytest.raises(ValueError) as error:
        fused_rnn.LSTM(I, H, **{name: 1.5})
    assert str(error.value).endswith(", got 1.5")


@pytest.mark.parametrize("name", [name for name in PROBABILITY_NAMES if name != "dropout"])
def test_bad_probability_set_later_is_rejected_at_the_call(name):
    _, lstm = make_pair(BIG_CFG)
    setattr(lstm, name, 1.5)
    x = randn(T_, B_, I)
    rejects(lstm, lambda: lstm(x), ValueError, rf"^{name} should be a number in range \[0, 1\]", x)
    lstm.eval()  # eval uses no mask, but the setting is still wrong
    rejects(lstm, lambda: lstm(x), ValueError, rf"^{name} should be a number", x)


def test_a_bool_set_later_is_rejected_after_the_equal_float_ran():
    """A module's settings are validated once per distinct values and their types (regularizers.of_fields):
    True equals 1.0 and hashes as it does, but only the float is a probability."""
    _, lstm = make_pair(BIG_CFG)
    x = randn(T_, B_, I)
    lstm.zoneout_h = 1.0
    lstm(x)
    lstm.zoneout_h = True
    rejects(lstm, lambda: lstm(x), ValueError, r"^zoneout_h should be a number in range \[0, 1\]", x)


@pytest.mark.parametrize("value", [-0.5, 2.0, float("nan")], ids=repr)
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bad_dropout_set_later_is_what_nn_lstm_makes_of_it(value, num_layers, training):
    """nn.LSTM checks the `dropout` attribute only where it applies, between layers in training, with a
    RuntimeError; elsewhere a forward runs and the value is unused."""
    ref, lstm = make_pair(Cfg(num_layers=num_layers))
    for module in (ref, lstm):
        module.dropout = value
        module.train(training)
    x = randn(T_, B_, I)
    expected = exception_of(lambda: ref(x))
    if expected is None:
        torch.testing.assert_close(lstm(x)[0], ref(x)[0])
    else:
        assert isinstance(expected, RuntimeError)
        rejects(lstm, lambda: lstm(x), RuntimeError, f"^{re.escape(str(expected))}$", x)
    assert f"dropout={value!r}" in repr(lstm)


@pytest.mark.parametrize("value", [2.0, "0.5"], ids=repr)
@pytest.mark.parametrize("bad_input", ["4-D", "feature size", "dtype"])
def test_a_bad_input_is_reported_before_a_bad_dropout_set_later_as_in_nn_lstm(value, bad_input):
    """nn.LSTM's kernel reads `dropout` once its Python checks of the input have passed: of two faults, the
    input's is the one reported."""
    ref, lstm = make_pair(Cfg(num_layers=2))
    for module in (ref, lstm):
        module.dropout = value
    x = {"4-D": randn(1, T_, B_, I), "feature size": randn(T_, B_, I + 1),
         "dtype": randn(T_, B_, I, dtype=torch.float32)}[bad_input]
    expected = exception_of(lambda: ref(x))
    assert expected is not None and "dropout" not in str(expected)
    rejects(lstm, lambda: lstm(x), type(expected), f"^{re.escape(str(expected))}$", x)


@pytest.mark.parametrize("value", [None, "abc", [0.5], 1 + 0j, torch.tensor(0.5)], ids=repr)
def test_a_dropout_that_is_not_a_number_fails_as_in_nn_lstm(value):
    """nn.LSTM's float(dropout) raises a TypeError for None, a ValueError for a string; SPEC.md asks for a
    ValueError: an argument that is not a number at all gets an exception of both types."""
    expected = exception_of(lambda: torch.nn.LSTM(I, H, num_layers=2, dropout=value))
    with pytest.raises(ValueError, match="^dropout should be a number in range") as error:
        fused_rnn.LSTM(I, H, num_layers=2, dropout=value)
    assert isinstance(error.value, type(expected)), (type(expected), type(error.value))


def test_a_string_dropout_set_later_fails_as_in_nn_lstm():
    """nn.LSTM's kernel takes no string for `dropout` (TypeError); ours is that and the contract's ValueError."""
    ref, lstm = make_pair(Cfg(num_layers=2))
    x = randn(T_, B_, I)
    for module in (ref, lstm):
        module.dropout = "0.5"
    assert isinstance(exception_of(lambda: ref(x)), TypeError)
    for exc in (TypeError, ValueError):
        rejects(lstm, lambda: lstm(x), exc, "^dropout should be a number in range", x)


MODES = {
    "dropout_mode": ("step", "locked"),
    "weight_dropout_mode": ("element", "row"),
    "update_dropout_mode": ("step", "sequence"),
    "backend": ("auto", "triton", "cpp", "reference"),
}


@pytest.mark.parametrize("value", ["Locked", "", "rows", None, 1])
@pytest.mark.parametrize("name", list(MODES))
def test_unknown_mode_string(name, value):
    # a value that is no string is a TypeError as well
    for exc in (ValueError,) if isinstance(value, str) else (ValueError, TypeError):
        with pytest.raises(exc, match=rf"^{name} must be one of {', '.join(map(repr, MODES[name]))}, got"):
            fused_rnn.LSTM(I, H, **{name: value})
        _, lstm = make_pair(Cfg())
        setattr(lstm, name, value)
        x = randn(T_, B_, I)
        rejects(lstm, lambda: lstm(x), exc, rf"^{name} must be one of", x)


def test_backend_string_is_checked_by_the_functional_api():
    _, lstm = make_pair(Cfg())
    weights = [getattr(lstm, n) for n in lstm._flat_weights_names]
    x = randn(T_, B_, I)
    with pytest.raises(ValueError, match="^backend must be one of"):
        fused_rnn.lstm(x, None, weights, backend="cuda")


def test_triton_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _, lstm = make_pair(Cfg(), backend="triton")
    x = randn(T_, B_, I)
    rejects(lstm, lambda: lstm(x), RuntimeError, r"backend='triton' is not available here: .*TRITON_INTERPRET=1", x)


def test_cpp_with_a_dtype_it_does_not_run():
    lstm = make_lstm(Cfg(), backend="cpp", dtype=torch.float16)
    x = randn(T_, B_, I, dtype=torch.float16)
    rejects(lstm, lambda: lstm(x), RuntimeError, r"backend='cpp' is not available here: .*float32 and float64", x)


@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_unavailable_backend_names_the_reason(name):
    device = torch.device("cpu")
    reason = backends.unavailable_reason(name, device, torch.float64)
    if reason is None:
        pytest.skip(f"the {name} backend is available here")
    _, lstm = make_pair(Cfg(), backend=name)
    x = randn(T_, B_, I)
    rejects(lstm, lambda: lstm(x), RuntimeError, rf"backend='{name}' is not available here: {re.escape(reason)}", x)


@pytest.mark.parametrize("missing", ["triton", "numpy"])
def test_a_triton_that_fails_to_import_says_which_module_is_missing(missing, monkeypatch):
    """"Triton is not installed" only when it is Triton that is missing (its interpreter imports numpy)."""
    import builtins

    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "triton":
            raise ImportError(f"No module named '{missing}'", name=missing)
        return real_import(name, *args, **kwargs)

    loaded = dict(backends._loaded)
    backends._loaded.pop("triton", None)
    monkeypatch.setattr(builtins, "__import__", failing_import)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    try:
        reason = backends.unavailable_reason("triton", torch.device("cpu"), torch.float64)
    finally:
        monkeypatch.undo()
        backends._loaded.clear()
        backends._loaded.update(loaded)
    expected = "Triton is not installed" if missing == "triton" else "Triton failed to import (ImportError: No module named 'numpy')"
    assert reason.startswith(expected), reason


def test_errors_come_before_any_randomness():
    """A rejected call draws no seed: the global RNG is as it was."""
    _, lstm = make_pair(Cfg(), zoneout_h=0.5)
    x = randn(T_, B_, I + 1)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with pytest.raises(RuntimeError):
        lstm(x)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("case", ["cpp_float16", "triton_without_interpreter"])
def test_unavailable_backend_draws_no_seed(case, monkeypatch):
    """The backend is resolved with the other checks, before a training forward draws its seed."""
    if case == "cpp_float16":
        lstm = make_lstm(Cfg(), backend="cpp", dtype=torch.float16, zoneout_h=0.5)
        x = randn(T_, B_, I, dtype=torch.float16)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        lstm = make_lstm(Cfg(), backend="triton", zoneout_h=0.5)
        x = randn(T_, B_, I)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    rejects(lstm, lambda: lstm(x), RuntimeError, "is not available here", x)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(
    "args,pattern",
    [
        ((0, B_), r"^seq_len must be an int >= 1, got 0$"),
        ((-1, B_), r"^seq_len must be an int >= 1, got -1$"),
        ((3.5, B_), r"^seq_len must be an int >= 1, got 3.5$"),
        ((True, B_), r"^seq_len must be an int >= 1, got True$"),
        ((torch.tensor(3), B_), r"^seq_len must be an int >= 1, got tensor\(3\)$"),
        ((T_, -1), r"^batch_size must be an int >= 0, got -1$"),
        ((T_, 2.0), r"^batch_size must be an int >= 0, got 2.0$"),
        ((T_, False), r"^batch_size must be an int >= 0, got False$"),
        ((T_, "2"), r"^batch_size must be an int >= 0, got '2'$"),
    ],
    ids=repr,
)
def test_bad_sample_masks_sizes(args, pattern):
    _, lstm = make_pair(Cfg(num_layers=2), zoneout_h=0.5, input_dropout=0.2)
    with pytest.raises(ValueError, match=pattern):
        lstm.sample_masks(*args, 1)
    if not all(isinstance(size, int) and not isinstance(size, bool) for size in args):
        with pytest.raises(TypeError, match=pattern):  # a size that is no int is a TypeError as well
            lstm.sample_masks(*args, 1)


def test_sample_masks_accepts_the_sizes_a_forward_accepts():
    """An empty sequence is rejected by the forward (as by nn.LSTM), an empty batch runs: sample_masks agrees."""
    _, lstm = make_pair(Cfg(), zoneout_h=0.5, input_dropout=0.2)
    with pytest.raises(RuntimeError, match="sequence length"):
        lstm(randn(0, B_, I))
    with pytest.raises(ValueError, match="seq_len"):
        lstm.sample_masks(0, B_, 1)
    out, _ = lstm(randn(T_, 0, I), seed=1)
    masks = lstm.sample_masks(T_, 0, 1)
    assert out.shape == (T_, 0, H)
    assert masks["zoneout_h"][0].shape == (T_, 0, H) and masks["input"][0].shape == (T_, 0, I)
    assert masks["zoneout_h"][0].shape == lstm.sample_masks(np.int64(T_), np.int64(0), 1)["zoneout_h"][0].shape


def functional_args(cfg=None):
    _, lstm = make_pair(cfg or Cfg())
    weights = [getattr(lstm, name) for name in lstm._flat_weights_names]
    return lstm, weights, randn(T_, B_, I)


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        (dict(regularizers=dict(zoneout_h=0.1)), TypeError, r"^regularizers must be a fused_rnn.Regularizers or None"),
        (dict(num_layers=0), ValueError, r"^num_layers must be greater than zero, got 0$"),
        (dict(num_layers=-1), ValueError, r"^num_layers must be greater than zero, got -1$"),
        (dict(num_layers=1.0), TypeError, r"^num_layers should be of type int, got: float$"),
        (dict(num_layers=True), TypeError, r"^num_layers should be of type int, got: bool$"),
        (dict(has_biases=1), TypeError, r"^has_biases should be of type bool, got: int$"),
        (dict(bidirectional="no"), TypeError, r"^bidirectional should be of type bool, got: str$"),
        (dict(batch_first=None), TypeError, r"^batch_first should be of type bool, got: NoneType$"),
        (dict(training=0), TypeError, r"^training should be of type bool, got: int$"),
        (dict(input_size=I + 1), RuntimeError, rf"^input.size\(-1\) must be equal to input_size. Expected {I + 1}"),
        (dict(input_size=0), ValueError, r"^input_size must be greater than zero, got 0$"),
        (dict(hidden_size="4"), TypeError, r"^hidden_size should be of type int, got: str$"),
        (dict(proj_size=-1), ValueError, r"^proj_size must be at least 0, got -1$"),
        (dict(proj_size=2), ValueError, r"^expected 5 weights per layer and direction, times 1 layers and 1 directions, got 4 weights in all"),
        (dict(bidirectional=True), ValueError, r"^expected 4 or 5 weights per layer and direction, times 1 layers and 2 directions"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_bad_functional_arguments(kwargs, exc, pattern):
    lstm, weights, x = functional_args()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    kwargs = dict(dict(training=True, regularizers=fused_rnn.Regularizers(zoneout_h=0.5)), **kwargs)
    rejects(lstm, lambda: fused_rnn.lstm(x, None, weights, **kwargs), exc, pattern, x)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(
    "weights",
    [lambda w: iter(w), lambda w: w[:1] + [w[1].tolist()] + w[2:], lambda w: [None] * len(w)],
    ids=["iterator", "a_list", "none"],
)
def test_functional_weights_must_be_a_sequence_of_tensors(weights):
    lstm, w, x = functional_args()
    pattern = r"^weights must be a list or tuple of tensors"
    rejects(lstm, lambda: fused_rnn.lstm(x, None, weights(w)), TypeError, pattern, x)


def test_functional_sizes_are_read_off_the_first_layer():
    lstm, weights, x = functional_args(BIG_CFG)
    out, _ = fused_rnn.lstm(x, None, weights, num_layers=2, bidirectional=True, backend="reference")
    assert torch.equal(out, lstm(x)[0])
    with pytest.raises(ValueError, match=r"^proj_size has to be smaller than hidden_size$"):
        fused_rnn.lstm(x, None, weights, num_layers=2, bidirectional=True, hidden_size=P)
    flat_1d = [w.detach().flatten() for w in weights]
    with pytest.raises(RuntimeError, match=r"^weight_ih_l0 must be 2-D to give the LSTM's sizes, got size \[80\]$"):
        fused_rnn.lstm(x, None, flat_1d, num_layers=2, bidirectional=True)


def wrong_shapes(shape):
    """Shapes a parameter of `shape` must not be given: one size off, a dimension added or dropped."""
    off_by_one = [shape[:i] + (n + 1,) + shape[i + 1 :] for i, n in enumerate(shape)]
    return off_by_one + [shape + (1,), (int(torch.Size(shape).numel()),) if len(shape) == 2 else (shape[0], 2)]


WEIGHT_CASES = [
    (name, wrong)
    for name, shape in [
        (name, tuple(p.shape)) for name, p in make_lstm(BIG_CFG).named_parameters()
    ]
    for wrong in wrong_shapes(shape)
]


@pytest.mark.parametrize("name,wrong", WEIGHT_CASES, ids=[f"{n}-{list(w)}" for n, w in WEIGHT_CASES])
def test_weight_of_a_wrong_shape(backend, name, wrong):
    """nn.LSTM fails too (in its kernel, in words of its own); we name the parameter and both shapes."""
    device = setup_backend(backend)
    ref, lstm = make_pair(BIG_CFG, backend=backend, device=device, zoneout_h=0.5)
    expected = tuple(getattr(lstm, name).shape)
    for module in (ref, lstm):
        setattr(module, name, torch.nn.Parameter(torch.randn(wrong, dtype=torch.float64, device=device)))
    x = randn(T_, B_, I)
    assert exception_of(lambda: ref(x)) is not None
    x = x.detach().to(device).requires_grad_()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    pattern = f"^{re.escape(f'Expected {name} size {expected}, got {list(wrong)}')}$"
    rejects(lstm, lambda: lstm(x), RuntimeError, pattern, x)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("name", ["weight_hh_l0", "bias_ih_l1_reverse", "weight_hr_l1"])
def test_weight_of_another_dtype(name):
    _, lstm = make_pair(BIG_CFG)
    setattr(lstm, name, torch.nn.Parameter(getattr(lstm, name).detach().float()))
    x = randn(T_, B_, I)
    pattern = rf"^LSTM: {name} dtype \(torch.float32\) does not match weight_ih_l0 dtype \(torch.float64\)$"
    rejects(lstm, lambda: lstm(x), RuntimeError, pattern, x)


def test_weight_faults_come_after_what_nn_lstm_checks_first():
    """An empty sequence, or a state of the wrong size, is reported before a wrong weight, as nn.LSTM does."""
    ref, lstm = make_pair(Cfg())
    for module in (ref, lstm):
        module.bias_hh_l0 = torch.nn.Parameter(torch.randn(4 * H, 1, dtype=torch.float64))
    for x, hx in [(randn(0, B_, I), None), (randn(T_, B_, I), states(Cfg(), c=H + 1))]:
        expected = exception_of(lambda x=x, hx=hx: ref(x, hx))
        rejects(lstm, lambda x=x, hx=hx: lstm(x, hx), type(expected), f"^{re.escape(str(expected))}$", x)
