"""fused_rnn.LSTM as a drop-in for torch.nn.LSTM (SPEC.md section 1): construction, parameters, state_dict,
repr, warnings, input forms, attribute changes between calls, copies, dtype and device moves."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fused_rnn

from helpers import assert_close

from _cases import (
    ALL_ON,
    ALL_DROPOUTS,
    B,
    BIG_CFG,
    TIGHT,
    Cfg,
    H,
    I,
    T,
    compare_results,
    make_inputs,
    make_lstm,
    make_pair,
    run_with_grads,
    setup_backend,
)
from conftest import require_backend

CONSTRUCTIONS = [
    dict(),
    dict(num_layers=3),
    dict(num_layers=2, bidirectional=True),
    dict(proj_size=2),
    dict(num_layers=2, bidirectional=True, proj_size=3, bias=False, batch_first=True, dropout=0.5),
]


def ids(kwargs):
    return "-".join(f"{k}={v}" for k, v in kwargs.items()) or "default"


@pytest.mark.parametrize("kwargs", CONSTRUCTIONS, ids=ids)
def test_parameters_are_nn_lstms(kwargs):
    """Same names, shapes, order, dtypes, initial values under the same torch.manual_seed, and the same
    number of draws from the global RNG."""
    torch.manual_seed(11)
    ref = torch.nn.LSTM(I, H, **kwargs)
    after_ref = torch.randn(4)
    torch.manual_seed(11)
    lstm = fused_rnn.LSTM(I, H, **kwargs, zoneout_h=0.1, weight_dropout=0.2)
    assert torch.equal(torch.randn(4), after_ref)
    ours, theirs = list(lstm.named_parameters()), list(ref.named_parameters())
    assert [n for n, _ in ours] == [n for n, _ in theirs]
    for (name, a), (_, b) in zip(ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b), name
    assert lstm._flat_weights_names == ref._flat_weights_names
    assert lstm._all_weights == ref._all_weights
    for attr in (
        "mode",
        "input_size",
        "hidden_size",
        "num_layers",
        "bias",
        "batch_first",
        "dropout",
        "bidirectional",
        "proj_size",
    ):
        assert getattr(lstm, attr) == getattr(ref, attr), attr
    assert isinstance(lstm, torch.nn.RNNBase)


def test_device_and_dtype_arguments():
    lstm = fused_rnn.LSTM(I, H, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in lstm.parameters())
    meta = fused_rnn.LSTM(I, H, 2, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())


@pytest.mark.parametrize("kwargs", CONSTRUCTIONS, ids=ids)
def test_state_dict_loads_both_ways(kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.nn.LSTM(I, H, **kwargs, dtype=torch.float64)
        lstm = fused_rnn.LSTM(I, H, **kwargs, dtype=torch.float64, backend="reference")
    torch.manual_seed(1)
    donor = torch.nn.LSTM(I, H, **kwargs, dtype=torch.float64)
    lstm.load_state_dict(donor.state_dict(), strict=True)
    assert list(lstm.state_dict()) == list(donor.state_dict())
    ref.load_state_dict(lstm.state_dict(), strict=True)
    for name, value in donor.state_dict().items():
        assert torch.equal(lstm.state_dict()[name], value) and torch.equal(ref.state_dict()[name], value)
    ref.eval()
    lstm.eval()
    x = torch.randn(T, 2, I, dtype=torch.float64)
    if kwargs.get("batch_first"):
        x = x.transpose(0, 1)
    assert_close("output", ref(x)[0], lstm(x)[0], TIGHT)


def test_repr():
    for kwargs in CONSTRUCTIONS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert repr(fused_rnn.LSTM(I, H, **kwargs)) == repr(torch.nn.LSTM(I, H, **kwargs))
    lstm = fused_rnn.LSTM(I, H, 2, zoneout_h=0.3, dropout_mode="locked", weight_dropout=0.5, backend="reference")
    assert repr(lstm) == (
        f"LSTM({I}, {H}, num_layers=2, dropout_mode='locked', weight_dropout=0.5, zoneout_h=0.3, backend='reference')"
    )
    lstm.zoneout_h = 0.0
    lstm.cell_dropout = 0.25
    assert repr(lstm) == (
        f"LSTM({I}, {H}, num_layers=2, dropout_mode='locked', weight_dropout=0.5, cell_dropout=0.25, "
        "backend='reference')"
    )


def test_dropout_with_one_layer_warns_like_nn_lstm():
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        torch.nn.LSTM(I, H, 1, dropout=0.5)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        fused_rnn.LSTM(I, H, 1, dropout=0.5)
    assert len(theirs) == 1
    assert [(w.category, str(w.message)) for w in ours] == [(w.category, str(w.message)) for w in theirs]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_rnn.LSTM(I, H, 2, dropout=0.5)
        fused_rnn.LSTM(I, H, 1, zoneout_h=0.5, recurrent_dropout=0.5, input_dropout=0.5, output_dropout=0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(proj_size=H),
        dict(proj_size=-1),
        dict(hidden_size=0),
        dict(num_layers=0),
        dict(hidden_size=2.5),
        dict(num_layers=-1),
    ],
    ids=ids,
)
def test_bad_nn_lstm_arguments_fail_like_nn_lstm(kwargs):
    args = dict(input_size=I, hidden_size=H, **{k: v for k, v in kwargs.items() if k != "hidden_size"})
    if "hidden_size" in kwargs:
        args["hidden_size"] = kwargs["hidden_size"]
    try:
        torch.nn.LSTM(**args)
    except Exception as error:
        expected = error
    else:
        pytest.skip(f"nn.LSTM accepts {kwargs} in this torch version")
    with pytest.raises(type(expected)) as ours:
        fused_rnn.LSTM(**args)
    assert str(ours.value) == str(expected)


def test_unbatched_input_and_hx():
    cfg = BIG_CFG
    ref, lstm = make_pair(cfg)
    inputs = make_inputs(cfg, "unbatched", True)
    out, (h_n, c_n) = lstm(*inputs.call_args())
    assert out.shape == (T, 2 * 3) and h_n.shape == (4, 3) and c_n.shape == (4, H)
    compare_results(run_with_grads(ref, inputs), run_with_grads(lstm, inputs), TIGHT)


def test_hx_is_used_and_returned_in_nn_lstms_shapes():
    cfg = Cfg(num_layers=2, proj_size=2, batch_first=True)
    ref, lstm = make_pair(cfg)
    inputs = make_inputs(cfg, "padded", True)
    out, (h_n, c_n) = lstm(*inputs.call_args())
    ref_out, (ref_h, ref_c) = ref(*inputs.call_args())
    assert out.shape == ref_out.shape == (3, T, 2) and h_n.shape == ref_h.shape and c_n.shape == ref_c.shape
    zero_hx = lstm(inputs.x)[0]
    assert not torch.allclose(out, zero_hx)
    assert out.stride() == ref_out.stride()


def test_empty_batch_like_nn_lstm():
    ref, lstm = make_pair(BIG_CFG)
    x = torch.randn(T, 0, I, dtype=torch.float64)
    (out, (h, c)), (ref_out, (ref_h, ref_c)) = lstm(x), ref(x)
    assert out.shape == ref_out.shape and h.shape == ref_h.shape and c.shape == ref_c.shape


def test_empty_batch_backward_like_nn_lstm(backend):
    """A batch of 0 runs backward too: every gradient is zero, in nn.LSTM's shapes."""
    device = setup_backend(backend)
    ref, lstm = make_pair(BIG_CFG, backend=backend, device=device, zoneout_h=0.2, recurrent_dropout=0.1)
    grads = []
    for module, dev in ((ref, "cpu"), (lstm, device)):
        x = torch.randn(T, 0, I, dtype=torch.float64, device=dev, requires_grad=True)
        out, (h, c) = module(x)
        (out.sum() + h.sum() + c.sum()).backward()
        grads.append([x.grad] + [p.grad for p in module.parameters()])
    for expected, got in zip(*grads):
        assert got.shape == expected.shape and not got.any()



@pytest.mark.parametrize("cfg", [Cfg(), Cfg(num_layers=2, bidirectional=True, proj_size=2)], ids=str)
@pytest.mark.parametrize("batch", [B, 0], ids=["batch", "empty-batch"])
def test_final_states_are_tensors_of_their_own_as_nn_lstms(backend, cfg, batch):
    """h_n and c_n are no views, as nn.LSTM's are not: truncated BPTT's h_n.detach_() works on them (it refuses
    a view), and their strides are nn.LSTM's, a batch of 0 included."""
    device = setup_backend(backend)
    ref, lstm = make_pair(cfg, backend=backend, device=device, zoneout_h=0.2)
    x = torch.randn(T, batch, I, dtype=torch.float64)
    _, expected = ref(x)
    _, states = lstm(x.to(device))
    for name, state, ref_state in zip(("h_n", "c_n"), states, expected):
        assert state._base is None, f"{name} is a view"
        assert state.stride() == ref_state.stride(), name
        assert state.requires_grad
        state.detach_()
        assert not state.requires_grad


# every regularizer but input_dropout, whose training graph saves the dropped copy of x rather than x
ALL_ON_BUT_INPUT_DROPOUT = {name: p for name, p in ALL_ON.items() if name != "input_dropout"}


@pytest.mark.parametrize("reg", [{}, ALL_ON_BUT_INPUT_DROPOUT], ids=["none", "every-regularizer"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_input_modified_in_place_before_backward_raises_like_nn_lstm(backend, training, reg):
    """nn.LSTM's graph refuses a backward through an input changed in place since the forward; so does every
    backend's, in training too (where the reference saves tensors through its mask hooks), never computing
    gradients from the changed values."""
    device = setup_backend(backend)
    ref, lstm = make_pair(Cfg(), backend=backend, device=device, **reg)
    for module, dev in ((ref, "cpu"), (lstm, device)):
        module.train(training)
        x = torch.randn(T, B, I, dtype=torch.float64, device=dev, requires_grad=True)
        out, _ = module(x)
        with torch.no_grad():
            x.mul_(3)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(out.sum(), module.weight_ih_l0)


def test_meta_tensors_like_nn_lstm():
    """On the meta device, where nn.LSTM computes shapes: the same shapes, every regularizer on (auto picks the
    reference there, with no warning: no fused backend exists for it); and nn.LSTM's error for mixed devices."""
    ref = torch.nn.LSTM(I, H, **BIG_CFG.kwargs(), device="meta")
    lstm = make_lstm(BIG_CFG, device="meta", dtype=torch.float32, backend="auto", **ALL_ON)
    x = torch.randn(T, 3, I, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, (h, c) = lstm(x)
    ref_out, (ref_h, ref_c) = ref(x)
    assert out.device.type == "meta"
    assert (out.shape, h.shape, c.shape) == (ref_out.shape, ref_h.shape, ref_c.shape)
    cpu_lstm = make_lstm(BIG_CFG)
    with pytest.raises(RuntimeError, match="Input and parameter tensors are not at the same device, found input tensor at meta"):
        cpu_lstm(torch.randn(T, 3, I, dtype=torch.float64, device="meta"))


def test_batch_first_output_is_laid_out_as_nn_lstms():
    """nn.LSTM returns a batch_first output as a transposed view of its time-major one; so does fused_rnn."""
    cfg = Cfg(bidirectional=True, batch_first=True)
    ref, lstm = make_pair(cfg, zoneout_h=0.5)
    x = make_inputs(cfg, "padded", False).x
    ref_out, _ = ref(x)
    for module in (lstm, lstm.eval()):
        out, _ = module(x, seed=3)
        assert out.shape == (3, T, 2 * H) and out.stride() == ref_out.stride() and not out.is_contiguous()


def test_attribute_changes_take_effect_at_the_next_call():
    """As nn.LSTM re-reads `dropout` and `batch_first` at each call, so fused_rnn.LSTM re-reads every setting."""
    cfg = Cfg(num_layers=2)
    _, lstm = make_pair(cfg)
    inputs = make_inputs(cfg, "padded", False)
    x = inputs.x
    plain = lstm(x, seed=9)[0]
    lstm.zoneout_h = 0.3
    zoned = lstm(x, seed=9)[0]
    _, fresh = make_pair(cfg, zoneout_h=0.3)
    assert torch.equal(zoned, fresh(x, seed=9)[0])
    assert not torch.equal(zoned, plain)
    lstm.zoneout_h = 0.0
    assert torch.equal(lstm(x, seed=9)[0], plain)
    lstm.dropout = 0.5
    _, fresh = make_pair(cfg, dropout=0.5)
    assert torch.equal(lstm(x, seed=9)[0], fresh(x, seed=9)[0])
    assert not torch.equal(lstm(x, seed=9)[0], plain)
    lstm.dropout = 0.0
    lstm.dropout_mode = "locked"
    lstm.input_dropout = 0.5
    masks = lstm.sample_masks(T, 3, 9)
    assert masks["input"][0].shape == (1, 3, I)
    lstm.batch_first = True
    lstm.input_dropout = 0.0
    lstm.dropout_mode = "step"
    assert_close("batch_first output", plain, lstm(x.transpose(0, 1), seed=9)[0].transpose(0, 1), TIGHT)
    lstm.backend = "reference"
    lstm.batch_first = False
    assert torch.equal(lstm(x, seed=9)[0], plain)


def test_train_and_eval_switch():
    ref, lstm = make_pair(BIG_CFG, **ALL_DROPOUTS)
    x = make_inputs(BIG_CFG, "padded", False).x
    ref.eval()
    lstm.eval()
    assert_close("output", ref(x)[0], lstm(x)[0], TIGHT)
    lstm.train()
    assert not torch.allclose(lstm(x, seed=1)[0], ref(x)[0])


def test_dtype_and_device_moves():
    ref, lstm = make_pair(BIG_CFG, **ALL_ON)
    x = make_inputs(BIG_CFG, "padded", False).x
    single = copy.deepcopy(lstm).float()
    assert all(p.dtype == torch.float32 for p in single.parameters())
    out32 = single(x.float(), seed=4)[0]
    back = single.double()
    assert all(p.dtype == torch.float64 for p in back.parameters())
    moved = copy.deepcopy(lstm).to(torch.float32).to("cpu")
    assert torch.equal(moved(x.float(), seed=4)[0], out32)
    assert_close("float32 output", lstm(x, seed=4)[0], out32, 1e-5)
    for name, p in lstm.named_parameters():
        assert p.data_ptr() == getattr(lstm, name).data_ptr()


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_keep_the_regularizers(how):
    _, lstm = make_pair(BIG_CFG, **ALL_ON, dropout_mode="locked", weight_dropout_mode="row", backend="reference")
    if how == "deepcopy":
        other = copy.deepcopy(lstm)
    elif how == "pickle":
        other = pickle.loads(pickle.dumps(lstm))
    else:
        buffer = io.BytesIO()
        torch.save(lstm, buffer)
        buffer.seek(0)
        other = torch.load(buffer, weights_only=False)
    assert repr(other) == repr(lstm)
    assert other.regularizers == lstm.regularizers
    x = make_inputs(BIG_CFG, "padded", False).x
    assert torch.equal(other(x, seed=8)[0], lstm(x, seed=8)[0])


def test_state_pickled_before_the_regularizers_existed():
    """An object pickled without the regularizer attributes (an older version, or nn.LSTM's state) unpickles
    with every regularizer off and backend "auto"."""
    _, lstm = make_pair(Cfg(), zoneout_h=0.5)
    state = lstm.__getstate__() if hasattr(lstm, "__getstate__") else dict(lstm.__dict__)
    state = dict(state)
    for name in ("zoneout_h", "dropout_mode", "backend"):
        state.pop(name)
    restored = fused_rnn.LSTM.__new__(fused_rnn.LSTM)
    restored.__setstate__(state)
    assert restored.zoneout_h == 0.0 and restored.dropout_mode == "step" and restored.backend == "auto"


def test_functional_call_uses_the_given_parameters():
    ref, lstm = make_pair(BIG_CFG)
    torch.manual_seed(5)
    other = torch.nn.LSTM(I, H, **BIG_CFG.kwargs(), dtype=torch.float64)
    x = make_inputs(BIG_CFG, "padded", False).x
    out = torch.func.functional_call(lstm, dict(other.named_parameters()), (x,))[0]
    assert_close("output", other(x)[0], out, TIGHT)
    assert not torch.allclose(out, lstm(x)[0])
    grads = torch.func.grad(lambda params: torch.func.functional_call(lstm, params, (x,))[0].sum())(
        {k: v.detach() for k, v in other.named_parameters()}
    )
    ref_grads = torch.autograd.grad(other(x)[0].sum(), list(other.parameters()))
    for (name, g), r in zip(grads.items(), ref_grads):
        assert_close(name, r, g, TIGHT)


def test_flat_weights_are_read_and_refreshed_as_nn_lstms():
    """forward reads RNNBase's _flat_weights as nn.LSTM.forward does: refreshed where a parameter was replaced
    behind __setattr__ (in _parameters), used as it is where only the list was changed."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, dtype=torch.float64)
    lstm = fused_rnn.LSTM(I, H, dtype=torch.float64)
    lstm.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)
    for module in (ref, lstm):
        module._parameters["weight_hh_l0"] = torch.nn.Parameter(torch.full_like(module.weight_hh_l0, 0.1))
    assert_close("output, weight_hh_l0 replaced", ref(x)[0], lstm(x)[0], TIGHT)
    assert lstm._flat_weights[1] is lstm.weight_hh_l0
    for module in (ref, lstm):
        module._flat_weights[0] = torch.zeros_like(module.weight_ih_l0)
    assert_close("output, the list changed", ref(x)[0], lstm(x)[0], TIGHT)
    # AWD-LSTM's old WeightDrop: the parameter deleted, a plain tensor set in its place
    for module in (ref, lstm):
        raw = module.weight_hh_l0
        del module.weight_hh_l0
        module.weight_hh_l0 = raw * 0.5
    assert_close("output, a plain tensor for weight_hh_l0", ref(x)[0], lstm(x)[0], TIGHT)
    assert lstm._flat_weights[1] is lstm.weight_hh_l0


def test_proj_size_false_is_no_projection_as_in_nn_lstm():
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, proj_size=False, dtype=torch.float64)
    lstm = fused_rnn.LSTM(I, H, proj_size=False, dtype=torch.float64)
    lstm.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)
    assert_close("output", ref(x)[0], lstm(x)[0], TIGHT)


def test_packed_input_under_autocast_runs_in_the_weights_dtype_as_in_nn_lstm():
    """nn.LSTM's packed overload is not on autocast's list: its outputs keep the weights' float32, where padded
    input under the same autocast comes out in bfloat16. fused_rnn computes them as without autocast (nn.LSTM's
    CPU kernel, whose products autocast still reaches, differs from its own float32 result by bfloat16's
    rounding)."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H)
    lstm = fused_rnn.LSTM(I, H)
    lstm.load_state_dict(ref.state_dict())
    packed = torch.nn.utils.rnn.pack_sequence([torch.randn(3, I), torch.randn(2, I)])
    expected = ref(packed)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_ref, (h_ref, c_ref) = ref(packed)
        out, (h, c) = lstm(packed)
        padded = lstm(torch.randn(T, B, I))[0]
    dtypes = (out.data.dtype, h.dtype, c.dtype)
    assert dtypes == (autocast_ref.data.dtype, h_ref.dtype, c_ref.dtype) == (torch.float32,) * 3
    assert_close("packed output", expected.data, out.data, 1e-6)
    assert padded.dtype == torch.bfloat16


def test_input_in_autocasts_dtype_runs_as_a_copy_of_the_module_in_that_dtype(backend):
    """Under CPU autocast nn.LSTM runs padded input, and a PackedSequence whose data is in autocast's bfloat16
    (which it refuses without autocast), in bfloat16. fused_rnn returns for each what a bfloat16 copy of the module
    returns without autocast: the backend's own products are not cast again."""
    device = setup_backend(backend)
    require_backend(backend, torch.bfloat16)
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H)
    lstm = fused_rnn.LSTM(I, H, backend=backend, device=device)
    lstm.load_state_dict(ref.state_dict())
    low = copy.deepcopy(lstm).bfloat16()
    sequences = [torch.randn(3, I, dtype=torch.bfloat16), torch.randn(2, I, dtype=torch.bfloat16)]
    packed, padded = torch.nn.utils.rnn.pack_sequence(sequences), torch.randn(T, B, I)
    for x, x_low in ((packed, packed), (padded, padded.bfloat16())):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_out, (ref_h, ref_c) = ref(x)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out, (h, c) = lstm(x.to(device))
        expected_out, (expected_h, expected_c) = low(x_low.to(device))
        out, ref_out, expected_out = (getattr(o, "data", o) for o in (out, ref_out, expected_out))
        assert (out.dtype, h.dtype, c.dtype) == (ref_out.dtype, ref_h.dtype, ref_c.dtype) == (torch.bfloat16,) * 3
        for name, got, expected in (("output", out, expected_out), ("h_n", h, expected_h), ("c_n", c, expected_c)):
            assert torch.equal(got, expected), f"{type(x).__name__}: {name}"


def test_autocast_leaves_float64_as_it_is_as_in_nn_lstm(backend):
    """Autocast casts no float64 tensor: a float64 module runs float64 input in float64 under it, as nn.LSTM does
    (the same results as without autocast), and float64 input to a float32 module (whose weights it casts) is
    refused with nn.LSTM's RuntimeError, before any draw or kernel."""
    device = setup_backend(backend)
    ref, lstm = make_pair(BIG_CFG, backend=backend, device=device, zoneout_h=0.2)
    x = torch.randn(T, B, I, dtype=torch.float64)
    expected, _ = lstm(x.to(device), seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_out, _ = ref(x)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out, (h, c) = lstm(x.to(device), seed=5)
    assert out.dtype == h.dtype == c.dtype == ref_out.dtype == torch.float64
    assert torch.equal(out, expected)
    states = tuple(torch.zeros(s.shape, dtype=torch.float32) for s in (h, c))  # cast by autocast, x not
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError):
            ref(x, states)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match=r"^LSTM: hx\[0\] dtype \(torch.float32\) does not match input dtype"):
            lstm(x.to(device), tuple(s.to(device) for s in states))
    ref.float()
    lstm.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError):
            ref(x)
    generator = torch.get_rng_state()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match=r"^LSTM under autocast: input dtype torch.float64 runs in torch.float64"):
            lstm.train()(x.to(device))
    assert torch.equal(torch.get_rng_state(), generator)


def test_a_jit_trace_runs_other_lengths_or_refuses_them(backend):
    """torch.jit.trace of nn.LSTM runs any sequence length. The C++ and Triton ops trace as one op each and do too;
    the reference backend's loop over the steps is unrolled at the example's length, so its trace warns and refuses
    another length rather than return the example's number of steps. Other batch sizes run on every backend."""
    device = setup_backend(backend)
    _, lstm = make_pair(Cfg(bidirectional=True), backend=backend, device=device)
    lstm.eval()
    example = torch.randn(T, B, I, dtype=torch.float64, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(lstm, (example,), check_trace=False)
    length_warnings = [w for w in caught if "traced for sequences of" in str(w.message)]
    assert len(length_warnings) == (1 if backend == "reference" else 0)
    other_batch = torch.randn(T, B + 2, I, dtype=torch.float64, device=device)
    assert_close("output, another batch size", lstm(other_batch)[0], traced(other_batch)[0], TIGHT)
    longer = torch.randn(T + 1, B, I, dtype=torch.float64, device=device)
    if backend == "reference":
        with pytest.raises(RuntimeError, match="expanded size"):
            traced(longer)
    else:
        assert_close("output, a longer sequence", lstm(longer)[0], traced(longer)[0], TIGHT)


def test_flatten_parameters_and_packed_round_trip():
    ref, lstm = make_pair(Cfg(bidirectional=True))
    lstm.flatten_parameters()
    x = make_inputs(Cfg(), "padded", False).x
    data = pack_padded_sequence(x, [3, 1, 4], enforce_sorted=False)
    out, (h, c) = lstm(data)
    ref_out, (ref_h, ref_c) = ref(data)
    assert type(out) is type(ref_out)
    assert_close("packed output", ref_out.data, out.data, TIGHT)
    assert_close("h_n", ref_h, h, TIGHT)
    assert_close("c_n", ref_c, c, TIGHT)


def test_sample_masks_follow_the_module_device_and_settings():
    lstm = fused_rnn.LSTM(I, H, 2, zoneout_h=0.5, backend="reference")
    masks = lstm.sample_masks(T, 2, 0)
    assert masks["zoneout_h"][0].device == lstm.weight_hh_l0.device
    assert masks["zoneout_c"] == [None, None]
    meta = lstm.sample_masks(T, 2, 0, device="meta")
    assert meta["zoneout_h"][0].device.type == "meta"


@pytest.mark.parametrize("cfg", [Cfg(), BIG_CFG, Cfg(num_layers=2, batch_first=True)], ids=str)
def test_lstm_methods_for_a_state_pair_are_nn_lstms(cfg):
    """get_expected_cell_size, check_forward_args and permute_hidden take (h, c), as nn.LSTM's do."""
    ref, lstm = make_pair(cfg)
    n, h_out = cfg.num_layers * cfg.dirs, cfg.h_out
    x = make_inputs(cfg, "padded", False).x
    batch_sizes = torch.tensor([3, 2, 2, 1])
    for args in ((x, None), (x[..., :1], None), (x.flatten(0, 1), batch_sizes)):
        assert lstm.get_expected_cell_size(*args) == ref.get_expected_cell_size(*args)
    def zeros(*shape):
        return torch.zeros(*shape, dtype=torch.float64)

    good = (zeros(n, B, h_out), zeros(n, B, H))
    hidden_cases = [
        good,
        (zeros(n, B + 1, h_out), good[1]),
        (good[0], zeros(n, B, H + 1)),
        (good[0], zeros(n + 1, B, H)),
    ]
    for x_case in (x, x[..., :2], x.float()):
        for hidden in hidden_cases:
            try:
                expected = ref.check_forward_args(x_case, hidden, None)
            except Exception as error:
                with pytest.raises(type(error)) as ours:
                    lstm.check_forward_args(x_case, hidden, None)
                assert str(ours.value) == str(error)
            else:
                assert lstm.check_forward_args(x_case, hidden, None) == expected
    hidden = (torch.randn(n, B, h_out, dtype=torch.float64), torch.randn(n, B, H, dtype=torch.float64))
    permutation = torch.tensor([2, 0, 1])
    for perm in (permutation, None):
        ours, theirs = lstm.permute_hidden(hidden, perm), ref.permute_hidden(hidden, perm)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_hx_none_reuses_kept_zero_states_that_no_backend_writes(backend):
    """A forward without hx reads kept zero states (functional.zero_states) rather than filling new ones,
    which a GPU would fill before the recurrence starts: every backend leaves them zero, through a
    training forward and backward with every regularizer, so the next forward starts from zeros too."""
    from fused_rnn import functional

    device = setup_backend(backend)
    cfg = Cfg(num_layers=2, bidirectional=True, proj_size=2)
    lstm = make_lstm(cfg, backend=backend, device=device, **ALL_ON)
    x = torch.randn(T, B, I, dtype=torch.float64, device=device, requires_grad=True)
    functional._zero_states.clear()
    out, (h_n, c_n) = lstm(x, seed=3)
    (out.sum() + h_n.sum() + c_n.sum()).backward()
    (key, (h0, c0)), = functional._zero_states.items()
    assert h0.shape == (4, B, 2) and c0.shape == (4, B, H) and not h0.requires_grad
    assert not h0.any() and not c0.any()
    again, _ = lstm(x, seed=3)
    assert functional._zero_states[key][0] is h0 and len(functional._zero_states) == 1
    assert torch.equal(again, out)
    assert torch.equal(again, lstm(x, (torch.zeros_like(h0), torch.zeros_like(c0)), seed=3)[0])


def test_large_or_traced_zero_states_are_made_anew():
    """Zero states past ZERO_STATES_MAX_BYTES, or under a dispatch mode (a trace's fake tensors), are not kept."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fused_rnn import functional

    x = torch.zeros(2, 3, dtype=torch.float64)
    functional._zero_states.clear()
    big = functional.ZERO_STATES_MAX_BYTES // (2 * 8) + 1
    h0, c0 = functional.zero_states(x, 1, 1, big, big)
    assert h0.shape == (1, 1, big) and not functional._zero_states

    class Passing(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passing():
        functional.zero_states(x, 1, 2, 3, 3)
    assert not functional._zero_states
    kept = functional.zero_states(x, 1, 2, 3, 3)
    assert functional.zero_states(x, 1, 2, 3, 3)[0] is kept[0]
    with torch.inference_mode():
        inside = functional.zero_states(x, 1, 2, 3, 3)
    assert inside[0] is not kept[0] and not kept[0].is_inference()
